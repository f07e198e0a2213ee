"""Pointwise (1x1, stride 1) conv2d as a Triton GEMM over pixels, with fused bias and activation.

``y[p, m] = act(sum_k z[p, k] * w[m, k] + b[m])`` where ``p`` runs over the N*H*W pixels of ``z`` read
through its strides (NCHW or channels_last). The second half of the split path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import ACTIVATIONS, epilogue_store, gemm_config, launch, pixel_origin, prune_by_size, tile_ids
from .env import interpreting
from .shapes import output_memory_format

__all__ = ["pointwise_conv2d_forward", "POINTWISE_CONFIGS", "POINTWISE_TUNING_KEY"]


@triton.jit
def _pointwise_conv2d_kernel(
    z_ptr,  # input [N, K, H, W], any strides
    w_ptr,  # weights [M, K], contiguous
    b_ptr,  # bias [M] (not read unless HAS_BIAS)
    y_ptr,  # output [N, M, H, W], any strides
    K, M, HW, W, P,  # P = N*H*W pixels
    szn, szc, szh, szw,
    syn, sym, syh, syw,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p, pid_m = tile_ids(tl.cdiv(M, BLOCK_M))
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    n, h, w, _, _ = pixel_origin(offs_p, HW // W, W, 1, 1, 0, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    z_pix = n * szn + h * szh + w * szw
    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        zv = tl.load(z_ptr + z_pix[:, None] + (offs_k * szc)[None, :],
                     mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        wv = tl.load(w_ptr + offs_m[None, :] * K + offs_k[:, None],
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(zv, wv, acc, input_precision=PRECISION)

    epilogue_store(acc, b_ptr, y_ptr, n * syn + h * syh + w * syw, offs_m, mask_p, mask_m, sym, HAS_BIAS, ACT)


_cfg = gemm_config


POINTWISE_CONFIGS = [
    _cfg(64, 64, 32, 4, 3), _cfg(128, 64, 32, 4, 3), _cfg(128, 128, 32, 4, 3), _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 32, 8, 3), _cfg(256, 128, 32, 8, 3), _cfg(64, 32, 32, 4, 4), _cfg(32, 32, 16, 2, 2),
]
INTERPRET_CONFIG = _cfg(32, 32, 16, 1, 1)


def _prune(configs, named_args, **kwargs):
    return prune_by_size(configs, {"BLOCK_M": named_args["M"], "BLOCK_K": named_args["K"],
                                   "BLOCK_P": named_args["P"]})


# cached per shape, memory format of input and output (channel and width strides), bias, activation and dot
# precision; Triton adds the tensors' dtypes itself
POINTWISE_TUNING_KEY = ["K", "M", "P", "szc", "szw", "sym", "syw", "HAS_BIAS", "ACT", "PRECISION"]

_pointwise_conv2d_tuned = triton.autotune(
    configs=[INTERPRET_CONFIG] if interpreting() else POINTWISE_CONFIGS,
    key=POINTWISE_TUNING_KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": _prune},
)(_pointwise_conv2d_kernel)


def pointwise_conv2d_forward(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             activation: str = "none", precision: str = "ieee",
                             config: Optional[dict] = None,
                             memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """``act(F.conv2d(z, weight, bias))`` for a 1x1 ``weight [M, K, 1, 1]``; output in ``memory_format``
    (default: ``z``'s)."""
    N, K, H, W = z.shape
    M = weight.shape[0]
    fmt = memory_format or output_memory_format(z)
    y = torch.empty((N, M, H, W), device=z.device, dtype=z.dtype, memory_format=fmt)
    P = N * H * W
    if P == 0 or M == 0:
        return y
    w = weight.reshape(M, K).to(z.dtype).contiguous()
    b = bias.contiguous() if bias is not None else w
    args = (z, w, b, y, K, M, H * W, W, P, *z.stride(), *y.stride())
    meta = dict(HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], PRECISION=precision)
    launch(_pointwise_conv2d_kernel, _pointwise_conv2d_tuned, args, meta, config,
           lambda m: (triton.cdiv(P, m["BLOCK_P"]) * triton.cdiv(M, m["BLOCK_M"]),))
    return y
