"""Cost model of a conv and of its separable replacement: parameters and FLOPs.

FLOPs count 2 per multiply-add over the whole batch, the convention of
``torch.utils.flop_counter.FlopCounterMode`` (bias adds are not counted, as there). MACs = FLOPs / 2.
Separable cost per output pixel: ``Cin*r*K + Cin*r*Cout`` multiply-adds vs ``Cin*Cout*K`` (K = taps). A 1x1 conv
or linear layer's low-rank pair is the separable pair of its :meth:`~dsrewrite.ir.ConvSpec.pair_view` (one channel,
``Cin`` taps): ``k*Cin + k*Cout`` per position, so every function here prices both kinds with one formula.
"""
from __future__ import annotations

import math
from typing import List, Tuple

from ..ir import ConvSpec

__all__ = [
    "dense_params",
    "separable_params",
    "dense_flops",
    "separable_flops",
    "breakeven_rank",
    "separable_pair_flops",
    "candidate_ranks",
    "LOWRANK_RANKS",
]

LOWRANK_RANKS = 7  # low-rank candidates timed per layer: the top rank, then steps of 1/sqrt(2) (multiples of 8
# from 32 up)


def dense_params(spec: ConvSpec) -> int:
    """Parameters of the original conv (weight + bias)."""
    w = spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel_area
    return w + (spec.out_channels if spec.bias else 0)


def separable_params(spec: ConvSpec, rank: int) -> int:
    """Parameters of the depthwise (``Cin*r*K``) + pointwise (``Cout*Cin*r`` + bias) pair (low rank:
    ``k*Cin + Cout*k`` + bias)."""
    spec = spec.pair_view()
    cr = spec.in_channels * rank
    return cr * spec.kernel_area + spec.out_channels * cr + (spec.out_channels if spec.bias else 0)


def separable_pair_flops(depthwise_channels: int, out_channels: int, taps: int, pixels: int) -> Tuple[int, int]:
    """FLOPs (2 per multiply-add) of a depthwise + pointwise pair, as ``(depthwise, pointwise)``: the one
    formula the reports, the kernels' ``FlopCounterMode`` formula and the benchmarks all count with.

    Args:
        depthwise_channels: depthwise filters, ``Cin*r`` (the sum of the kept ranks when ragged).
        out_channels: pointwise outputs ``Cout``. taps: taps of one filter ``K`` (``kh*kw``).
        pixels: output positions counted, ``N*OH*OW`` (times the calls of a shared conv).
    """
    return 2 * depthwise_channels * taps * pixels, 2 * depthwise_channels * out_channels * pixels


def dense_flops(spec: ConvSpec) -> int:
    """FLOPs (2 x MACs) of the original conv over all its calls; 0 when the output shape is unknown."""
    macs = spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel_area
    return 2 * macs * spec.out_pixels


def separable_flops(spec: ConvSpec, rank: int) -> int:
    """FLOPs (2 x MACs) of the separable (or low-rank) pair at ``rank`` over all calls of the layer."""
    spec = spec.pair_view()
    return sum(separable_pair_flops(spec.in_channels * rank, spec.out_channels, spec.kernel_area, spec.out_pixels))


def breakeven_rank(spec: ConvSpec) -> float:
    """Rank at which the pair costs as many FLOPs as the dense layer: ``Cout*K / (K + Cout)`` (low rank:
    ``Cout*Cin / (Cin + Cout)``)."""
    spec = spec.pair_view()
    k = spec.kernel_area
    return spec.out_channels * k / (k + spec.out_channels)


def candidate_ranks(spec: ConvSpec, count: int = 5) -> List[int]:
    """Ranks worth timing: the largest rank with fewer FLOPs than the conv, then halving down to 1. A low-rank
    pair's ranks run to the hundreds: the largest below its break-even rank, then :data:`LOWRANK_RANKS` steps
    of ``1/sqrt(2)`` (multiples of 8 from 32 up, the widths GEMM kernels like)."""
    if spec.out_pixels == 0:
        return []
    dense = dense_flops(spec)
    if spec.lowrank:
        return _lowrank_ranks(spec, dense)
    top = 0
    for r in range(1, spec.full_rank + 1):
        if separable_flops(spec, r) < dense:
            top = r
    ranks: List[int] = []
    r = top
    while r >= 1 and len(ranks) < count:
        ranks.append(r)
        r = r // 2 if r > 2 else r - 1
    return sorted(set(ranks))


def _lowrank_ranks(spec: ConvSpec, dense: int) -> List[int]:
    top = min(spec.full_rank, max(math.ceil(breakeven_rank(spec)) - 1, 0))
    while top >= 1 and separable_flops(spec, top) >= dense:  # float rounding at the break-even rank
        top -= 1
    ranks, r = [], float(top)
    while r >= 1 and len(ranks) < LOWRANK_RANKS:
        k = int(r)
        ranks.append(8 * round(k / 8) if k >= 32 and ranks else k)  # never the top: it stays below break-even
        r /= math.sqrt(2)
    return sorted(set(ranks))
