"""Shared pieces of the Triton kernels: the fused activation epilogue and the autotune helpers.

Imported only by the kernel files (never by ``dsrewrite`` itself), so importing ``dsrewrite`` does not
import Triton.
"""
from __future__ import annotations

import os
from typing import Dict, List

import triton
import triton.language as tl

__all__ = ["ACTIVATIONS", "interpreting", "next_pow2", "prune_by_size", "_activation"]

# activation name -> the ACT constexpr of the kernels
ACTIVATIONS: Dict[str, int] = {"none": 0, "relu": 1, "relu6": 2, "silu": 3}


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): one small config, no tuning."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prune_by_size(configs: List["triton.Config"], sizes: Dict[str, int]) -> List["triton.Config"]:
    """Drop configs whose blocks are larger than the (power-of-two padded, >= 16) problem dimension.

    ``sizes`` maps a block name (``"BLOCK_M"``) to the extent it tiles. The configs that survive are those
    that do not waste more than half of every block on masked lanes; at least one config is kept.
    """
    kept = []
    for cfg in configs:
        if all(cfg.kwargs.get(name, 16) <= max(16, next_pow2(extent)) for name, extent in sizes.items()):
            kept.append(cfg)
    if not kept:  # every config too large: keep the smallest one
        kept = [min(configs, key=lambda c: sum(c.kwargs.get(n, 0) for n in sizes))]
    return kept


@triton.jit
def _activation(acc, ACT: tl.constexpr):
    """Fused epilogue on the fp32 accumulator: 0 none, 1 relu, 2 relu6, 3 silu."""
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = tl.minimum(tl.maximum(acc, 0.0), 6.0)
    elif ACT == 3:
        acc = acc / (1.0 + tl.exp(-acc))
    return acc
