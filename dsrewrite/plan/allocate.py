"""Budgeted rank allocation: per-layer ranks that meet a whole-model budget with the least total error.

Each eligible conv offers options: stay dense (cost ``dense``, error 0) or a rank ``r`` whose cost is below
``dense`` (error ``e_r^2``, the squared relative error at that rank, from the weight spectrum or, with
calibration data, the whitened spectrum). Minimising ``sum e^2`` subject to ``sum cost <= budget`` is a
multiple-choice knapsack; :func:`allocate` solves it greedily on the lower convex hull of each layer's
(cost, error) points, always taking the step with the least error added per unit of cost saved, then gives
back rank where the budget still holds. Cost is FLOPs, parameters or measured milliseconds alike: any
:class:`~dsrewrite.plan.cost_providers.CostProvider` prices the layers for :func:`allocate_budget`, the one allocator.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import cost_model as cost
from .cost_providers import CostProvider
from ..errors import BudgetUnreachable, DsrewriteError
from ..ir import ConvSpec

__all__ = ["Option", "LayerOptions", "allocate", "smallest_cost", "energy_rank", "check_fraction",
           "budget_ranks", "BudgetEntry", "Allocation", "allocate_budget", "energy_allocation"]


@dataclass
class Option:
    """One way to run a layer: at ``rank`` it costs ``cost`` and adds ``error`` (squared relative error)."""

    rank: int
    cost: float
    error: float


@dataclass
class LayerOptions:
    """A layer's dense cost and its cheaper separable options (any order)."""

    key: int
    dense: float
    options: List[Option] = field(default_factory=list)


def check_fraction(name: str, value) -> float:
    """Validate a budget fraction in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise DsrewriteError(f"{name} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise DsrewriteError(f"{name} must be in (0, 1], got {value}")
    return value


def _hull(layer: LayerOptions) -> List[Option]:
    """Lower convex hull of (cost saved, error) from the dense point on: options by falling cost, rising slope."""
    pts = sorted((o for o in layer.options if o.cost < layer.dense), key=lambda o: (o.cost, o.error))
    pareto: List[Option] = []
    for o in pts:  # cheapest first: keep an option only if it beats every cheaper one on error
        if not pareto or o.error < pareto[-1].error:
            pareto.append(o)
    pareto.reverse()
    xy = lambda o: (layer.dense - o.cost, o.error)  # noqa: E731
    hull: List[Option] = []
    for o in pareto:
        p = xy(o)
        while hull:
            a = (0.0, 0.0) if len(hull) == 1 else xy(hull[-2])
            b = xy(hull[-1])
            if (b[1] - a[1]) * (p[0] - a[0]) >= (p[1] - a[1]) * (b[0] - a[0]):
                hull.pop()  # b lies on or above the segment a -> p
            else:
                break
        hull.append(o)
    return hull


def smallest_cost(layers: Sequence[LayerOptions]) -> float:
    """The least total cost reachable (each layer at its cheapest option or dense)."""
    return sum(min([layer.dense] + [o.cost for o in layer.options]) for layer in layers)


def allocate(layers: Sequence[LayerOptions], saving: float) -> Dict[int, Optional[Option]]:
    """Choose an option (or ``None`` = dense) per layer so total cost drops by at least ``saving``.

    Greedy on error added per cost saved along each layer's convex hull, then a give-back pass that raises
    ranks (least error first) while the saving still holds. Raises ``ValueError`` if ``saving`` cannot be met.
    """
    choice: Dict[int, Optional[Option]] = {layer.key: None for layer in layers}
    if saving <= 0:
        return choice
    hulls = {layer.key: _hull(layer) for layer in layers}
    dense = {layer.key: layer.dense for layer in layers}
    max_saving = sum(dense[k] - (h[-1].cost if h else dense[k]) for k, h in hulls.items())
    if max_saving < saving * (1 - 1e-12):
        raise ValueError("budget not reachable")
    heap: List[Tuple[float, int, int]] = []
    pos = {k: -1 for k in hulls}

    def push(k: int) -> None:
        h, i = hulls[k], pos[k] + 1
        if i < len(h):
            cur_cost = dense[k] if i == 0 else h[i - 1].cost
            cur_err = 0.0 if i == 0 else h[i - 1].error
            slope = (h[i].error - cur_err) / max(cur_cost - h[i].cost, 1e-300)
            heapq.heappush(heap, (slope, k, i))

    for k in hulls:
        push(k)
    saved = 0.0
    while saved < saving and heap:
        _, k, i = heapq.heappop(heap)
        prev_cost = dense[k] if i == 0 else hulls[k][i - 1].cost
        saved += prev_cost - hulls[k][i].cost
        pos[k] = i
        choice[k] = hulls[k][i]
        push(k)
    # give back: the last step may overshoot; raise ranks where the budget still holds
    by_key = {layer.key: layer for layer in layers}
    improved = True
    while improved:
        improved = False
        best = None
        for k, cur in choice.items():
            if cur is None:
                continue
            for o in by_key[k].options + [Option(0, dense[k], 0.0)]:
                extra = o.cost - cur.cost
                gain = cur.error - o.error
                if gain > 0 and saved - extra >= saving and o.cost <= dense[k]:
                    score = gain / max(extra, 1e-300)
                    if best is None or score > best[0]:
                        best = (score, k, o, extra)
        if best is not None:
            _, k, o, extra = best
            choice[k] = None if o.rank == 0 else o
            saved -= extra
            improved = True
    return choice


def energy_rank(errors: Sequence[float], energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the spectral energy (``1 - e_r^2 >= energy``)."""
    for r in range(1, len(errors)):
        if 1.0 - errors[r] ** 2 >= energy - 1e-12:
            return r
    return len(errors) - 1


