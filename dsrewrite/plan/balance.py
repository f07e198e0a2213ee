"""Int8-friendly factors: the free per-filter scale of every pair, used to balance its weights' ranges.

A pair computes ``y = P (D * x)``: filter ``j`` of the first factor (a depthwise filter, or a row of a low-rank
reduction) feeds only column ``j`` of the second (the pointwise conv, or the expansion). Scaling filter ``j`` by
``s_j`` and column ``j`` by ``1/s_j`` leaves the function unchanged (exactly, up to float rounding), and it
changes how the pair quantizes:

* int8 weights per output channel (onnxruntime's ``per_channel``, PT2E's X86 Inductor quantizer) give the
  pointwise conv one scale per *row*: its columns share it, so a column much smaller than the row's largest is
  crushed to a few levels. Each depthwise filter has its own scale there; per tensor, all filters share one.
* The depthwise output is a new activation, quantized per tensor: its channels share one range too.

The plain SVD split already gives filter and column equal L2 norms, but their largest entries (what a
quantizer's range sees) differ, and a calibrated refit (:mod:`dsrewrite.calib_solve`) re-solves the pointwise
weights without regard to the split. :func:`balanced` makes each filter's largest magnitude equal its column's,
the geometric-mean choice of cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019):
``s_j = sqrt(r_col_j / r_filter_j)``.

Measured (``benchmarks/int8.md``), this does not make int8 more accurate: with per-channel weights a pair loses
most in its intermediate activation, quantized per tensor, whose channel ranges equal weight ranges do not
balance; after calibration it was slightly worse on all three models. Hence ``int8_friendly`` is off by default.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List

import torch

from .factorize import Factors

__all__ = ["balance_scales", "balanced", "balance_pairs", "balance_decisions", "balanced_note"]



def balanced_note(n: int) -> str:
    """The report's note for ``n`` balanced pairs (every route says the same)."""
    if not n:
        return "int8_friendly: no layer was rewritten, nothing to balance"
    return (f"int8_friendly: {n} pair(s) balanced for int8 (each depthwise filter or reduction row rescaled to the "
            "range of its pointwise or expansion column; the float model is unchanged in value)")


def balance_scales(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The per-filter scales ``s`` (``[R]``, the first factor's dtype) that equalize ``max|first[j]| * s_j`` and
    ``max|second[:, j]| / s_j``: ``sqrt(r_second / r_first)``, 1 where either is zero.

    ``first``: ``[R, ...]`` (depthwise ``[R, 1, *k]``, reduction ``[k, Cin, 1...]`` or ``[k, Cin]``);
    ``second``: ``[Cout, R, ...]`` (pointwise, expansion).
    """
    a = first.detach().to(torch.float64).reshape(first.shape[0], -1).abs().amax(dim=1)
    b = second.detach().to(torch.float64).transpose(0, 1).reshape(second.shape[1], -1).abs().amax(dim=1)
    s = torch.where((a > 0) & (b > 0), torch.sqrt(b / a.clamp_min(1e-300)), torch.ones_like(a))
    return s.to(first.dtype)


def balanced(factors: Factors) -> Factors:
    """``factors`` with every filter and its column rescaled to equal ranges (:func:`balance_scales`): the same
    function, bias and channel index; ``error`` unchanged (the product is the same)."""
    first, second = factors.depthwise, factors.pointwise
    s = balance_scales(first, second).to(first.device)
    shape_a = (-1,) + (1,) * (first.dim() - 1)
    shape_b = (1, -1) + (1,) * (second.dim() - 2)
    return dataclasses.replace(factors, depthwise=(first * s.reshape(shape_a)).contiguous(),
                               pointwise=(second / s.to(second.dtype).reshape(shape_b)).contiguous())


def balance_pairs(modules: Iterable[torch.nn.Module]) -> int:
    """Balance installed pair modules in place (anything with ``factors()`` / ``load_factors()``, as
    :class:`~dsrewrite.modules.SeparableConv2d` and the low-rank pairs have); returns how many."""
    n = 0
    for m in modules:
        m.load_factors(balanced(m.factors()))
        n += 1
    return n


def balance_decisions(decisions: List) -> str:
    """Replace the factors of every rewritten :class:`~dsrewrite.pipeline.Decision` by :func:`balanced` ones (before
    a backend writes them); returns the report's note."""
    n = 0
    for d in decisions:
        if d.factors is not None:
            d.factors = balanced(d.factors)
            n += 1
    return balanced_note(n)
