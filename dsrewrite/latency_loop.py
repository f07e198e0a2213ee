"""``target_latency`` checked on the whole model: the closed loop every route runs (PyTorch, ONNX).

Layers are timed alone, on random inputs; the whole model can come out slower or faster than their sum
predicts. A route hands :func:`latency_loop` one function that plans with a given layer timer, builds the model
and times it against the original side by side (an :class:`Attempt`). While the whole model misses the target
by more than the measured noise, the pairs' timings (separable and low-rank) are scaled by what the whole model
showed (:class:`~dsrewrite.latency.ScaledTimer`) and the ranks planned again, up to :data:`LATENCY_ROUNDS` plans. A
target no plan reaches is refused with the best measured ratio and the noise. A target the layer timings put just
out of reach (by at most :data:`PLAN_MARGIN`) is not refused on their word: the pairs' timings are scaled down
until a plan exists, and the whole model decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import BudgetUnreachable, DsrewriteError, first_line
from .latency import ScaledTimer

__all__ = ["Attempt", "attempt_from_layers", "latency_loop", "LATENCY_ROUNDS", "PLAN_MARGIN"]

LATENCY_ROUNDS = 3  # plans tried against the whole-model measurement before target_latency is refused
MAX_STEP = 4.0  # the largest correction one round applies to the separable timings
# layer timings alone predict the whole model's ratio to within about this (benchmarks/latency_loop.py): a
# target they put out of reach by less is tried on the whole model before it is refused
PLAN_MARGIN = 0.05


@dataclass
class Attempt:
    """One plan, built and timed: ``payload`` (what the route keeps), the planned and measured whole-model
    time ratios, the measurement's noise, how many convs were rewritten, the rewritten layers' summed dense and
    separable times as planned, and the whole-model time the plan is a fraction of (ms)."""

    payload: Any
    planned: Optional[float]
    measured: float
    noise: float
    rewritten: int
    dense_ms: float
    separable_ms: float
    total_ms: float


def attempt_from_layers(payload: Any, layers: List[Any], total_ms: float, measured: float, noise: float) -> Attempt:
    """An :class:`Attempt` from a plan's layer reports (``time_before_ms`` / ``time_after_ms`` as costed): the
    planned ratio over the same total the allocator used (the model's time, at least its layers' sum)."""
    timed = [L for L in layers if L.time_before_ms is not None]
    done = [L for L in timed if L.rewritten and L.time_after_ms is not None]
    dense_ms, sep_ms = sum(L.time_before_ms for L in done), sum(L.time_after_ms for L in done)
    total = max(total_ms or 0.0, sum(L.time_before_ms for L in timed))
    planned = (total - (dense_ms - sep_ms)) / total if total and timed else None
    return Attempt(payload, planned, measured, noise, len([L for L in layers if L.rewritten]), dense_ms, sep_ms,
                   total)


def latency_loop(attempt: Callable[[Any], Attempt], timer: Any,
                 target: float) -> Tuple[Attempt, List[Dict[str, Any]], Optional[str]]:
    """Run ``attempt(timer)`` until the measured ratio is within the noise of ``target``.

    Returns the kept attempt (the first that met the target, or nothing to rewrite), one row per plan (``rewritten``, ``planned``, ``measured``,
    ``noise``, ``scale``; the kept one has ``kept``) and a note when more than one plan was made. Raises
    :class:`DsrewriteError` when no plan reaches the target, or when the first plan is refused by the planner.
    """
    rounds: List[Dict[str, Any]] = []
    best: Optional[Tuple[Attempt, Dict[str, Any]]] = None
    accepted: Optional[Tuple[Attempt, Dict[str, Any]]] = None
    scale = 1.0
    for _ in range(LATENCY_ROUNDS):
        try:
            a = attempt(ScaledTimer(timer, scale) if scale != 1.0 else timer)
        except BudgetUnreachable as e:
            step = e.scale_to_reach(target) if not rounds and e.reachable - target <= PLAN_MARGIN else None
            if step is not None and step > 0:
                # just out of reach on the layers' word: plan as if the pairs were that much faster, then measure
                rounds.append(dict(rewritten=None, planned=None, measured=None, noise=None, scale=scale,
                                   refused=first_line(e, 200), optimistic=True))
                scale *= step * 0.999
                continue
            if not rounds:
                raise
            rounds.append(dict(rewritten=None, planned=None, measured=None, noise=None, scale=scale,
                               refused=first_line(e, 200)))
            break
        except DsrewriteError as e:
            if not rounds:
                raise
            rounds.append(dict(rewritten=None, planned=None, measured=None, noise=None, scale=scale,
                               refused=first_line(e, 200)))
            break
        row = dict(rewritten=a.rewritten, planned=a.planned, measured=a.measured, noise=a.noise, scale=scale)
        rounds.append(row)
        if best is None or a.measured < best[0].measured:
            best = (a, row)
        if a.measured <= target + a.noise or not a.rewritten:  # met, or nothing rewritten: nothing to correct
            accepted = (a, row)
            break
        if a.planned is None:
            break
        # the separable times that would have predicted the measured ratio: D - f*S = (1 - measured) * total
        factor = (a.dense_ms - (1.0 - a.measured) * a.total_ms) / a.separable_ms if a.separable_ms > 0 else 0.0
        if factor <= 1.0:
            break
        scale *= min(factor, MAX_STEP)
    if best is None:  # the one plan made after a near miss was refused too
        raise DsrewriteError(f"target_latency={target:g} is not achievable: " + "; ".join(
            r["refused"] for r in rounds))
    kept, row = accepted or best
    row["kept"] = True
    if accepted is None:
        tried = "; ".join(f"planned {r['planned']:.2f}x, measured {r['measured']:.2f}x" if r["planned"] is not None
                          else f"measured {r['measured']:.2f}x" if r["measured"] is not None
                          else f"no plan: {r['refused']}" for r in rounds)
        raise DsrewriteError(
            f"target_latency={target:g} not reached on the whole model: best measured {kept.measured:.2f}x "
            f"(noise +-{kept.noise:.2f}) after {len(rounds)} plan(s) ({tried}); the layers are timed alone, "
            f"on random inputs, and the whole model did not follow")
    note = None
    if len(rounds) > 1:
        note = (f"target_latency={target:g}: {len(rounds)} plans, the whole model measured {kept.measured:.2f}x "
                f"with the one kept (layer timings scaled by {row['scale']:.2f})")
    return kept, [dict(r) for r in rounds], note
