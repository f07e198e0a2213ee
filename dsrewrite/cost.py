"""Cost model of a conv and of its separable replacement: parameters and FLOPs.

FLOPs count 2 per multiply-add over the whole batch, the convention of
``torch.utils.flop_counter.FlopCounterMode`` (bias adds are not counted, as there). MACs = FLOPs / 2.
Separable cost per output pixel: ``Cin*r*K + Cin*r*Cout`` multiply-adds vs ``Cin*Cout*K`` (K = taps). A 1x1 conv
or linear layer's low-rank pair is the separable pair of its :meth:`~dsrewrite.ir.ConvSpec.pair_view` (one channel,
``Cin`` taps): ``k*Cin + k*Cout`` per position, so every function here prices both kinds with one formula.
"""
from __future__ import annotations

from typing import Tuple

from .ir import ConvSpec

__all__ = [
    "dense_params",
    "separable_params",
    "dense_flops",
    "separable_flops",
    "breakeven_rank",
    "separable_pair_flops",
]


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
