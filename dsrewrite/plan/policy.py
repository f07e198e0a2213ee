"""Rank policy: which rank each eligible conv gets, or why it is left alone.

``rank`` may be an int (the same for every layer, clamped to each layer's full rank), ``"full"``
(exact, for verification: costs more than the original) or ``"auto"`` (the default): each layer gets
half of its FLOP break-even rank ``Cout*K/(K+Cout)``, which keeps roughly half of the layer's FLOPs
(about 0.5x on ResNet/VGG 3x3 convs); layers whose break-even rank is below 2 save nothing and are skipped. The same holds for a low-rank pair
(1x1 conv, linear layer), whose break-even rank is ``Cin*Cout/(Cin+Cout)``.

``rank`` may also be a mapping ``{glob: rank}`` (a :class:`RankMap`), ranks by layer: each layer takes the value
of the first pattern (in the mapping's order) its name matches; a layer matched by none is left alone ("not matched
by any rank pattern"): end the mapping with ``"*": "auto"`` to rank the rest.

Which layer kinds a plan considers (:func:`default_kinds`): every kind under a budget (the allocator weighs
them against each other) or with a rank mapping (the user names the layers), KxK convs only for one ``rank=``
for every layer, whose meaning differs per kind.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Iterator, Mapping, Optional, Tuple, Union

from .cost_model import breakeven_rank
from ..errors import DsrewriteError
from ..ir import KINDS, KXK, ConvSpec, check_kinds

__all__ = ["RankArg", "RankMap", "check_rank", "choose_rank", "AUTO_FRACTION", "default_kinds", "plan_kinds",
           "UNMATCHED"]

RankArg = Union[int, str, Mapping[str, Union[int, str]]]
AUTO_FRACTION = 0.5  # fraction of the break-even rank used by rank="auto"
UNMATCHED = "not matched by any rank pattern"  # the reason of a layer no pattern of a rank mapping matches


class RankMap(Mapping):
    """Ranks by layer: an ordered, immutable, hashable ``{glob: rank}`` (rank an int, ``"auto"`` or ``"full"``);
    :meth:`lookup` gives the value of the first pattern a name matches."""

    def __init__(self, items: Mapping[str, Union[int, str]]) -> None:
        self._items = tuple(items.items())

    def __getitem__(self, key: str) -> Union[int, str]:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, RankMap):
            return self._items == other._items
        return isinstance(other, Mapping) and tuple(other.items()) == self._items

    def __repr__(self) -> str:
        return repr(dict(self._items))

    def lookup(self, name: str) -> Optional[Union[int, str]]:
        """The rank of the first pattern ``name`` matches, or ``None``."""
        return next((v for k, v in self._items if fnmatch.fnmatchcase(name, k)), None)


def check_rank(rank: RankArg) -> RankArg:
    """Validate a user-given rank argument (one rank, or a mapping ``{glob: rank}`` returned as a
    :class:`RankMap`); raise :class:`DsrewriteError` with one line if it is bad."""
    if isinstance(rank, Mapping):
        if not rank:
            raise DsrewriteError("a rank mapping needs at least one 'glob: rank' entry (e.g. {'*': 'auto'})")
        for key, value in rank.items():
            if not isinstance(key, str) or not key:
                raise DsrewriteError(f"rank mapping keys must be glob patterns (non-empty strings), got {key!r}")
            try:
                _check_one(value)
            except DsrewriteError as e:
                raise DsrewriteError(f"rank mapping {key!r}: {e}") from None
        return rank if isinstance(rank, RankMap) else RankMap({k: _check_one(v) for k, v in rank.items()})
    return _check_one(rank)


def _check_one(rank: Any) -> Union[int, str]:
    """One rank: a positive int (or its digits), ``"auto"`` or ``"full"``."""
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
    if isinstance(rank, RankMap):
        value = rank.lookup(spec.name)
        if value is None:
            return None, UNMATCHED
        return choose_rank(spec, value)
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


def default_kinds(budgeted: bool, mapped: bool = False) -> Tuple[str, ...]:
    """The layer kinds a plan considers when ``kinds=`` is not given: all of them under a budget (one allocation
    spends it where it costs the least error) or with a rank mapping (``mapped``: the user names the layers),
    KxK convs only for one ``rank=`` for every layer (an int rank, ``"auto"`` or ``"full"`` means a different
    thing for a low-rank pair)."""
    return KINDS if budgeted or mapped else (KXK,)


def plan_kinds(kinds, budgeted: bool, mapped: bool = False) -> Tuple[str, ...]:
    """``kinds=`` checked (``None``: :func:`default_kinds`; ``mapped``: ``rank`` is a mapping)."""
    return default_kinds(budgeted, mapped) if kinds is None else check_kinds(kinds)
