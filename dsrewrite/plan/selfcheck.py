"""The per-layer self-check: a rewritten layer ships only if its pair, made exact, reproduces the original.

For each rewritten decision, the pair is rebuilt with the same settings (stride, padding, dilation, padding
mode, dynamic 'same' padding) from the *exact* factorisation (:func:`~dsrewrite.plan.factorize.exact_factors`),
run in float64 on the input the original layer saw in the example forward, and compared with the output the
original layer gave there. A mismatch means the frontend misread the layer (a subclass, a run-time weight, a
padding rule): the layer is then skipped with the reason, never shipped. Cheap: the torch routes keep a
bounded :class:`~dsrewrite.frontends.fx.Probe` of one batch item (its corners and middle, see
:func:`~dsrewrite.frontends.fx.bounded_probe`), so the pair runs on a few small crops, and its output shape on
the whole input is checked on the ``meta`` device; a plain ``(input, output)`` tuple is checked whole.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import RewrittenModelFails, first_line, raise_if_out_of_memory
from .factorize import Factors, exact_factors
from ..frontends.fx import Probe
from .planner import Decision, layer_report

__all__ = ["self_check", "check_runs", "tolerance", "Tally"]


def tolerance(y: torch.Tensor) -> float:
    """Relative error the original's own arithmetic allows: 16-bit and TF32 convs round more than fp32."""
    if y.dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    if y.is_cuda and torch.backends.cudnn.allow_tf32:
        return 1e-2
    return 1e-4


def _as_probe(probe: Union[Probe, Tuple[torch.Tensor, torch.Tensor]]) -> Probe:
    """A site's probe as a :class:`Probe` (other routes may keep a plain ``(input, output)`` tuple)."""
    return probe if isinstance(probe, Probe) else Probe.whole(*probe)


def _meta_shape(module: nn.Module, shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[int, ...]:
    """The output shape of ``module`` on an input of ``shape``, run on the ``meta`` device (no data, no copy)."""
    state = {k: torch.empty_like(v, device="meta")
             for k, v in (*module.named_parameters(), *module.named_buffers())}
    out = torch.func.functional_call(module, state, (torch.empty(shape, dtype=dtype, device="meta"),))
    return tuple(out.shape)


def _compare(module: nn.Module, probe: Union[Probe, Tuple[torch.Tensor, torch.Tensor]]
             ) -> Tuple[Optional[float], str]:
    """(relative error, "") of ``module`` on the probe, or (None, why it could not be compared): the output shape
    on the whole input first, then the values on every window, one relative error over all of them."""
    probe = _as_probe(probe)
    module = module.double()
    with torch.no_grad():
        try:
            shape = _meta_shape(module, probe.in_shape, torch.float64)
            outs = [module(w.x.double()) for w in probe.windows]
        except Exception as e:  # noqa: BLE001 - a pair that does not run on the layer's input is a failure too
            raise_if_out_of_memory(e)  # the machine's limit, not the layer's: no verdict on the pair
            return None, f"the pair does not run on the layer's input ({first_line(e, 120, typed=True)})"
        if shape != probe.out_shape:
            return None, f"output shape {shape} instead of {probe.out_shape}"
        diff = scale = 0.0
        for w, out in zip(probe.windows, outs):
            dims = w.y.shape[w.y.dim() - len(w.start):]
            out = out[(..., *(slice(s, s + n) for s, n in zip(w.start, dims)))]
            if out.shape != w.y.shape:  # the crop gives fewer positions than the whole input would
                return None, f"output shape {tuple(out.shape)} instead of {tuple(w.y.shape)} on a crop"
            ref = w.y.double()
            scale += ref.square().sum().item()
            diff += (out - ref).square().sum().item()
    return (diff ** 0.5 / scale ** 0.5 if scale > 0 else diff ** 0.5), ""


class Tally:
    """The verdicts of one self-check over many layers, and its report note (shared by every route)."""

    def __init__(self) -> None:
        self.checked, self.worst, self.failed = 0, 0.0, []

    def judge(self, d: Decision, err: Optional[float], why: str, tol: float) -> None:
        """Pass the layer, or turn its decision into a skip with the reason."""
        if err is not None and err <= tol:
            self.checked += 1
            self.worst = max(self.worst, err)
            return
        reason = f"self-check failed ({why})" if err is None else f"self-check failed (rel. error {err:.2g} > {tol:g})"
        d.report = layer_report(d.site.spec, reason=reason)
        d.factors = None
        self.failed.append(d.site.spec.name)

    def note(self, unchecked: Sequence[Tuple[int, str]] = ()) -> str:
        """``self-check: N ... reproduce the original``; the failures; each ``(count, why)`` not checked."""
        note = (f"self-check: {self.checked} rewritten layer(s) reproduce the original exactly at full rank "
                f"(max rel. error {self.worst:.1e})")
        if self.failed:
            more = ", ..." if len(self.failed) > 6 else ""
            note += f"; {len(self.failed)} failed and were left dense: {', '.join(self.failed[:6])}{more}"
        for count, why in unchecked:
            if count:
                note += f"; {count} not checked ({why})"
        return note


def self_check(decisions: List[Decision], build: Callable[[Decision, Factors], nn.Module]) -> str:
    """Check every rewritten decision that has a probe; skip the failing ones (with the reason). Returns a
    report note. ``build(decision, factors)`` is the backend's pair factory (same settings as it installs).
    Every decision's probe is dropped once judged (and those of decisions not rewritten), so no sample outlives
    the check."""
    tally, unknown = Tally(), 0
    for d in decisions:
        probe, d.site.probe = d.site.probe, None  # the samples are not kept with the result
        if not d.rewritten:
            continue
        if probe is None:
            unknown += 1
            continue
        probe = _as_probe(probe)
        window = probe.windows[0]
        err, why = _compare(build(d, exact_factors(d.site.weight, d.site.bias,
                                                  lowrank=d.site.spec.lowrank)).to(device=window.x.device), probe)
        tally.judge(d, err, why, tolerance(window.y))
        del probe, window
    return tally.note([(unknown, "no example input reached them")])


def check_runs(model: nn.Module, args: tuple, modules: List[Tuple[str, nn.Module]]) -> None:
    """Run the rewritten model once; if it fails, name the rewritten layer it failed in (or after)."""
    current: List[str] = []
    handles = []
    for name, m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: current.append(name)))
    try:
        with torch.no_grad():
            model(*args)
    except Exception as e:  # noqa: BLE001
        cause = first_line(e, 160, typed=True, cut_mark="...")
        raise_if_out_of_memory(e)
        layer = current[-1] if current else None
        where = (f" (last rewritten layer entered: {layer}); exclude={layer!r} works around it" if layer else
                 "; exclude= the layers it reads to work around it")
        raise RewrittenModelFails(f"the rewritten model fails on the example inputs, which the original runs: "
                                  f"{cause}{where}; this is a dsrewrite bug, please report it", layer, cause) from None
    finally:
        for h in handles:
            h.remove()
