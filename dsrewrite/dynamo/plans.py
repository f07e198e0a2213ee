"""Plans: the ranks and factors chosen for one captured graph, cached per backend so recompiles reuse them.

Dynamo recompiles a graph for new shapes (a new batch size); while every layer's weight is the same tensor,
unchanged, and the options are the same, the recompile replays the plan (same ranks, same pair modules: separable
or low-rank, new FLOP counts) instead of factorising again. Each :class:`~dsrewrite.dynamo.backend.DsrewriteBackend` owns a
:class:`PlanCache`; :func:`clear_all` empties every live one.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from torch import nn

from ..plan.factorize import Factors
from ..ir import ConvSite
from ..plan.planner import Decision, layer_report
from .guards import WeightGuard

__all__ = ["Plan", "PlanCache", "clear_all", "replay"]

_CACHES: "weakref.WeakSet[PlanCache]" = weakref.WeakSet()


@dataclass
class Plan:
    """Ranks and factors of one graph's layers. Recompiles of the graph (new shapes) reuse them while every
    layer's weight is the same tensor, unchanged; the pair modules (``SeparableConv*d``, ``LowRank*``) are shared
    by those compiled graphs."""

    options_key: tuple
    names: Tuple[str, ...]
    layers: List[Tuple[Any, Optional[Factors]]]  # per site: its first LayerReport, factors (views of the module's)
    weights: WeightGuard  # per site: what the factors came from, the separable module or None
    keep: list  # objects whose id() is in options_key

    @classmethod
    def of(cls, decisions: Sequence[Decision], sites: Sequence[ConvSite], options_key: tuple, keep: list,
           calibrated: bool) -> "Plan":
        """What was decided, with factors that are views of the modules' tensors (what the graph runs)."""
        modules: List[Optional[nn.Module]] = []
        layers = []
        for d in decisions:
            m = d.module if d.rewritten and d.site.handle.kind == "module" else None
            modules.append(m)
            layers.append((d.report, None if m is None else m.factors(d.factors.error)))
        return cls(options_key, tuple(s.spec.name for s in sites), layers, WeightGuard.of(sites, modules, calibrated),
                   keep)

    @property
    def modules(self) -> List[Optional[nn.Module]]:
        """Per site: the pair module (separable or low-rank) holding its factors, or ``None``."""
        return self.weights.modules

    def matches(self, options_key: tuple, sites: Sequence[ConvSite]) -> bool:
        """Whether this plan holds for ``sites`` under these options: same convs, same unchanged weights."""
        return (self.options_key == options_key and self.names == tuple(s.spec.name for s in sites)
                and self.weights.unchanged(sites))


class PlanCache:
    """The most recent plans of one backend (bounded: least recently used dropped first)."""

    def __init__(self, max_plans: int = 16) -> None:
        self.max_plans = max_plans
        self._plans: "OrderedDict[int, Plan]" = OrderedDict()
        _CACHES.add(self)

    def __len__(self) -> int:
        return len(self._plans)

    def find(self, options_key: tuple, sites: Sequence[ConvSite]) -> Optional[Plan]:
        """The newest plan that holds for ``sites`` under these options, or ``None``."""
        for k, plan in reversed(self._plans.items()):
            if plan.matches(options_key, sites):
                self._plans.move_to_end(k)
                return plan
        return None

    def store(self, plan: Plan) -> None:
        """Remember ``plan``, forgetting the oldest beyond ``max_plans``."""
        self._plans[id(plan)] = plan
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        """Forget every plan: the next compile factorises again."""
        self._plans.clear()


def clear_all() -> None:
    """Empty every live :class:`PlanCache` (every backend's)."""
    for cache in list(_CACHES):
        cache.clear()


def replay(plan: Plan, sites: Sequence[ConvSite]) -> List[Decision]:
    """The plan's decisions on this graph's sites (new shapes, so new FLOPs), without factorising."""
    decisions = []
    for s, (old, f) in zip(sites, plan.layers):
        if f is not None:
            rep = layer_report(s.spec, rank=f.rank, factors=f, policy=old.policy)
        else:
            rep = layer_report(s.spec, reason=old.reason, policy=old.policy)
        rep.note, rep.gather_input = old.note, old.gather_input
        rep.calib_error_before, rep.calib_error_after = old.calib_error_before, old.calib_error_after
        decisions.append(Decision(s, rep, f, gather_input=old.gather_input))
    return decisions
