"""Fused depthwise + pointwise conv2d in one Triton kernel: the depthwise result never leaves registers.

Each program owns a tile of ``BLOCK_P`` output pixels (flattened over N, H', W') and ``BLOCK_M`` output
channels. It walks the ``C*r`` intermediate channels in blocks of ``BLOCK_K``: for each block it computes
the depthwise conv of the pixel tile in fp32 registers (``KH*KW`` masked loads of the input, one
broadcast FMA each), casts it to the operand dtype and feeds it to ``tl.dot`` with the matching
``[BLOCK_K, BLOCK_M]`` slice of the pointwise weights. Bias and activation run on the fp32 accumulator
before the one store. Programs that share a pixel tile run next to each other (the output-channel block
varies fastest) so the recomputed depthwise input is read from L2, not DRAM.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import (ACTIVATIONS, depthwise_tile, epilogue_store, gemm_config, input_channel, interpreting, launch,
                      pixel_origin, prune_by_size, shared_memory_limit, tile_ids)
from ._shapes import conv_output, depthwise_operands

__all__ = ["separable_conv2d_forward", "FUSED_CONFIGS", "FUSED_FALLBACK_CONFIGS", "FUSED_BLOCK_M_MAX",
           "fused_shared_bytes", "fused_configs_for", "FUSED_TUNING_KEY"]


@triton.jit
def _separable_conv2d_kernel(
    x_ptr,  # input [N, C, H, W], any strides (NCHW or channels_last)
    dw_ptr,  # depthwise weights [C*r, KH*KW], contiguous; channel k reads input channel k // R
    idx_ptr,  # ragged ranks: int64 [C*r], the input channel of each depthwise channel (read if HAS_INDEX)
    pw_ptr,  # pointwise weights [M, C*r], contiguous
    b_ptr,  # bias [M] (not read unless HAS_BIAS)
    y_ptr,  # output [N, M, OH, OW], any strides
    C, H, W, CR, M, OH, OW, P, R,  # P = N*OH*OW output pixels, CR = C*R intermediate channels
    sxn, sxc, sxh, sxw,  # input strides (elements)
    syn, sym, syh, syw,  # output strides (elements)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p, pid_m = tile_ids(tl.cdiv(M, BLOCK_M))  # int64: offsets may pass 2**31

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    n, oh, ow, ih0, iw0 = pixel_origin(offs_p, OH, OW, stride_h, stride_w, pad_h, pad_w)
    x_pix = n * sxn  # [BLOCK_P] offset of each pixel's image

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, CR, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < CR
        # the depthwise result of this channel block stays in registers
        chan, mask_c = input_channel(idx_ptr, offs_k, mask_k, R, C, HAS_INDEX)  # mask_c: index in range too
        dw = depthwise_tile(x_ptr, dw_ptr, x_pix, ih0, iw0, mask_p, offs_k, mask_c, chan * sxc, H, W,
                             sxh, sxw, dil_h, dil_w, KH, KW, BLOCK_P, BLOCK_K)
        pw = tl.load(pw_ptr + offs_m[None, :] * CR + offs_k[:, None],
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        acc = tl.dot(dw.to(pw.dtype), pw, acc, input_precision=PRECISION)

    epilogue_store(acc, b_ptr, y_ptr, n * syn + oh * syh + ow * syw, offs_m, mask_p, mask_m, sym, HAS_BIAS, ACT)


_cfg = gemm_config


# GPU search space (pruned per shape); the interpreter runs one small config so tests stay fast.
FUSED_CONFIGS = [
    _cfg(32, 32, 16, 2, 2), _cfg(64, 32, 32, 4, 2), _cfg(64, 64, 32, 4, 2), _cfg(128, 32, 32, 4, 2),
    _cfg(128, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3), _cfg(128, 128, 32, 8, 3), _cfg(128, 64, 64, 8, 2),
]
# num_stages=1: no software pipelining, so no staged input in shared memory; what large fp32 kernels fall back on
FUSED_FALLBACK_CONFIGS = [_cfg(64, 64, 32, 4, 1), _cfg(128, 64, 32, 4, 1)]
INTERPRET_CONFIG = _cfg(32, 32, 16, 1, 1)
FUSED_BLOCK_M_MAX = max(c.kwargs["BLOCK_M"] for c in FUSED_CONFIGS)  # used by the dispatcher heuristic


def fused_shared_bytes(cfg: "triton.Config", itemsize: int, kh: int, kw: int) -> int:
    """Upper estimate of a config's shared memory (bytes), checked against Triton's compiler for sm_80/sm_90
    (``benchmarks/kernels_aot.py``, ``tests/test_kernels_aot.py``). With 4-byte inputs the software pipeliner
    stages the next channel block's ``kh*kw`` input loads through shared memory, so it grows with
    ``(num_stages - 1) * kh * kw``: a 7x7 fp32 kernel overflows every pipelined config. 16-bit loads are not
    staged (Triton 3.8); then the pointwise operand and the epilogue dominate."""
    bp, bm, bk, s = cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"], cfg.num_stages
    scratch = 3072  # the compiler's own (layout conversions, barriers): up to ~2.2 KB seen
    if itemsize >= 4:
        return (s - 1) * kh * kw * bp * bk * itemsize + s * bk * bm * itemsize + bp * max(bk, bm) * itemsize + scratch
    return s * bk * bm * itemsize + bp * bm * itemsize + scratch


def fused_configs_for(itemsize: int, shared_limit: int, kh: int, kw: int,
                      configs: Optional[Sequence["triton.Config"]] = None) -> list:
    """The configs whose shared memory fits ``shared_limit`` (the fallbacks always do)."""
    configs = list(configs if configs is not None else FUSED_CONFIGS + FUSED_FALLBACK_CONFIGS)
    kept = [c for c in configs if fused_shared_bytes(c, itemsize, kh, kw) <= shared_limit]
    return kept or [min(configs, key=lambda c: fused_shared_bytes(c, itemsize, kh, kw))]


def _prune(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    configs = fused_configs_for(x.element_size(), shared_memory_limit(x.device), kwargs["KH"], kwargs["KW"], configs)
    return prune_by_size(configs, {"BLOCK_M": named_args["M"], "BLOCK_K": named_args["CR"],
                                   "BLOCK_P": named_args["P"]})


# What a tuned config is cached under. Beyond the shape: the channel and width strides of the input and output
# (NCHW vs channels_last: both compile differently, and a channels_last 5x5/7x7 kernel stages far more shared
# memory, so an NCHW winner can fail to launch), the ragged index, bias, activation and dot precision. Triton
# adds the dtype of every tensor argument to the key itself (3.0 on; tests/test_kernels_tuning.py checks it).
FUSED_TUNING_KEY = ["CR", "M", "P", "KH", "KW", "stride_h", "stride_w", "sxc", "sxw", "sym", "syw",
                    "HAS_INDEX", "HAS_BIAS", "ACT", "PRECISION"]

_separable_conv2d_tuned = triton.autotune(
    configs=[INTERPRET_CONFIG] if interpreting() else FUSED_CONFIGS + FUSED_FALLBACK_CONFIGS,
    key=FUSED_TUNING_KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": _prune},
)(_separable_conv2d_kernel)


def separable_conv2d_forward(
    x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, bias: Optional[torch.Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], activation: str = "none",
    precision: str = "ieee", config: Optional[dict] = None, channel_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel. Arguments are already normalised (pairs of ints, activation name).

    ``channel_index`` (ragged ranks): int64 ``[C*r]``, the input channel each depthwise filter reads.

    ``config`` (``{"BLOCK_P":..,"BLOCK_M":..,"BLOCK_K":.., "num_warps":..}``) bypasses the autotuner: tests
    and the benchmark use it to check every config.
    """
    _, C, H, W = x.shape
    CR, _, KH, KW = dw_weight.shape
    M = pw_weight.shape[0]
    y, P = conv_output(x, (KH, KW), M, stride, padding, dilation)
    if P == 0 or M == 0:
        return y
    dw, idx, R = depthwise_operands(dw_weight, C, channel_index)
    pw = pw_weight.reshape(M, CR).to(x.dtype).contiguous()
    b = bias.contiguous() if bias is not None else pw  # dummy pointer, never read
    args = (x, dw, idx, pw, b, y, C, H, W, CR, M, y.shape[2], y.shape[3], P, R,
            *x.stride(), *y.stride(), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    meta = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], PRECISION=precision,
                HAS_INDEX=channel_index is not None)
    launch(_separable_conv2d_kernel, _separable_conv2d_tuned, args, meta, config,
           lambda m: (triton.cdiv(P, m["BLOCK_P"]) * triton.cdiv(M, m["BLOCK_M"]),))
    return y
