"""The middle of the compiler, shared by every frontend: select, plan ranks, factorise, describe.

A frontend hands over :class:`~dsrewrite.ir.ConvSite` objects; :func:`plan_sites` returns one
:class:`Decision` per site (a rank and its factors, or a reason to leave the conv alone) together with its
:class:`~dsrewrite.report.LayerReport`. The frontend's backend then writes the factors back.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Union

from . import cost
from .eligibility import why_not
from .errors import DsrewriteError
from .factorize import Factors, factorize
from .ir import ConvSite, ConvSpec
from .policy import RankArg, check_rank, choose_rank
from .report import LayerReport

__all__ = ["Decision", "Selector", "plan_sites", "selected", "layer_report"]

Selector = Union[None, str, Sequence[str], Callable[[str], bool]]


@dataclass
class Decision:
    """What the pass does with one conv: ``factors`` set when rewritten, ``reason`` when skipped."""

    site: ConvSite
    report: LayerReport
    factors: Optional[Factors] = None

    @property
    def rewritten(self) -> bool:
        return self.factors is not None


def _matcher(sel: Selector, what: str) -> Optional[Callable[[str], bool]]:
    if sel is None:
        return None
    if callable(sel):
        return sel
    if isinstance(sel, str):
        sel = [sel]
    try:
        patterns = list(sel)
    except TypeError:
        raise DsrewriteError(f"{what} must be a glob pattern, a list of patterns or a callable, got {type(sel).__name__}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise DsrewriteError(f"{what} patterns must be strings, got {p!r}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selected(name: str, include: Selector = None, exclude: Selector = None) -> Optional[str]:
    """``None`` if the conv ``name`` is selected by include/exclude, otherwise the reason it is not."""
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude")
    if inc is not None and not inc(name):
        return "not matched by include"
    if exc is not None and exc(name):
        return "matched by exclude"
    return None


def layer_report(spec: ConvSpec, *, rank: Optional[int] = None, factors: Optional[Factors] = None,
                 reason: Optional[str] = None, policy: Optional[str] = None) -> LayerReport:
    """Per-layer report entry from the cost model (the one place both frontends get their numbers)."""
    before_p, before_f = cost.dense_params(spec), cost.dense_flops(spec)
    rep = LayerReport(
        name=spec.name, rewritten=factors is not None, reason=reason, rank=rank,
        in_channels=spec.in_channels, out_channels=spec.out_channels, kernel=tuple(spec.kernel),
        stride=tuple(spec.stride), groups=spec.groups, kind=spec.kind, policy=policy,
        params_before=before_p, params_after=before_p, flops_before=before_f, flops_after=before_f,
    )
    if factors is not None:
        rep.rank = factors.rank
        rep.params_after = cost.separable_params(spec, factors.rank)
        rep.flops_after = cost.separable_flops(spec, factors.rank)
        rep.error = factors.error
        if rep.flops_after > rep.flops_before or rep.params_after > rep.params_before:
            rep.note = "costs more than the original"
    return rep


def plan_sites(sites: Iterable[ConvSite], rank: RankArg = "auto", include: Selector = None,
               exclude: Selector = None, progress: bool = False) -> List[Decision]:
    """Decide and factorise every site. Skipped sites carry their reason; none is dropped silently."""
    rank = check_rank(rank)
    sites = list(sites)
    decisions = []
    it = sites
    if progress and len(sites) > 1:
        from tqdm.auto import tqdm

        it = tqdm(sites, desc="factorising", unit="conv", leave=False)
    for site in it:
        spec = site.spec
        reason = why_not(spec) or selected(spec.name, include, exclude)
        if reason is None and site.weight is None:
            reason = "weight is not a constant parameter"
        if reason is not None:
            decisions.append(Decision(site, layer_report(spec, reason=reason)))
            continue
        r, policy = choose_rank(spec, rank)
        if r is None:
            decisions.append(Decision(site, layer_report(spec, reason=policy)))
            continue
        factors = factorize(site.weight, r, site.bias)
        decisions.append(Decision(site, layer_report(spec, rank=r, factors=factors, policy=policy), factors))
    return decisions
