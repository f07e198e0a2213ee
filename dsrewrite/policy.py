"""Rank policy: which rank each eligible conv gets, or why it is left alone.

``rank`` may be an int (the same for every layer, clamped to each layer's full rank), ``"full"``
(exact, for verification: costs more than the original) or ``"auto"`` (the default): each layer gets
half of its FLOP break-even rank ``Cout*K/(K+Cout)``, which keeps roughly half of the layer's FLOPs
(about 0.5x on ResNet/VGG 3x3 convs); layers whose break-even rank is below 2 save nothing and are skipped. The same holds for a low-rank pair
(1x1 conv, linear layer), whose break-even rank is ``Cin*Cout/(Cin+Cout)``.

Which layer kinds a plan considers (:func:`default_kinds`): every kind under a budget (the allocator weighs
them against each other), KxK convs only for a ``rank=`` policy, whose meaning differs per kind.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

from .cost import breakeven_rank
from .errors import DsrewriteError
from .ir import KINDS, KXK, ConvSpec, check_kinds

__all__ = ["RankArg", "check_rank", "choose_rank", "AUTO_FRACTION", "default_kinds", "plan_kinds"]

RankArg = Union[int, str]
AUTO_FRACTION = 0.5  # fraction of the break-even rank used by rank="auto"


def check_rank(rank: RankArg) -> RankArg:
    """Validate a user-given rank argument; raise :class:`DsrewriteError` with one line if it is bad."""
    if isinstance(rank, bool):
        raise DsrewriteError(f"rank must be a positive int, 'auto' or 'full', got {rank!r}")
    if isinstance(rank, str):
        if rank in ("auto", "full"):
            return rank
        if rank.isdigit():
            rank = int(rank)
        else:
            raise DsrewriteError(f"rank must be a positive int, 'auto' or 'full', got {rank!r}")
    if not isinstance(rank, int):
        raise DsrewriteError(f"rank must be a positive int, 'auto' or 'full', got {rank!r}")
    if rank < 1:
        raise DsrewriteError(f"rank must be >= 1, got {rank}")
    return rank


def choose_rank(spec: ConvSpec, rank: RankArg) -> Tuple[Optional[int], str]:
    """Return ``(rank, policy)`` for an eligible conv, or ``(None, reason)`` to leave it alone."""
    if rank == "full":
        return spec.full_rank, "full"
    if rank == "auto":
        r = math.floor(AUTO_FRACTION * breakeven_rank(spec))
        if r < 1:
            return None, (
                f"separable form saves nothing (break-even rank {breakeven_rank(spec):.2f} < 2)"
            )
        return min(r, spec.full_rank), "auto"
    return min(int(rank), spec.full_rank), "uniform"


def default_kinds(budgeted: bool) -> Tuple[str, ...]:
    """The layer kinds a plan considers when ``kinds=`` is not given: all of them under a budget (one allocation
    spends it where it costs the least error), KxK convs only for a ``rank=`` policy (an int rank, ``"auto"`` or
    ``"full"`` means a different thing for a low-rank pair)."""
    return KINDS if budgeted else (KXK,)


def plan_kinds(kinds, budgeted: bool) -> Tuple[str, ...]:
    """``kinds=`` checked (``None``: :func:`default_kinds`)."""
    return default_kinds(budgeted) if kinds is None else check_kinds(kinds)
