"""``dsrewrite.rewrite``: the one-call entry point (copy, trace or fall back, plan, rewrite, report)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import fx, nn

from .errors import DsrewriteError
from .frontends.swap import rewrite_untraceable
from .fx_pass import SeparableRewritePass
from .measure import count_params, eval_mode, input_device, time_call
from .modules import BACKENDS
from .pipeline import Decision, Selector
from .policy import RankArg, check_rank
from .report import Report

__all__ = ["rewrite", "RewriteResult", "as_args"]


@dataclass
class RewriteResult:
    """``model``: the rewritten model (a ``GraphModule`` on the fx route); ``report``: what changed."""

    model: nn.Module
    report: Report
    decisions: Optional[List[Decision]] = None

    def __iter__(self):  # allows ``model, report = rewrite(...)``
        return iter((self.model, self.report))


def as_args(example_inputs: Any) -> tuple:
    """Positional inputs: a tuple is taken as the args, anything else (a tensor, a list) as one arg."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def rewrite(model: nn.Module, example_inputs: Any, *, rank: RankArg = "auto", include: Selector = None,
            exclude: Selector = None, inplace: bool = False, backend: str = "auto",
            measure_time: bool = True, progress: bool = False, name: Optional[str] = None) -> RewriteResult:
    """Replace the standard convs of ``model`` by low-rank depthwise-separable pairs.

    Args:
        model: an ``nn.Module``; traced with ``torch.fx`` (the fx route) or, if it cannot be traced,
            rewritten through its traceable sub-modules and in-place module swaps (the fallback route).
        example_inputs: positional inputs for one forward (a tuple of args, or a single tensor/list);
            they give output shapes for FLOPs and must run through the model.
        rank: int (same for every layer, clamped to each layer's full rank), ``"auto"`` (default: half of
            each layer's FLOP break-even rank, skipping layers that cannot save) or ``"full"`` (exact).
        include / exclude: glob patterns over conv names (``"layer4.*"``) or a callable ``name -> bool``.
        inplace: allow changing ``model`` itself (its conv modules are swapped); otherwise it is untouched.
        backend: how the new pairs run: ``"auto"``, ``"triton"`` or ``"torch"``.
        measure_time: time the original and rewritten model on ``example_inputs`` (median wall time).
        progress: show progress bars.
        name: model name for the report.

    Returns:
        :class:`RewriteResult` with ``.model`` and ``.report``.
    """
    if not isinstance(model, nn.Module):
        raise DsrewriteError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rank = check_rank(rank)
    if backend not in BACKENDS:
        raise DsrewriteError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    args = as_args(example_inputs)
    work = model if inplace else copy.deepcopy(model)

    notes: List[str] = []
    try:
        gm = fx.symbolic_trace(work)
    except Exception as e:  # noqa: BLE001 - any tracing failure sends us to the fallback route
        gm, trace_error = None, _one_line(e)

    if gm is not None:
        gm.training = work.training
        p = SeparableRewritePass(args, rank, include, exclude, backend, mirror=model if inplace else None,
                                 progress=progress)
        try:
            with eval_mode(gm):
                p(gm)
            flops_before = p.flops_before
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"example inputs do not run through the model: {_one_line(e)}") from None
        new_model, decisions, route = gm, p.decisions, "fx"
    else:
        try:
            new_model, decisions, flops_before, notes = rewrite_untraceable(
                work, args, rank=rank, include=include, exclude=exclude, backend=backend, progress=progress)
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"example inputs do not run through the model: {_one_line(e)}") from None
        route = "fx-submodules+module-swap"
        notes.insert(0, f"symbolic_trace failed on the whole model ({trace_error[:160]})")

    layers = [d.report for d in decisions]
    saved = sum(L.flops_before - L.flops_after for L in layers if L.rewritten)
    report = Report(
        layers=layers, model=name or type(model).__name__, route=route,
        input_shapes=[list(a.shape) if isinstance(a, torch.Tensor) else [type(a).__name__] for a in args],
        params_before=count_params(model), params_after=count_params(new_model),
        flops_before=flops_before, flops_after=flops_before - saved, notes=notes,
    )
    if not layers:
        report.notes.append("no convolution found: nothing to rewrite")
    elif not report.rewritten:
        report.notes.append("no eligible convolution was rewritten: see the reasons per layer")
    if any(L.note and "costs more" in L.note for L in report.rewritten):
        report.notes.append("some rewritten layers cost more than the original (rank at or near full rank)")
    if measure_time:
        _measure(model, new_model, args, report)
    return RewriteResult(new_model, report, decisions)


def _measure(original: nn.Module, new: nn.Module, args: tuple, report: Report) -> None:
    device = input_device(args)
    with eval_mode(original), eval_mode(new):
        before = time_call(original, args)
        after = time_call(new, args)
        before = min(before, time_call(original, args))  # second look at the original: less warm-up bias
    report.time_before_ms, report.time_after_ms = before, after
    report.time_device = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    backends = {getattr(m, "backend", None) for m in new.modules() if hasattr(m, "rank") and hasattr(m, "pointwise")}
    backends.discard(None)
    report.time_backend = "backend=" + ",".join(sorted(backends)) if backends else None
