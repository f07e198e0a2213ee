"""The per-layer self-check: a rewritten layer ships only if its pair, made exact, reproduces the original.

For each rewritten decision, the pair is rebuilt with the same settings (stride, padding, dilation, padding
mode, dynamic 'same' padding) from the *exact* factorisation (:func:`~dsrewrite.factorize.exact_factors`),
run in float64 on the input the original layer saw in the example forward, and compared with the output the
original layer gave there. A mismatch means the frontend misread the layer (a subclass, a run-time weight, a
padding rule): the layer is then skipped with the reason, never shipped. Cheap: one conv per layer, on one
item of the batch.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .errors import DsrewriteError, first_line
from .factorize import Factors, exact_factors
from .pipeline import Decision, layer_report

__all__ = ["self_check", "check_runs", "tolerance"]


def tolerance(y: torch.Tensor) -> float:
    """Relative error the original's own arithmetic allows: 16-bit and TF32 convs round more than fp32."""
    if y.dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    if y.is_cuda and torch.backends.cudnn.allow_tf32:
        return 1e-2
    return 1e-4


def _compare(module: nn.Module, probe: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[Optional[float], str]:
    """(relative error, "") of ``module`` on the probe, or (None, why it could not be compared)."""
    x, y = probe
    with torch.no_grad():
        try:
            out = module.double()(x.double())
        except Exception as e:  # noqa: BLE001 - a pair that does not run on the layer's input is a failure too
            return None, f"the pair does not run on the layer's input ({first_line(e, 120, typed=True)})"
    if out.shape != y.shape:
        return None, f"output shape {tuple(out.shape)} instead of {tuple(y.shape)}"
    ref = y.double()
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return (diff / scale if scale > 0 else diff), ""


def self_check(decisions: List[Decision], build: Callable[[Decision, Factors], nn.Module]) -> str:
    """Check every rewritten decision that has a probe; skip the failing ones (with the reason). Returns a
    report note. ``build(decision, factors)`` is the backend's pair factory (same settings as it installs)."""
    checked, worst, failed, unknown = 0, 0.0, [], 0
    for d in decisions:
        if not d.rewritten:
            continue
        probe = d.site.probe
        if probe is None:
            unknown += 1
            continue
        exact = exact_factors(torch.as_tensor(d.site.weight), None if d.site.bias is None else torch.as_tensor(d.site.bias))
        err, why = _compare(build(d, exact).to(device=probe[0].device), probe)
        tol = tolerance(probe[1])
        if err is not None and err <= tol:
            checked += 1
            worst = max(worst, err)
            continue
        reason = f"self-check failed ({why})" if err is None else f"self-check failed (rel. error {err:.2g} > {tol:g})"
        d.report = layer_report(d.site.spec, reason=reason)
        d.factors = None
        failed.append(d.site.spec.name)
    note = f"self-check: {checked} rewritten layer(s) reproduce the original exactly at full rank (max rel. error {worst:.1e})"
    if failed:
        note += f"; {len(failed)} failed and were left dense: {', '.join(failed[:6])}{', ...' if len(failed) > 6 else ''}"
    if unknown:
        note += f"; {unknown} not checked (no example input reached them)"
    return note


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
        where = f" (last rewritten layer entered: {current[-1]})" if current else ""
        raise DsrewriteError(f"the rewritten model fails on the example inputs, which the original runs: "
                             f"{first_line(e, 160, typed=True)}{where}; this is a dsrewrite bug, please report it "
                             "(exclude= that layer to work around it)") from None
    finally:
        for h in handles:
            h.remove()
