"""Depthwise conv2d (channel multiplier r) as a standalone Triton kernel: the first half of the split path.

Each program computes a ``[BLOCK_P, BLOCK_C]`` tile (output pixels x depthwise channels) in fp32 and stores
it in the input's dtype and memory format. Used when the fused kernel would recompute the depthwise tile
for too many output-channel blocks (see ``dispatch.choose_path``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import depthwise_tile, input_channel, launch, pixel_origin, prune_by_size, tile_ids
from .env import interpreting
from .shapes import conv_output, depthwise_operands

__all__ = ["depthwise_conv2d_forward", "DEPTHWISE_CONFIGS", "DEPTHWISE_TUNING_KEY"]


@triton.jit
def _depthwise_conv2d_kernel(
    x_ptr,  # input [N, C, H, W], any strides
    w_ptr,  # weights [C*r, KH*KW], contiguous; channel k reads input channel k // R
    idx_ptr,  # ragged ranks: int64 [C*r], the input channel of each depthwise channel (read if HAS_INDEX)
    z_ptr,  # output [N, C*r, OH, OW], any strides
    C, H, W, CR, OH, OW, P, R,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p, pid_c = tile_ids(tl.cdiv(CR, BLOCK_C))

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    n, oh, ow, ih0, iw0 = pixel_origin(offs_p, OH, OW, stride_h, stride_w, pad_h, pad_w)

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CR
    chan, mask_in = input_channel(idx_ptr, offs_c, mask_c, R, C, HAS_INDEX)  # mask_in: index in range too
    acc = depthwise_tile(x_ptr, w_ptr, n * sxn, ih0, iw0, mask_p, offs_c, mask_in, chan * sxc, H, W,
                          sxh, sxw, dil_h, dil_w, KH, KW, BLOCK_P, BLOCK_C)

    z_off = (n * szn + oh * szh + ow * szw)[:, None] + (offs_c * szc)[None, :]
    tl.store(z_ptr + z_off, acc.to(z_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


def _cfg(bp: int, bc: int, warps: int) -> "triton.Config":
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps, num_stages=2)


DEPTHWISE_CONFIGS = [_cfg(64, 16, 2), _cfg(128, 16, 4), _cfg(64, 32, 4), _cfg(128, 32, 4), _cfg(256, 32, 8),
                     _cfg(64, 64, 4)]
INTERPRET_CONFIG = _cfg(32, 16, 1)


def _prune(configs, named_args, **kwargs):
    return prune_by_size(configs, {"BLOCK_C": named_args["CR"], "BLOCK_P": named_args["P"]})


# cached per shape, memory format of input and output (channel and width strides) and ragged index; Triton adds
# the tensors' dtypes itself
DEPTHWISE_TUNING_KEY = ["CR", "P", "KH", "KW", "stride_h", "stride_w", "sxc", "sxw", "szc", "szw", "HAS_INDEX"]

_depthwise_conv2d_tuned = triton.autotune(
    configs=[INTERPRET_CONFIG] if interpreting() else DEPTHWISE_CONFIGS,
    key=DEPTHWISE_TUNING_KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": _prune},
)(_depthwise_conv2d_kernel)


def depthwise_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int],
                             config: Optional[dict] = None,
                             channel_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, stride=, padding=, dilation=, groups=C)`` with ``weight [C*r, 1, KH, KW]``;
    with ``channel_index`` (ragged): ``F.conv2d(x[:, channel_index], weight, ..., groups=C*r)``."""
    _, C, H, W = x.shape
    CR, _, KH, KW = weight.shape
    z, P = conv_output(x, (KH, KW), CR, stride, padding, dilation)
    if P == 0 or CR == 0:
        return z
    w, idx, R = depthwise_operands(weight, C, channel_index)
    args = (x, w, idx, z, C, H, W, CR, z.shape[2], z.shape[3], P, R, *x.stride(), *z.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    launch(_depthwise_conv2d_kernel, _depthwise_conv2d_tuned, args,
           dict(KH=KH, KW=KW, HAS_INDEX=channel_index is not None), config,
           lambda m: (triton.cdiv(P, m["BLOCK_P"]) * triton.cdiv(CR, m["BLOCK_C"]),))
    return z