@dataclass
class BudgetEntry:
    """A layer offered to :func:`budget_ranks`: its dense cost, its cost at a rank, the ranks to consider."""

    dense: float
    cost: Callable[[int], float]
    errors: Sequence[float]  # relative error at each rank (index = rank)
    ranks: Sequence[int]


def budget_ranks(entries: Sequence[BudgetEntry], *, kind: str, target: float, total: float,
                 quantity: str = "cost") -> Dict[int, Optional[int]]:
    """Ranks (``None`` = leave dense) per entry index so the whole model costs ``<= target * total``.

    ``total`` is the whole model's cost (convs that are not entries count as fixed); ``quantity`` names it in
    messages ("FLOPs"). Returns the ranks; raises :class:`DsrewriteError` stating the smallest achievable
    fraction.
    """
    layers = []
    for i, e in enumerate(entries):
        opts = []
        for r in e.ranks:
            c = float(e.cost(r))
            if c < e.dense:
                opts.append(Option(r, c, float(e.errors[min(r, len(e.errors) - 1)]) ** 2))
        layers.append(LayerOptions(i, float(e.dense), opts))
    dense_sum = sum(layer.dense for layer in layers)
    fixed = max(float(total) - dense_sum, 0.0)
    total = fixed + dense_sum
    if total <= 0:
        raise DsrewriteError(f"{kind}: the model's {quantity} are unknown (0): no budget to meet")
    need = dense_sum + fixed - target * total
    try:
        choice = allocate(layers, need)
    except ValueError:
        least = (fixed + smallest_cost(layers)) / total
        cheapest = [(float(e.dense), min((float(e.cost(r)) for r in e.ranks), default=float(e.dense)))
                    for e in entries]
        raise BudgetUnreachable(
            f"{kind}={target:g} is not achievable: the smallest reachable is {least:.4f} of the model's "
            f"{quantity} (every eligible layer at its cheapest rank)", target=target, reachable=least,
            layers=cheapest, fixed=fixed, total=total) from None
    return {k: (None if o is None else o.rank) for k, o in choice.items()}


@dataclass
class Allocation:
    """One layer's outcome under a budget: ``rank`` (``None``: left dense, ``reason`` says why).

    ``dense`` / ``costs`` are what the provider priced (``dense`` ``None``: not costed); ``allocated`` marks
    a layer the allocation itself left dense (the report then names the budget as its policy).
    """

    rank: Optional[int] = None
    reason: Optional[str] = None
    dense: Optional[float] = None
    costs: Dict[int, Optional[float]] = field(default_factory=dict)
    allocated: bool = False


def allocate_budget(layers: Sequence[Tuple[ConvSpec, Sequence[float]]], provider: CostProvider, *, kind: str,
                    target: float, specs: Sequence[ConvSpec], given_total: Optional[float] = None
                    ) -> List[Allocation]:
    """Ranks for ``layers`` (each a spec and its relative error per rank) under ``kind=target``.

    ``provider`` prices every layer (those it cannot price, or where no rank is cheaper, are left dense with
    its reason); the whole model's total is ``provider.total(specs, ..., given_total)``, ``specs`` being all
    the model's convs. Raises :class:`DsrewriteError` when the budget is out of reach.
    """
    out: List[Allocation] = []
    entries, idx, dense_costs = [], [], []
    for spec, errors in layers:
        dense = provider.dense(spec)
        if dense is None:
            out.append(Allocation(reason=provider.why_not(spec)))
            continue
        dense_costs.append(dense)
        costs = {r: provider.separable(spec, r) for r in provider.candidates(spec)}
        a = Allocation(dense=dense, costs=costs)
        out.append(a)
        cheaper = [r for r, c in costs.items() if c is not None and c < dense]
        if not cheaper:
            a.reason = provider.no_saving(spec, dense, costs)
            continue
        entries.append(BudgetEntry(dense, costs.__getitem__, errors, cheaper))
        idx.append(len(out) - 1)
    total = provider.total(specs, dense_costs, given_total)
    chosen = budget_ranks(entries, kind=kind, target=target, total=total, quantity=provider.quantity)
    for j, i in enumerate(idx):
        if chosen[j] is None:
            out[i].reason = f"left dense by the {kind} allocation (others lose less per {provider.name} saved)"
            out[i].allocated = True
        else:
            out[i].rank = chosen[j]
    return out


def energy_allocation(spec: ConvSpec, errors: Sequence[float], energy: float) -> Allocation:
    """The ``energy`` policy for one layer: the smallest rank keeping that spectral energy, if it saves.

    Not a budget: each layer's rank follows from its own spectrum, so no provider or allocation is
    involved; the cost only decides whether the rank saves anything (FLOPs, or parameters when the output
    shape is unknown).
    """
    r = energy_rank(errors, energy)
    dense, sep = cost.dense_flops(spec), cost.separable_flops(spec, r)
    if not dense:  # output shape unknown: judge by parameters
        dense, sep = cost.dense_params(spec), cost.separable_params(spec, r)
    if sep >= dense:
        return Allocation(reason=f"energy {energy:g} needs rank {r}, which saves nothing "
                                 f"(break-even rank {cost.breakeven_rank(spec):.2f})")
    return Allocation(rank=r)
