"""Fallback frontend for models ``torch.fx.symbolic_trace`` cannot trace (e.g. torchvision detectors).

Runs the real forward once with hooks, recording each module's inputs and each conv's output shapes.
Then, top-down: a child called once with positional inputs that traces becomes a GraphModule handled by
the fx frontend (so functional convs inside it are found too); a conv module anywhere else is swapped in
place. Ranks are planned over all sites at once, the same as on the fx route.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from ..backends.fx import apply_decisions, separable_for, set_submodule
from ..ir import ConvSite
from ..measure import count_params, eval_mode
from ..pipeline import Decision, Selector, plan_sites
from ..policy import RankArg
from ..selfcheck import self_check
from .conv_modules import CONV_MODULE_TYPES, TRANSPOSED_TYPES
from .fx import ProbeProp, collect_sites, first_item, may_rewrite, module_site, trace

__all__ = ["rewrite_untraceable"]


class _Record:
    def __init__(self) -> None:
        self.calls = 0
        self.args: Tuple[Any, ...] = ()
        self.has_kwargs = False
        self.out_shapes: List[Tuple[int, ...]] = []
        self.probe: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # first call: input and output sample


def _record(model: nn.Module, args: Sequence[Any]) -> Tuple[Dict[nn.Module, _Record], int]:
    """One real forward with hooks: per-module call records; returns them and the whole-model FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    recs: Dict[nn.Module, _Record] = {}
    handles = []

    def pre(mod, a, kw):
        r = recs.setdefault(mod, _Record())
        r.calls += 1
        if r.calls == 1:
            r.args, r.has_kwargs = a, bool(kw)

    def post(mod, a, out):
        if isinstance(out, torch.Tensor):
            r = recs.setdefault(mod, _Record())
            r.out_shapes.append(tuple(out.shape))
            if r.probe is None and a and isinstance(a[0], torch.Tensor) and may_rewrite(
                    mod.groups, mod.kernel_size, isinstance(mod, TRANSPOSED_TYPES)):
                dims = len(mod.kernel_size)
                r.probe = (first_item(a[0], dims), first_item(out, dims))

    for m in model.modules():
        if m is model:
            continue
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        if isinstance(m, CONV_MODULE_TYPES):
            handles.append(m.register_forward_hook(post))
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return recs, int(counter.get_total_flops())


def _swap_site(qualname: str, conv: nn.Module, rec: _Record) -> ConvSite:
    site = module_site(qualname, conv, [], out_shapes=rec.out_shapes)
    site.probe = rec.probe
    return site


def rewrite_untraceable(model: nn.Module, args: Sequence[Any], *, rank: RankArg, include: Selector,
                        exclude: Selector, backend: str, progress: bool = False, **plan_kwargs: Any
                        ) -> Tuple[nn.Module, List[Decision], int, List[str]]:
    """Rewrite ``model`` in place through sub-module tracing and module swaps.

    ``plan_kwargs`` go to :func:`~dsrewrite.pipeline.plan_sites` (budgets: the whole model is the total).
    Returns ``(model, decisions, whole-model FLOPs of the original, notes)``.
    """
    recs, flops = _record(model, args)
    traced: List[Tuple[str, fx.GraphModule, List[ConvSite]]] = []
    swaps: List[ConvSite] = []
    ordered: List[ConvSite] = []  # tree order, for the report

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            q = f"{prefix}.{name}" if prefix else name
            if next(child.parameters(), None) is None:
                continue
            rec = recs.get(child, _Record())
            if isinstance(child, CONV_MODULE_TYPES):
                swaps.append(_swap_site(q, child, rec))
                ordered.append(swaps[-1])
                continue
            if rec.calls == 1 and not rec.has_kwargs:
                try:
                    gm = trace(child)
                    prop = ProbeProp(gm)
                    # ShapeProp prints a traceback before re-raising: a sub-module that does not run traced is
                    # visited further down instead, which is no error
                    with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                        prop.propagate(*rec.args)
                except Exception:
                    gm = None
                if gm is not None:
                    gm.training = child.training
                    sites = collect_sites(gm, prop.probes)
                    for s in sites:
                        s.spec.name = f"{q}.{s.spec.name}"
                    traced.append((q, gm, sites))
                    ordered.extend(sites)
                    continue
            visit(child, q)

    visit(model, "")
    plan_kwargs.setdefault("total_flops", flops)  # budgets are fractions of the whole model
    plan_kwargs.setdefault("total_params", count_params(model))
    decisions = plan_sites(ordered, rank, include, exclude, progress=progress, **plan_kwargs)
    check_note = self_check(decisions, lambda d, f: separable_for(d, backend="torch", factors=f))
    by_site = {id(d.site): d for d in decisions}
    used = []
    for q, gm, sites in traced:
        # a sub-module becomes a GraphModule only where something in it was rewritten
        if apply_decisions(gm, [by_site[id(s)] for s in sites], backend=backend):
            set_submodule(model, q, gm)
            used.append(q)
    for site in swaps:
        d = by_site[id(site)]
        if d.rewritten:
            d.module = separable_for(d, backend=backend)
            set_submodule(model, site.handle.target, d.module)
    notes = [
        f"rewrote {len(used)} traced sub-module(s) with torch.fx"
        + (f" ({', '.join(used[:6])}{', ...' if len(used) > 6 else ''})" if used else "")
        + f"; swapped {sum(1 for s in swaps if by_site[id(s)].rewritten)} conv module(s) in place;"
        " FLOPs from hooks on the real forward",
        check_note,
    ]
    return model, decisions, flops, notes
