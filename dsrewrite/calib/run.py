"""Data-aware initialisation on a torch model: calibration batches, hook-driven capture, sequential refit.

Runs the model (forward hooks, early stop) to feed the per-layer statistics and solvers of
:mod:`dsrewrite.calib.solve`; :func:`calibrate_sequential` calibrates a rewritten model in execution order, each
layer seeing the activations of the already-rewritten network before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .solve import DAMP, RIDGE, CalibResult, LayerCalibrator, LayerInputs
from ..errors import DsrewriteError
from ..ir import KXK, LINEAR, POINTWISE

__all__ = ["as_batches", "collect_patch_stats", "layer_kind", "CalibLayer", "calibrate_sequential"]


def as_batches(calibration: Any, batch_size: int = 16, max_batches: Optional[int] = None,
               example_args: Optional[tuple] = None) -> List[tuple]:
    """Calibration data as a list of positional-argument tuples.

    A tensor is split along dim 0 into batches of ``batch_size``; an iterable yields batches (a tensor, or a
    tuple/list of positional args; ``(inputs, labels)`` pairs from a DataLoader work: the first item is used
    when the model takes one input). When the example's first input is itself a list (detection models take
    a list of images), a list batch is that one input.
    """
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise DsrewriteError("calibration tensor is empty")
        out = [(b,) for b in calibration.split(batch_size)]
    else:
        try:
            it = iter(calibration)
        except TypeError:
            raise DsrewriteError("calibration must be a tensor or an iterable of batches, "
                                 f"got {type(calibration).__name__}") from None
        out = []
        list_input = bool(example_args) and isinstance(example_args[0], list)
        for b in it:
            if isinstance(b, list) and list_input:
                out.append((b,))
            else:
                out.append(tuple(b) if isinstance(b, (tuple, list)) else (b,))
            if max_batches is not None and len(out) >= max_batches:
                break
        if not out:
            raise DsrewriteError("calibration gave no batches")
    return out[:max_batches] if max_batches is not None else out


class _Stop(Exception):
    pass


def _run_until(model: nn.Module, args: tuple, module: nn.Module, calls: int, capture: str) -> List[torch.Tensor]:
    """Run ``model(*args)`` until ``module`` has run ``calls`` times; return its inputs or outputs."""
    got: List[torch.Tensor] = []

    def pre(m, a):
        if capture == "input":
            got.append(a[0])
            if len(got) >= calls:
                raise _Stop

    def post(m, a, out):
        got.append(out)
        if len(got) >= calls:
            raise _Stop

    h = module.register_forward_pre_hook(pre) if capture == "input" else module.register_forward_hook(post)
    try:
        with torch.no_grad():
            model(*args)
    except _Stop:
        pass
    finally:
        h.remove()
    return got


def _fit_args(model: nn.Module, batch: tuple, n_inputs: int) -> tuple:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = batch[:n_inputs] if n_inputs else batch
    return tuple(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch)


def layer_kind(module: nn.Module) -> Optional[str]:
    """The layer kind whose input statistics :func:`collect_patch_stats` gathers for ``module``: ``"kxk"`` or
    ``"pointwise"`` for an ungrouped ``nn.Conv1d/2d``, ``"linear"`` for an ``nn.Linear``; ``None`` otherwise."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return POINTWISE if math.prod(module.kernel_size) == 1 else KXK
    return None


@torch.no_grad()
def collect_patch_stats(model: nn.Module, batches: Sequence[tuple], names: Sequence[str], n_inputs: int = 1,
                        kinds: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Input autocorrelation of the modules ``names`` of ``model`` (one pass, hooks), by name: per-channel patch
    autocorrelation ``[Cin, K, K]`` of a KxK conv, ``[1, Cin, Cin]`` of a 1x1 conv's or linear layer's input
    rows (the one-channel view its low-rank pair is planned on). ``kinds``: only layers of these kinds."""
    inputs: Dict[str, LayerInputs] = {}
    handles = []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        kind = layer_kind(mod)
        if kind is None or (kinds is not None and kind not in kinds):
            continue
        inputs[name] = LayerInputs(mod, lowrank=kind != KXK)

        def pre(m, a, name=name):
            if a and isinstance(a[0], torch.Tensor):
                inputs[name].update(a[0])

        handles.append(mod.register_forward_pre_hook(pre))
    try:
        for b in batches:
            model(*_fit_args(model, b, n_inputs))
    finally:
        for h in handles:
            h.remove()
    return {k: i.stats.autocorr() for k, i in inputs.items() if i.stats.count}


@dataclass
class CalibLayer:
    """One rewritten layer for :func:`calibrate_sequential`."""

    name: str
    student: nn.Module  # the pair module in the rewritten model (SeparableConv*d, LowRankConv*d, LowRankLinear)
    conv: nn.Module  # an nn.Conv*d (or nn.Linear) with the original weight and settings
    teacher: Optional[nn.Module] = None  # the original layer inside the teacher model (hooked for targets)
    calls: int = 1


@torch.no_grad()
def calibrate_sequential(student: nn.Module, teacher: Optional[nn.Module], layers: Sequence[CalibLayer],
                         batches: Sequence[tuple], *, n_inputs: int = 1, progress: bool = False,
                         damp: float = DAMP, ridge: float = RIDGE) -> Dict[str, CalibResult]:
    """Refit every layer in execution order on the activations of the already-rewritten network before it.

    Targets are the teacher's activations at that layer (so earlier errors are compensated) when the teacher
    layer is known, else the original layer applied to the student's input. Writes the kept factors into the
    student's pair (depthwise/pointwise, or reduce/expand); returns the per-layer :class:`CalibResult`.
    """
    order: List[nn.Module] = []
    handles = [L.student.register_forward_pre_hook(lambda m, a: order.append(m) if m not in order else None)
               for L in layers]
    try:
        student(*_fit_args(student, batches[0], n_inputs))
    finally:
        for h in handles:
            h.remove()
    rank_of = {id(m): i for i, m in enumerate(order)}
    todo = sorted([L for L in layers if id(L.student) in rank_of], key=lambda L: rank_of[id(L.student)])
    it = todo
    if progress and len(todo) > 1:
        it = tqdm(todo, desc="calibrating", unit="layer", leave=False)
    results: Dict[str, CalibResult] = {}
    for L in it:
        sep = L.student
        cal = LayerCalibrator(L.conv, sep.rank, plain=sep.factors(clone=True), damp=damp, ridge=ridge)
        for b in batches:
            for x in _run_until(student, _fit_args(student, b, n_inputs), sep, L.calls, "input"):
                cal.observe_inputs(x)
        cal.finish_inputs()
        for b in batches:
            args = _fit_args(student, b, n_inputs)
            xs = _run_until(student, args, sep, L.calls, "input")
            if L.teacher is not None and teacher is not None:
                ys = _run_until(teacher, _fit_args(teacher, b, n_inputs), L.teacher, L.calls, "output")
            else:
                ys = []
            if len(ys) != len(xs) or not all(cal.matches(x, y) for x, y in zip(xs, ys)):
                ys = [L.conv(x.to(L.conv.weight.dtype)) for x in xs]
            for x, y in zip(xs, ys):
                cal.observe(x, y)
        res = cal.result()
        sep.load_factors(res.factors)
        results[L.name] = res
    return results
