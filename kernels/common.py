"""Shared pieces of the Triton kernels: pixel indexing, the depthwise tile, the activation epilogue, autotune helpers.

Imported only by the kernel files and the modules that import them (never by ``dsrewrite`` itself, nor by
``dsrewrite.kernels`` on import), so importing either does not import these kernels.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

__all__ = ["ACTIVATIONS", "next_pow2", "prune_by_size", "shared_memory_limit", "pixel_origin",
           "depthwise_tile", "epilogue_store", "input_channel", "tile_ids", "gemm_config", "launch"]

# activation name -> the ACT constexpr of the kernels
ACTIVATIONS: Dict[str, int] = {"none": 0, "relu": 1, "relu6": 2, "silu": 3}


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


def gemm_config(bp: int, bm: int, bk: int, warps: int, stages: int) -> "triton.Config":
    """An autotune config of the kernels tiled as pixels x output channels x reduction channels."""
    return triton.Config({"BLOCK_P": bp, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def launch(kernel, tuned, args: tuple, meta: dict, config: Optional[dict], grid_of) -> None:
    """Run ``tuned`` (the autotuned kernel), or ``kernel`` with a forced ``config`` (block sizes plus optional
    ``num_warps``/``num_stages``: tests and benchmarks check every config). ``grid_of(blocks)`` gives the grid."""
    if config is None:
        tuned[grid_of](*args, **meta)
        return
    cfg = dict(config)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    kernel[grid_of(cfg)](*args, **meta, **cfg, **opts)


def shared_memory_limit(device) -> int:
    """Largest shared memory one block may use on ``device`` (bytes; opt-in limit, e.g. 227 KB on H100)."""
    try:
        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    except Exception:  # noqa: BLE001 - older torch, or no CUDA device: the smallest of recent NVIDIA parts
        return 101376


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


@triton.jit
def tile_ids(num_inner):
    """This program's (outer, inner) tile indices, inner varying fastest; int64 from here on (large offsets)."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // num_inner, pid % num_inner


@triton.jit
def pixel_origin(offs_p, OH, OW, stride_h, stride_w, pad_h, pad_w):
    """Flattened output pixels ``n*OH*OW + oh*OW + ow`` -> ``(n, oh, ow)`` and the input row/column of tap (0, 0)."""
    n = offs_p // (OH * OW)
    rem = offs_p % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    return n, oh, ow, oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit
def input_channel(idx_ptr, offs_k, mask_k, R, C, HAS_INDEX: tl.constexpr):
    """The input channel each depthwise channel ``offs_k`` reads, ``idx_ptr[k]`` (ragged ranks) or ``k // R``,
    and the mask of the channels to compute: ``mask_k``, less any index outside ``[0, C)``. The host checks
    the index without a device sync only asynchronously (``torch._assert_async``), so a bad index must not
    read out of bounds here: its depthwise channel computes as zero."""
    if HAS_INDEX:
        chan = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        mask_k = mask_k & (chan >= 0) & (chan < C)
    else:
        chan = offs_k // R
    return chan, mask_k


@triton.jit
def depthwise_tile(x_ptr, w_ptr, x_pix, ih0, iw0, mask_p, offs_k, mask_k, x_chan, H, W, sxh, sxw, dil_h, dil_w,
                   KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 ``[BLOCK_P, BLOCK_K]`` depthwise result of a pixel tile: ``KH*KW`` masked input loads (zero
    padding), one broadcast FMA each. ``x_pix``: offset of each pixel's image; ``x_chan``: offset of the input
    channel each depthwise channel ``offs_k`` reads; ``w_ptr``: weights ``[C*r, KH*KW]``, contiguous."""
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(KH):
        ih = ih0 + i * dil_h
        row_ok = mask_p & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = iw0 + j * dil_w
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (x_pix + ih * sxh + iw * sxw)[:, None] + x_chan[None, :],
                         mask=ok[:, None] & mask_k[None, :], other=0.0)
            wv = tl.load(w_ptr + offs_k * (KH * KW) + (i * KW + j), mask=mask_k, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def epilogue_store(acc, b_ptr, y_ptr, y_pix, offs_m, mask_p, mask_m, sym,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """Bias and activation on the fp32 ``[BLOCK_P, BLOCK_M]`` accumulator, then one store in the output dtype
    (``y_pix``: offset of each output pixel, ``sym``: output channel stride)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    tl.store(y_ptr + y_pix[:, None] + (offs_m * sym)[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_m[None, :])
