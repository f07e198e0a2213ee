"""The middle of the compiler, shared by every frontend: select, plan ranks, factorise, describe.

A frontend hands over :class:`~dsrewrite.ir.ConvSite` objects; :func:`plan_sites` returns one
:class:`Decision` per site (a rank and its factors, or a reason to leave the conv alone) together with its
:class:`~dsrewrite.report.LayerReport`. The frontend's backend then writes the factors back.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from . import cost_model as cost
from .allocate import Allocation, allocate_budget, check_fraction, energy_allocation
from .cost_providers import budget_kind
from .eligibility import why_not
from ..calib.solve import whitened_rank_errors
from ..errors import BudgetUnreachable, DsrewriteError
from .factorize import Factors, factorize_layer, lowrank_view, rank_errors
from ..ir import KINDS, ConvSite, ConvSpec
from .policy import RankArg, RankMap, check_rank, choose_rank, plan_kinds
from ..report import LayerReport

__all__ = ["Decision", "Selector", "PlanInputs", "Totals", "plan_sites", "selected", "matcher", "layer_report", "BUDGET_ARGS", "one_budget"]

Selector = Union[None, str, Sequence[str], Callable[[str], bool]]


@dataclass
class Decision:
    """The plan for one conv: ``factors`` (rank, channel ranks) and the depthwise form when rewritten, the
    reason in ``report`` when skipped. Backends build from the decision, never from its report."""

    site: ConvSite
    report: LayerReport
    factors: Optional[Factors] = None
    module: Optional[torch.nn.Module] = None  # the separable module a torch backend installed for it
    gather_input: bool = False  # depthwise form: run it on a gathered copy of the input (chosen by measurement)
    calibrated: bool = False  # factors refitted on this conv's data: never shared with another conv of its weight

    @property
    def rewritten(self) -> bool:
        return self.factors is not None


def matcher(sel: Selector, what: str) -> Optional[Callable[[str], bool]]:
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
    inc, exc = matcher(include, "include"), matcher(exclude, "exclude")
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
        stride=tuple(spec.stride), groups=spec.groups, kind=spec.kind, origin=spec.origin, policy=policy,
        params_before=before_p, params_after=before_p, flops_before=before_f, flops_after=before_f,
    )
    if factors is not None:
        rep.rank = factors.rank
        rep.params_after = cost.separable_params(spec, factors.rank)
        rep.flops_after = cost.separable_flops(spec, factors.rank)
        rep.error = factors.error
        counts = factors.channel_ranks
        if counts is not None:
            rep.channel_ranks = [int(c) for c in counts]
        notes = [spec.extra["folded"]] if spec.extra.get("folded") else []
        if rep.flops_after > rep.flops_before or rep.params_after > rep.params_before:
            notes.append("costs more than the original")
        rep.note = "; ".join(notes) or None
    return rep


@dataclass(frozen=True)
class Totals:
    """What whole-model budgets are fractions of (``None``: the sum over the planned layers)."""

    flops: Optional[float] = None
    params: Optional[float] = None
    time_ms: Optional[float] = None

    def of(self, total_arg: Optional[str]) -> Optional[float]:
        """The total a registered budget names (``"total_flops"``, ``"total_params"``, ``"total_time_ms"``)."""
        return getattr(self, total_arg[len("total_"):], None) if total_arg else None


@dataclass(frozen=True)
class PlanInputs:
    """Everything :func:`plan_sites` decides from beside the sites, passed explicitly and never changed by it.

    What to do: ``rank`` (int, ``"auto"``, ``"full"`` or a mapping ``{glob: rank}``: first match wins, a layer matched
    by none left alone) or one ``budget`` (``(name, fraction)``: ``target_flops``, ``target_params``,
    ``target_latency``, any kind registered in :data:`dsrewrite.plan.cost_providers.BUDGETS`, or ``energy``), the
    layer ``kinds`` (default :func:`dsrewrite.plan.policy.default_kinds`), ``include`` / ``exclude``, ``ragged``
    (spread each layer's depthwise filters over its channels by their spectra), ``strict`` (refuse a budget below
    the smallest reachable instead of planning the cheapest plan). What budgets are fractions of: ``totals``.
    What plans rest on: ``timer`` (a layer timer: ``dense_ms(spec)``, ``separable_ms(spec, rank)``; latency
    budgets), ``stats`` (a site name -> its patch autocorrelation, :func:`dsrewrite.calib.run.collect_patch_stats`:
    errors from the whitened spectrum), ``replay`` (a :class:`dsrewrite.Plan` deciding every site).
    """

    rank: RankArg = "auto"
    budget: Optional[Tuple[str, float]] = None
    kinds: Optional[Sequence[str]] = None
    include: Selector = None
    exclude: Selector = None
    ragged: bool = False
    strict: bool = False
    progress: bool = False
    totals: Totals = field(default_factory=Totals)
    timer: Any = None
    stats: Optional[Dict[str, Any]] = None
    replay: Any = None

    @classmethod
    def from_config(cls, cfg: Any, **measured: Any) -> "PlanInputs":
        """The choices a :class:`~dsrewrite.config.RewriteConfig` makes, plus what a route measured (``totals``,
        ``timer``, ``stats``, ``replay``)."""
        return cls(rank=cfg.rank, budget=cfg.chosen_budget(), kinds=cfg.layer_kinds(), include=cfg.include,
                   exclude=cfg.exclude, ragged=cfg.ragged, strict=cfg.strict, progress=cfg.progress, **measured)

    def replace(self, **changes: Any) -> "PlanInputs":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def of_whole_model(self, flops: Optional[float], params: Optional[float]) -> "PlanInputs":
        """A copy whose budgets are fractions of the whole model: its FLOPs and parameters, where not given."""
        t = self.totals
        return self.replace(totals=dataclasses.replace(t, flops=t.flops or flops, params=t.params or params))


def plan_sites(sites: Iterable[ConvSite], inputs: Optional[PlanInputs] = None,
               notes: Optional[List[str]] = None) -> List[Decision]:
    """Decide and factorise every site (one :class:`Decision` each, a skipped site with its reason: none is dropped
    silently), as ``inputs`` say (:class:`PlanInputs`; default: rank ``"auto"`` on KxK convs).

    Budgets are allocated over all sites at once (:mod:`dsrewrite.plan.allocate`). Best effort: a cost budget
    below the smallest reachable gets the cheapest plan (every layer at its cheapest rank) with a note appended to
    ``notes`` saying it was not met; ``inputs.strict`` refuses it (:class:`~dsrewrite.errors.BudgetUnreachable`). A
    ``target_latency`` the layers would reach if their pairs were timed faster is refused here, for its closed
    loop (:mod:`dsrewrite.timing.loop`) to try; one out of reach whatever the pairs' timings gets the cheapest
    plan, which the loop measures. A ``replay`` plan decides every site (rank, per-channel ranks, depthwise form;
    no budget, rank or kinds); a site it does not know or whose weight shape differs is left alone with the
    reason (the caller checks the fit: :meth:`dsrewrite.Plan.check_fit`).
    """
    inputs = inputs or PlanInputs()
    rank = check_rank(inputs.rank)
    sites = list(sites)
    _mark_tied_weights(sites)
    if inputs.replay is not None:
        return _plan_replay(sites, inputs.replay, inputs.include, inputs.exclude)
    chosen = one_budget(rank, [tuple(inputs.budget)] if inputs.budget is not None else [], inputs.timer)
    kinds = plan_kinds(inputs.kinds, chosen is not None, isinstance(rank, RankMap))
    if chosen is not None:
        return _plan_budget(sites, inputs, *chosen, kinds=kinds, notes=notes)
    decisions = []
    it = sites
    if inputs.progress and len(sites) > 1:  # progress bars only when asked for
        it = tqdm(sites, desc="factorising", unit="conv", leave=False)
    for site in it:
        spec = site.spec
        reason = _skip_reason(site, inputs.include, inputs.exclude, kinds)
        if reason is not None:
            decisions.append(Decision(site, layer_report(spec, reason=reason)))
            continue
        r, policy = choose_rank(spec, rank)
        if r is None:
            decisions.append(Decision(site, layer_report(spec, reason=policy)))
            continue
        factors = factorize_layer(site.weight, r, site.bias, lowrank=spec.lowrank, ragged=inputs.ragged)
        decisions.append(Decision(site, layer_report(spec, rank=r, factors=factors, policy=policy), factors))
    return decisions


def _plan_replay(sites: List[ConvSite], plan, include: Selector, exclude: Selector) -> List[Decision]:
    """Decide every site as ``plan`` (a :class:`dsrewrite.plan.Plan`) says; include/exclude still leave layers
    alone (the module-swap route excludes a layer that breaks the model)."""
    layers = plan.by_name()
    decisions = []
    for site in sites:
        spec = site.spec
        lp = layers.get(spec.name)
        shape = None if site.weight is None else [int(d) for d in site.weight.shape]
        if lp is None:
            reason = "not in the plan"
        elif lp.rank is None:
            reason = lp.reason or "left alone by the plan"
        elif shape != lp.weight_shape:
            reason = f"weight shape {shape} differs from the plan's {lp.weight_shape}"
        else:
            reason = _skip_reason(site, include, exclude, KINDS)
        if reason is not None:
            decisions.append(Decision(site, layer_report(spec, reason=reason)))
            continue
        factors = factorize_layer(site.weight, lp.rank, site.bias, lowrank=spec.lowrank,
                                  channel_ranks=None if spec.lowrank else lp.channel_ranks)
        d = Decision(site, layer_report(spec, rank=lp.rank, factors=factors, policy="plan"), factors,
                     gather_input=bool(lp.gather_input) and not spec.lowrank)
        d.report.gather_input = d.gather_input
        decisions.append(d)
    return decisions


def _skip_reason(site: ConvSite, include: Selector, exclude: Selector, kinds: Sequence[str]) -> Optional[str]:
    """Why the pass leaves this layer alone before any rank is considered, or ``None``."""
    reason = why_not(site.spec, kinds) or selected(site.spec.name, include, exclude)
    if reason is None and site.weight is None:
        reason = "weight is not a constant parameter"
    return reason


def _mark_tied_weights(sites: List[ConvSite]) -> None:
    """Convs that share one weight ``Parameter`` (tied modules) are left alone: rewriting them would untie them."""
    by_weight: dict = {}
    for site in sites:
        if isinstance(site.weight, torch.nn.Parameter):
            by_weight.setdefault(id(site.weight), []).append(site)
    for group in by_weight.values():
        if len(group) > 1:
            names = [g.spec.name for g in group]
            for site in group:
                others = ", ".join(n for n in names if n != site.spec.name)
                site.spec.extra.setdefault("unsupported", f"weight shared with {others}: rewriting would untie it")


# ---------------------------------------------------------------------------------------------- budgets
LATENCY_SLACK = 0.05  # a target_latency out of reach is planned this share of the possible saving short of the floor
BUDGET_ARGS = ("target_flops", "target_params", "target_latency", "energy")
ENERGY = "energy"  # a per-layer policy, not a cost budget: it has no provider (see budget.energy_allocation)


def one_budget(rank, given: List[Tuple[str, float]], timer) -> Optional[Tuple[str, float]]:
    """The one budget among ``given`` (name, value) pairs, checked, or ``None`` when there is none (any kind
    registered in :mod:`dsrewrite.plan.cost_providers`, or ``energy``); ``timer`` truthy when a layer timer will exist."""
    if not given:
        return None
    if len(given) > 1:
        raise DsrewriteError(f"give one budget at a time, got {', '.join(k for k, _ in given)}")
    if rank != "auto":
        raise DsrewriteError(f"give either rank or {given[0][0]}, not both (rank={rank!r})")
    kind, value = given[0]
    value = check_fraction(kind, value)
    if kind != ENERGY and budget_kind(kind).needs_timer and timer is None:
        raise DsrewriteError(f"{kind} needs a layer timer (rewrite(..., {kind}=..., device=...))")
    return kind, value


def _site_errors(site: ConvSite, stats: dict, ragged: bool = False) -> List[float]:
    """Relative error at each rank: whitened (data-aware) when calibration statistics are known."""
    lowrank = site.spec.lowrank
    a = stats.get(site.spec.name)
    if a is not None:
        try:
            return whitened_rank_errors(lowrank_view(site.weight) if lowrank else site.weight, a,
                                        ragged=ragged and not lowrank)
        except (RuntimeError, ValueError):
            pass
    return rank_errors(site.weight, ragged=ragged, lowrank=lowrank)


def _plan_budget(sites: List[ConvSite], inputs: PlanInputs, kind: str, value: float, *, kinds: Sequence[str] = (),
                 notes: Optional[List[str]] = None) -> List[Decision]:
    """Plan under one budget: ``energy`` per layer, any registered cost budget by the one allocator."""
    ragged, strict = inputs.ragged, inputs.strict
    skips = {i: r for i, r in ((i, _skip_reason(s, inputs.include, inputs.exclude, kinds))
                               for i, s in enumerate(sites)) if r is not None}
    eligible = [i for i in range(len(sites)) if i not in skips]
    errors = [_site_errors(sites[i], inputs.stats or {}, ragged) for i in eligible]
    provider = None
    if kind == ENERGY:  # not a cost budget: see budget.energy_allocation
        outcome = [energy_allocation(sites[i].spec, e, value) for i, e in zip(eligible, errors)]
    else:
        registered = budget_kind(kind)
        provider = registered.factory(inputs.timer)
        layers = [(sites[i].spec, e) for i, e in zip(eligible, errors)]
        specs, given_total = [s.spec for s in sites], inputs.totals.of(registered.total_arg)
        try:
            outcome = allocate_budget(layers, provider, kind=kind, target=value, specs=specs, given_total=given_total)
        except BudgetUnreachable as e:
            latency = kind == "target_latency"
            # target_latency: a target that pairs timed faster would reach is the closed loop's to try
            # (latency_loop scales their timings); one no scaling reaches gets the cheapest plan, measured there
            if strict or not e.reachable < 1.0 or (latency and e.scale_to_reach(value) is not None):
                raise
            # latency: a little short of the floor (SLACK of the most it can save), so the allocation gives back
            # the layers that save next to nothing for a large error (a 10-way classifier at rank 1 was seen)
            floor = e.reachable + (LATENCY_SLACK * (1.0 - e.reachable) if latency else 0.0)
            outcome = allocate_budget(layers, provider, kind=kind, target=min(floor, 1.0) * (1 + 1e-9), specs=specs,
                                      given_total=given_total)
            if notes is not None and not latency:  # the closed loop says what the whole model reached
                notes.insert(0, f"{kind}={value:g} NOT MET: the smallest reachable is {e.reachable:.4f} of the "
                                f"model's {provider.quantity}; planned that, the cheapest plan (strict=True refuses)")
    plans = dict(zip(eligible, outcome))
    decisions = []
    for i, site in enumerate(sites):
        spec = site.spec
        a = plans.get(i) or Allocation(reason=skips[i])
        if a.rank is not None:
            factors = factorize_layer(site.weight, a.rank, site.bias, lowrank=spec.lowrank, ragged=ragged)
            d = Decision(site, layer_report(spec, rank=a.rank, factors=factors, policy=kind), factors)
        else:
            d = Decision(site, layer_report(spec, reason=a.reason, policy=kind if a.allocated else None))
        if provider is not None and a.dense is not None:
            provider.annotate(spec, d.report, a.rank, a.dense, a.costs)
            if a.rank is not None:  # the form the layer was costed in is the form it is built in
                d.gather_input = d.report.gather_input = provider.gathers(spec, a.rank)
        decisions.append(d)
    return decisions
