"""Cost providers for budgets: what a layer costs in one unit, and the registry of budget kinds.

A budget (``target_flops=0.5``) is a fraction of the whole model's cost in some unit. A
:class:`CostProvider` prices a conv dense and as a separable pair at the ranks it can cost;
:func:`dsrewrite.plan.allocate.allocate_budget` turns any provider's prices and the layers' error curves into ranks.
:data:`BUDGETS` maps a budget name to its provider factory: a new budget kind is one provider class and one
:func:`register_budget` call (here, or in the caller's code).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from . import cost_model as cost
from ..errors import DsrewriteError
from ..ir import ConvSpec
from ..report import LayerReport

__all__ = ["CostProvider", "FlopCost", "ParamCost", "LatencyCost", "BudgetKind", "BUDGETS", "register_budget",
           "budget_kind", "pair_words"]


class CostProvider(ABC):
    """Prices a conv (dense, and separable at a rank) in one unit, for the budget allocator.

    ``name`` is the unit in messages ("left dense ... per FLOP saved"); ``quantity`` names the whole model's
    total ("the smallest reachable is 0.32 of the model's FLOPs").
    """

    name: str = "unit"
    quantity: str = "cost"

    @abstractmethod
    def dense(self, spec: ConvSpec) -> Optional[float]:
        """Cost of the original conv; ``None`` when it cannot be costed (:meth:`why_not` says why)."""

    def why_not(self, spec: ConvSpec) -> Optional[str]:
        """Why :meth:`dense` is ``None`` for ``spec`` (a skip reason for the report)."""
        return f"cannot count the layer's {self.quantity}"

    @abstractmethod
    def candidates(self, spec: ConvSpec) -> List[int]:
        """The ranks this provider can cost (the allocator keeps those cheaper than dense)."""

    @abstractmethod
    def separable(self, spec: ConvSpec, rank: int) -> Optional[float]:
        """Cost of the separable pair at ``rank`` (``None``: not costed, never chosen)."""

    def total(self, specs: Sequence[ConvSpec], dense: Sequence[float], given: Optional[float]) -> float:
        """The whole model's cost: ``given`` by the caller, else the sum over all convs ``specs``.

        ``dense`` holds the dense costs of the layers that took part in the allocation.
        """
        return given if given else sum(self.dense(s) or 0 for s in specs)

    def no_saving(self, spec: ConvSpec, dense: float, costs: Mapping[int, Optional[float]]) -> str:
        """Skip reason when no candidate rank is cheaper than the dense conv (the break-even rank of the layer's
        pair: ``Cout*K/(K+Cout)`` separable, ``Cin*Cout/(Cin+Cout)`` low rank)."""
        return f"{pair_words(spec)} saves nothing (break-even rank {cost.breakeven_rank(spec):.2f} <= 1)"

    def annotate(self, spec: ConvSpec, report: LayerReport, rank: Optional[int], dense: float,
                 costs: Mapping[int, Optional[float]]) -> None:
        """Per-layer extras for the report of a layer this provider costed (``rank`` ``None``: kept dense)."""

    def gathers(self, spec: ConvSpec, rank: int) -> bool:
        """The depthwise form the layer was costed in: ``True`` for a gathered input (see
        :class:`~dsrewrite.modules.SeparableConv2d`); the plan builds the layer in that form."""
        return False


def pair_words(spec: ConvSpec) -> str:
    """What the layer would become, in a skip reason: ``"separable form"`` or ``"low-rank pair"``."""
    return "low-rank pair" if spec.lowrank else "separable form"


def _all_ranks(spec: ConvSpec) -> List[int]:
    return list(range(1, spec.full_rank + 1))


class FlopCost(CostProvider):
    """FLOPs over all calls (:func:`dsrewrite.plan.cost_model.dense_flops`); layers of unknown output shape are skipped."""

    name, quantity = "FLOP", "FLOPs"

    def dense(self, spec: ConvSpec) -> Optional[float]:
        return cost.dense_flops(spec) or None

    def why_not(self, spec: ConvSpec) -> Optional[str]:
        return "output shape unknown: no FLOPs to count"

    def candidates(self, spec: ConvSpec) -> List[int]:
        return _all_ranks(spec)

    def separable(self, spec: ConvSpec, rank: int) -> Optional[float]:
        return cost.separable_flops(spec, rank)


class ParamCost(CostProvider):
    """Parameters (weights and bias) of the conv and of the separable pair."""

    name, quantity = "parameter", "parameters"

    def dense(self, spec: ConvSpec) -> Optional[float]:
        return cost.dense_params(spec)

    def candidates(self, spec: ConvSpec) -> List[int]:
        return _all_ranks(spec)

    def separable(self, spec: ConvSpec, rank: int) -> Optional[float]:
        return cost.separable_params(spec, rank)


class LatencyCost(CostProvider):
    """Measured milliseconds from a layer timer (:class:`dsrewrite.timing.layers.LayerTimer`, or anything with
    ``dense_ms(spec)`` and ``separable_ms(spec, rank)``; an optional ``gathered(spec, rank)`` picks the
    depthwise form). Layers measured slower at every candidate rank are left dense, saying so. 1x1 convs and
    linear layers are timed as their low-rank pairs (``separable_ms`` of a low-rank spec), at
    :func:`~dsrewrite.plan.cost_model.candidate_ranks`' geometric ranks below the break-even rank."""

    name, quantity = "millisecond", "measured time"

    def __init__(self, timer: Any) -> None:
        self.timer = timer
        # a minimal timer (one depthwise form) has no gathered(); the report then keeps gather_input=False
        self._gathered: Optional[Callable[[ConvSpec, int], bool]] = getattr(timer, "gathered", None)

    def dense(self, spec: ConvSpec) -> Optional[float]:
        return self.timer.dense_ms(spec)

    def why_not(self, spec: ConvSpec) -> Optional[str]:
        return "output shape unknown: cannot time the layer"

    def candidates(self, spec: ConvSpec) -> List[int]:
        return cost.candidate_ranks(spec)

    def separable(self, spec: ConvSpec, rank: int) -> Optional[float]:
        return self.timer.separable_ms(spec, rank)

    def total(self, specs: Sequence[ConvSpec], dense: Sequence[float], given: Optional[float]) -> float:
        # the model's measured time, at least the layers' own (timed alone, they may add up to more)
        return max(given or 0.0, sum(dense))

    def no_saving(self, spec: ConvSpec, dense: float, costs: Mapping[int, Optional[float]]) -> str:
        timed = {r: c for r, c in costs.items() if c is not None}
        if not timed:
            return super().no_saving(spec, dense, costs)
        best = min(timed, key=timed.__getitem__)
        return (f"{pair_words(spec)} measured slower than the original "
                f"({timed[best]:.3f} ms at rank {best} vs {dense:.3f} ms)")

    def gathered(self, spec: ConvSpec, rank: int) -> bool:
        """Whether the pair at ``rank`` runs its depthwise conv on a gathered input (the form it was timed in);
        never for a low-rank pair, which has no gathered form."""
        return not spec.lowrank and self._gathered is not None and bool(self._gathered(spec, rank))

    def annotate(self, spec: ConvSpec, report: LayerReport, rank: Optional[int], dense: float,
                 costs: Mapping[int, Optional[float]]) -> None:
        report.time_before_ms = dense
        report.time_after_ms = dense if rank is None else costs[rank]

    def gathers(self, spec: ConvSpec, rank: int) -> bool:
        return self.gathered(spec, rank)


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BudgetKind:
    """A budget the planner knows: its provider factory (called with the plan's layer timer, or ``None``),
    the :func:`~dsrewrite.plan.planner.plan_sites` keyword holding the whole model's total, if any, and whether
    it cannot work without a timer."""

    factory: Callable[[Any], CostProvider]
    total_arg: Optional[str] = None
    needs_timer: bool = False


BUDGETS: Dict[str, BudgetKind] = {}


def register_budget(name: str, factory: Callable[[Any], CostProvider], *, total_arg: Optional[str] = None,
                    needs_timer: bool = False) -> None:
    """Make ``plan_sites(..., budget=(name, fraction))`` allocate ranks by ``factory(timer)``'s costs."""
    BUDGETS[name] = BudgetKind(factory, total_arg, needs_timer)


def budget_kind(name: str) -> BudgetKind:
    """The registered budget ``name``; a one-line error naming the known ones otherwise."""
    try:
        return BUDGETS[name]
    except KeyError:
        raise DsrewriteError(f"unknown budget {name!r} (known: {', '.join(sorted(BUDGETS))})") from None


register_budget("target_flops", lambda timer: FlopCost(), total_arg="total_flops")
register_budget("target_params", lambda timer: ParamCost(), total_arg="total_params")
register_budget("target_latency", LatencyCost, total_arg="total_time_ms", needs_timer=True)
