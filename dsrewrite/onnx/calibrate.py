"""Data-aware initialisation on the ONNX route: activations from onnxruntime, the PyTorch route's maths.

Each rewritten conv of the main graph is seen as an ``nn.Conv1d`` / ``nn.Conv2d`` holding its weights with no
padding, its input padded here as the node pads it (``pads`` or ``auto_pad``) (:class:`ConvView`), each rewritten
``Gemm`` / ``MatMul`` as an ``nn.Linear`` (its weight ``[Cout, Cin]``, ``alpha`` and ``beta * C`` folded as the
frontend reads them; the input's last dim is its channels), and handed to
:class:`dsrewrite.calib.solve.LayerCalibrator` (low-rank layers, 1x1 convs included, as low-rank pairs): the
patch statistics, whitened SVD, ridge refit and the choice of the best candidate are the PyTorch route's, only
the activations come from onnxruntime
(:func:`~.calib_data.collect_conv_inputs`, one feed at a time).

Sequential (the default when its estimated time fits :data:`SEQUENTIAL_SECONDS`): layers are refitted in waves in
execution order. A wave is every layer whose input depends on no layer still to refit; it reads its inputs from
the rewritten graph with the earlier refits in place and fits them to the original model's output at that conv,
so a layer compensates the errors before it (as :func:`dsrewrite.calib.run.calibrate_sequential` does).
Otherwise every layer is refitted on the original model's activations in one pass, and the report says so.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calib import solve as calib_solve
from ..calib.solve import CalibResult, LayerCalibrator, PatchStats, patch_conv, summary
from ..plan.eligibility import why_not
from ..plan.factorize import Factors
from ..ir import ConvSite
from ..modules import tf_same_pad
from ..plan.planner import Decision
from .calib_data import Feed, collect_conv_inputs
from .flops import attribute
from .frontend import WEIGHT_OPS
from .scopes import reads

__all__ = ["ConvView", "OnnxCalibration", "SEQUENTIAL_SECONDS", "not_calibrated"]

SEQUENTIAL_SECONDS = 180.0  # sequential=None: refit sequentially when the estimate is at most this
_CACHE_BYTES = 256 << 20  # a wave's inputs kept between its two passes up to this size (else read again)


def not_calibrated(site: ConvSite) -> Optional[str]:
    """Why a conv cannot be refitted on data (it keeps its plain SVD factors), or ``None``."""
    if not site.handle.scope.is_main:
        return "inside a subgraph (its activations cannot be read)"
    if site.spec.kind != "linear" and len(site.spec.kernel) not in (1, 2):
        return f"a {len(site.spec.kernel)}-D conv"
    if site.spec.extra.get("bias"):
        return "its bias is computed at run time" if site.spec.kind != "linear" else site.spec.extra["bias"]
    if site.spec.lowrank and _layer_inputs() is None:
        return "low-rank calibration is not available in this dsrewrite.calib.solve"
    if site.weight is None:
        return "its weight is not a constant"
    return None


def _layer_inputs():
    """:class:`dsrewrite.calib.solve.LayerInputs` (the low-rank statistics), or ``None`` where it is missing."""
    return getattr(calib_solve, "LayerInputs", None)


class ConvView:
    """One main-graph ``Conv`` (or ``Gemm`` / ``MatMul`` weight layer) as the calibration maths sees it: ``conv``
    (a torch conv with the node's weights, strides and dilations, no padding; an ``nn.Linear`` for a linear
    layer) and :meth:`padded` (its input padded as the node pads it)."""

    def __init__(self, site: ConvSite) -> None:
        node, spec = site.handle.node, site.spec
        self.name = spec.name
        self.x, self.y = node.input[0], node.output[0]
        self.auto_pad = attribute(node, "auto_pad", "NOTSET")
        dims = len(spec.kernel)
        pads = attribute(node, "pads", None)
        self.pads = tuple(int(p) for p in pads) if pads is not None else (0,) * (2 * dims)
        self.spec = spec
        w = torch.from_numpy(np.ascontiguousarray(site.weight))
        self.dtype = w.dtype  # the model's: factors are written back in it
        work = torch.float64 if w.dtype == torch.float64 else torch.float32
        if spec.kind == "linear":
            conv = nn.Linear(spec.in_channels, spec.out_channels, bias=site.bias is not None, dtype=work)
        else:
            cls = nn.Conv1d if dims == 1 else nn.Conv2d
            conv = cls(spec.in_channels, spec.out_channels, spec.kernel, stride=spec.stride,
                       dilation=spec.dilation, bias=site.bias is not None, dtype=work)
        with torch.no_grad():
            conv.weight.copy_(w.to(work))
            if site.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.asarray(site.bias)).to(work).reshape(-1))
        conv.requires_grad_(False)
        self.conv = conv

    def padded(self, x: np.ndarray) -> torch.Tensor:
        """The node's input ``x`` as a tensor, padded as the node pads it (the conv then needs none)."""
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.conv.weight.dtype)
        s = self.spec
        dims = len(s.kernel)
        if not dims:  # a linear layer: no padding
            return t
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            amounts = list(tf_same_pad(tuple(t.shape[2:]), s.kernel, s.stride, s.dilation))  # odd pixel at the end
            if self.auto_pad == "SAME_LOWER":
                for i in range(0, len(amounts), 2):
                    amounts[i], amounts[i + 1] = amounts[i + 1], amounts[i]
        elif self.auto_pad == "VALID":
            amounts = []
        else:  # pads = [begin of each axis..., end of each axis...]; F.pad wants the last axis first
            amounts = [p for d in reversed(range(dims)) for p in (self.pads[d], self.pads[dims + d])]
        return F.pad(t, amounts) if any(amounts) else t


