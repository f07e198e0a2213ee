"""The middle of the compiler: from conv sites and options to a plan.

``eligibility`` (which layers a plan may touch), ``policy`` (rank policies and kinds), ``cost_model`` (parameter,
FLOP and break-even formulas), ``cost_providers`` (what a rank costs: FLOPs, parameters, measured time),
``allocate`` (ranks under a budget), ``factorize`` (the per-channel SVD), ``planner`` (:func:`plan_sites`, every
route's planner), ``inputs`` (what the planner needs beyond the sites), ``selfcheck`` (exact at full rank) and
``planfile`` (:class:`Plan`, a plan as a versioned JSON file).
"""
from __future__ import annotations

from .planfile import PLAN_FORMAT, PLAN_VERSION, LayerPlan, Plan, fingerprint

__all__ = ["Plan", "LayerPlan", "fingerprint", "PLAN_VERSION", "PLAN_FORMAT"]