class OnnxCalibration:
    """Calibration of one ONNX model on ``feeds``: input statistics of its convs (:meth:`stats`, also what a
    budget allocates ranks by) and the refit of the rewritten ones (:meth:`refit`)."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[Feed], *, sequential: Optional[bool] = None,
                 progress: bool = False) -> None:
        self.model, self.feeds, self.sequential, self.progress = model, list(feeds), sequential, progress
        self._stats: Dict[str, PatchStats] = {}
        self.pass_seconds = 0.0  # one run over the data with every conv input read (the original model)

    def stats(self, sites: Sequence[ConvSite]) -> Dict[str, torch.Tensor]:
        """Per-channel patch autocorrelation ``[Cin, K, K]`` of every rewritable conv of the main graph (``[1, Cin,
        Cin]``, the input rows', for a low-rank layer), on the original model's activations (one pass); kept for
        the refit."""
        views = [ConvView(s) for s in sites if why_not(s.spec) is None and not_calibrated(s) is None]
        inputs = {v.name: _layer_inputs()(v.conv, True) if v.spec.lowrank else None for v in views}
        patchers = {v.name: patch_conv(v.conv) for v in views if not v.spec.lowrank}
        self._stats = {v.name: inputs[v.name].stats if v.spec.lowrank else
                       PatchStats(v.spec.in_channels, int(np.prod(v.spec.kernel))) for v in views}
        start = time.perf_counter()
        if views:
            for xs in collect_conv_inputs(self.model, self.feeds, [v.x for v in views]):
                for v in views:
                    if v.spec.lowrank:
                        inputs[v.name].update(v.padded(xs[v.x]))
                    else:
                        self._stats[v.name].update(patchers[v.name](v.padded(xs[v.x])))
        self.pass_seconds = time.perf_counter() - start
        return {k: s.autocorr() for k, s in self._stats.items() if s.count}

    def refit(self, decisions: List[Decision], rebuild: Callable[[List[Decision]], onnx.ModelProto]) -> str:
        """Refit every rewritten decision that can be (in place: factors, ``calibrated``, the report's
        calibration errors); ``rebuild(decisions)`` gives the rewritten model with the current factors. Returns
        the report note."""
        why = {id(d): not_calibrated(d.site) for d in decisions if d.rewritten}
        skipped = [(d.site.spec.name, why[id(d)]) for d in decisions if why.get(id(d))]
        layers = [d for d in decisions if id(d) in why and not why[id(d)]]
        if not self._stats:
            self.stats([d.site for d in layers])
        waves = _waves(self.model, layers)
        estimate = 1.5 * len(waves) * self.pass_seconds
        sequential = self.sequential if self.sequential is not None else estimate <= SEQUENTIAL_SECONDS
        results: Dict[str, CalibResult] = {}
        steps = waves if sequential else [layers]
        it = steps
        if self.progress and len(layers) > 1:
            it = tqdm(steps, desc="calibrating", unit="wave" if sequential else "pass", leave=False)
        for i, wave in enumerate(it):
            student = rebuild(decisions) if sequential and i > 0 else self.model
            results.update(self._refit(wave, student))
        n = len(self.feeds)
        samples = sum(len(next(iter(f.values()))) for f in self.feeds)
        if not results:
            note = "calibration: no rewritten layer could be refitted"
        elif sequential and len(waves) > 1:
            note = (f"calibrated {len(results)} layer(s) on {n} feed(s) ({samples} samples), sequentially on the "
                    f"rewritten graph ({len(waves)} waves in execution order): {summary(results.values())}")
        else:
            how = "on the original model's activations"
            if len(waves) > 1 and self.sequential is None:
                how += (f", not sequentially (estimated {estimate:.0f} s for {len(waves)} waves; sequential=True / "
                        "--sequential runs it)")
            elif len(waves) > 1:
                how += " (sequential=False)"
            note = (f"calibrated {len(results)} layer(s) on {n} feed(s) ({samples} samples) {how}: "
                    f"{summary(results.values())}")
        if skipped:
            note += (f"; {len(skipped)} layer(s) keep their plain SVD factors ("
                     + ", ".join(f"{a}: {b}" for a, b in skipped[:3]) + (", ..." if len(skipped) > 3 else "") + ")")
        return note

    def _refit(self, layers: List[Decision], student: onnx.ModelProto) -> Dict[str, CalibResult]:
        """Refit ``layers`` on the inputs ``student`` gives them and the original model's outputs."""
        views = {id(d): ConvView(d.site) for d in layers}
        original = student is self.model
        cals = {id(d): LayerCalibrator(views[id(d)].conv, d.factors.rank, plain=d.factors,
                                       stats=self._stats.get(d.site.spec.name) if original else None,
                                       **({"lowrank": True} if d.site.spec.lowrank else {}))
                for d in layers}
        xs_names = [views[id(d)].x for d in layers]
        ys_names = [views[id(d)].y for d in layers]
        cache: Optional[List[Feed]] = None
        if not original:  # pass 1 on the rewritten graph's activations
            cache, size = [], 0
            for xs in collect_conv_inputs(student, self.feeds, xs_names):
                for d in layers:
                    v = views[id(d)]
                    cals[id(d)].observe_inputs(v.padded(xs[v.x]))
                size += sum(a.nbytes for a in xs.values())
                cache = cache if cache is not None and size <= _CACHE_BYTES else None
                if cache is not None:
                    cache.append(xs)
        for cal in cals.values():
            cal.finish_inputs()
        if original:  # inputs and targets from one run of the original model
            runs = collect_conv_inputs(self.model, self.feeds, xs_names + ys_names)
            pairs = ((r, r) for r in runs)
        else:
            inputs = iter(cache) if cache is not None else collect_conv_inputs(student, self.feeds, xs_names)
            pairs = zip(inputs, collect_conv_inputs(self.model, self.feeds, ys_names))
        for xs, ys in pairs:
            for d in layers:
                v = views[id(d)]
                cals[id(d)].observe(v.padded(xs[v.x]), torch.from_numpy(np.ascontiguousarray(ys[v.y])))
        out = {}
        for d in layers:
            res = cals[id(d)].result()
            d.factors = _in_dtype(res.factors, views[id(d)].dtype)
            d.calibrated = True
            d.report.calib_error_before, d.report.calib_error_after = res.error_before, res.error_after
            out[d.site.spec.name] = res
        return out


def _in_dtype(f: Factors, dtype: torch.dtype) -> Factors:
    cast = lambda t: None if t is None else t.detach().to(dtype).contiguous()  # noqa: E731
    return Factors(cast(f.depthwise), cast(f.pointwise), cast(f.bias), f.rank, f.error, f.channel_index,
                   lowrank=f.lowrank)


def _waves(model: onnx.ModelProto, layers: List[Decision]) -> List[List[Decision]]:
    """``layers`` grouped in execution order: wave ``k`` holds the layers with ``k`` rewritten layers on their
    longest path from the inputs, so a wave's inputs depend only on the waves before it."""
    at = {d.site.handle.node.output[0]: d for d in layers}
    level: Dict[str, int] = {}
    waves: Dict[int, List[Decision]] = {}
    for node in model.graph.node:
        lv = max((level.get(i, 0) for i in reads(node)), default=0)
        d = at.get(node.output[0]) if node.output and node.op_type in WEIGHT_OPS else None
        if d is not None:
            waves.setdefault(lv, []).append(d)
            lv += 1
        for o in node.output:
            level[o] = lv
    return [waves[k] for k in sorted(waves)]
