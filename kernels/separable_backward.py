"""Backward of the fused separable op in Triton: the depthwise output is recomputed, never stored.

With ``z = depthwise(x)`` ``[P, C*r]`` (``P = N*OH*OW`` output pixels) and ``ga`` the output gradient times the
activation's derivative (elementwise, in torch, before the kernels):

* ``_separable_bwd_fused_kernel``, one program per (tile of ``BLOCK_P`` output pixels, block of ``BLOCK_K``
  depthwise channels): recomputes the depthwise tile ``z`` in fp32 registers, walks the output channels in
  blocks of ``BLOCK_M`` computing ``gz = ga @ pw`` (``tl.dot``) and ``ga^T @ z`` (``tl.dot``, atomically
  added into the fp32 ``grad_pw``), then ``grad_dw[k, tap] += sum_p gz * x_tap`` (atomic, fp32) and stores
  ``gz`` ``[P, C*r]`` for the input gradient.
* ``_separable_bwd_input_kernel``, one program per (tile of ``BLOCK_P`` input pixels, block of ``BLOCK_C``
  input channels): the transposed depthwise conv in gather form, summed over the filters that read each input
  channel (``r`` of them, or the ragged ``channel_index``'s inverse as CSR lists): no atomics, deterministic.

The atomics make ``grad_dw`` and ``grad_pw`` nondeterministic in the last bits (fp32 addition order varies
between runs), as cuDNN's weight gradients are; ``grad_x`` and ``grad_bias`` are deterministic.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .common import depthwise_tile, gemm_config, input_channel, launch, pixel_origin, prune_by_size, tile_ids
from .env import interpreting
from .shapes import depthwise_operands, out_size, output_memory_format

__all__ = ["separable_conv2d_backward", "BWD_FUSED_CONFIGS", "BWD_INPUT_CONFIGS", "BWD_FUSED_TUNING_KEY",
           "BWD_INPUT_TUNING_KEY", "activation_grad"]


@triton.jit
def _separable_bwd_fused_kernel(
    x_ptr,  # input [N, C, H, W], any strides
    dw_ptr,  # depthwise weights [C*r, KH*KW], contiguous
    idx_ptr,  # ragged ranks: int64 [C*r] input channel of each depthwise channel (read if HAS_INDEX)
    pw_ptr,  # pointwise weights [M, C*r], contiguous, input dtype
    g_ptr,  # activated output gradient [N, M, OH, OW], any strides (zero strides of an expanded grad too)
    gz_ptr,  # out (if NEED_GZ_OUT): gradient of the depthwise output [P, C*r], contiguous, input dtype
    gdw_ptr,  # out (if NEED_DW): fp32 [C*r, KH*KW], zeroed, atomically accumulated
    gpw_ptr,  # out (if NEED_PW): fp32 [M, C*r], zeroed, atomically accumulated
    C, H, W, CR, M, OH, OW, P, R,
    sxn, sxc, sxh, sxw,
    sgn, sgm, sgh, sgw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_INDEX: tl.constexpr, PRECISION: tl.constexpr,
    NEED_GZ_OUT: tl.constexpr, NEED_DW: tl.constexpr, NEED_PW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p, pid_k = tile_ids(tl.cdiv(CR, BLOCK_K))  # int64 from here on

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    n, oh, ow, ih0, iw0 = pixel_origin(offs_p, OH, OW, stride_h, stride_w, pad_h, pad_w)
    x_pix = n * sxn
    g_pix = n * sgn + oh * sgh + ow * sgw

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < CR
    chan, mask_c = input_channel(idx_ptr, offs_k, mask_k, R, C, HAS_INDEX)  # mask_c: index in range too
    x_chan = chan * sxc

    if NEED_PW:  # the depthwise tile, recomputed (fp32 registers), as the dot operand
        z = depthwise_tile(x_ptr, dw_ptr, x_pix, ih0, iw0, mask_p, offs_k, mask_c, x_chan, H, W,
                           sxh, sxw, dil_h, dil_w, KH, KW, BLOCK_P, BLOCK_K).to(pw_ptr.dtype.element_ty)

    gz = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        ga = tl.load(g_ptr + g_pix[:, None] + (offs_m * sgm)[None, :], mask=mask_p[:, None] & mask_m[None, :],
                     other=0.0).to(pw_ptr.dtype.element_ty)  # [BLOCK_P, BLOCK_M]
        if NEED_GZ_OUT or NEED_DW:
            pw = tl.load(pw_ptr + offs_m[:, None] * CR + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)  # [BLOCK_M, BLOCK_K]
            gz = tl.dot(ga, pw, gz, input_precision=PRECISION)
        if NEED_PW:
            part = tl.dot(tl.trans(ga), z, input_precision=PRECISION)  # [BLOCK_M, BLOCK_K]
            tl.atomic_add(gpw_ptr + offs_m[:, None] * CR + offs_k[None, :], part,
                          mask=mask_m[:, None] & mask_k[None, :], sem="relaxed")

    if NEED_DW:  # grad_dw[k, tap] = sum over the tile's pixels of gz * the tap's input
        for i in tl.static_range(KH):
            ih = ih0 + i * dil_h
            row_ok = mask_p & (ih >= 0) & (ih < H)
            for j in tl.static_range(KW):
                iw = iw0 + j * dil_w
                ok = row_ok & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + (x_pix + ih * sxh + iw * sxw)[:, None] + x_chan[None, :],
                             mask=ok[:, None] & mask_c[None, :], other=0.0)
                tl.atomic_add(gdw_ptr + offs_k * (KH * KW) + (i * KW + j), tl.sum(gz * xv.to(tl.float32), axis=0),
                              mask=mask_c, sem="relaxed")
    if NEED_GZ_OUT:
        tl.store(gz_ptr + offs_p[:, None] * CR + offs_k[None, :], gz.to(gz_ptr.dtype.element_ty),
                 mask=mask_p[:, None] & mask_k[None, :])


@triton.jit
def _separable_bwd_input_kernel(
    gz_ptr,  # gradient of the depthwise output [N*OH*OW, C*r], contiguous
    dw_ptr,  # depthwise weights [C*r, KH*KW], contiguous
    order_ptr,  # ragged: int64 [C*r], the filters sorted by the input channel they read (read if HAS_INDEX)
    start_ptr,  # ragged: int64 [C], where each input channel's filters start in order_ptr
    count_ptr,  # ragged: int64 [C], how many filters read each input channel (0 allowed)
    gx_ptr,  # out: input gradient [N, C, H, W], any strides
    C, H, W, CR, OH, OW, PIN, R,  # PIN = N*H*W input pixels
    sgxn, sgxc, sgxh, sgxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p, pid_c = tile_ids(tl.cdiv(C, BLOCK_C))

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < PIN
    n, ih, iw, _, _ = pixel_origin(offs_p, H, W, 1, 1, 0, 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if HAS_INDEX:
        first = tl.load(start_ptr + offs_c, mask=mask_c, other=0)
        count = tl.load(count_ptr + offs_c, mask=mask_c, other=0)
        filters = tl.max(count, axis=0)
    else:
        first = offs_c * R
        count = tl.zeros((BLOCK_C,), dtype=tl.int64) + R
        filters = R

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for f in range(0, filters):
        ok_k = mask_c & (f < count)
        if HAS_INDEX:
            k = tl.load(order_ptr + first + f, mask=ok_k, other=0)
        else:
            k = first + f
        for i in tl.static_range(KH):
            th = ih + pad_h - i * dil_h  # oh * stride_h when output row oh reads input row ih through tap i
            oh = th // stride_h
            row_ok = mask_p & (th >= 0) & (th - oh * stride_h == 0) & (oh < OH)
            for j in tl.static_range(KW):
                tw = iw + pad_w - j * dil_w
                ow = tw // stride_w
                ok = row_ok & (tw >= 0) & (tw - ow * stride_w == 0) & (ow < OW)
                g = tl.load(gz_ptr + ((n * OH + oh) * OW + ow)[:, None] * CR + k[None, :],
                            mask=ok[:, None] & ok_k[None, :], other=0.0)
                wv = tl.load(dw_ptr + k * (KH * KW) + (i * KW + j), mask=ok_k, other=0.0)
                acc += g.to(tl.float32) * wv.to(tl.float32)[None, :]

    gx_off = (n * sgxn + ih * sgxh + iw * sgxw)[:, None] + (offs_c * sgxc)[None, :]
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


_cfg = gemm_config

# GPU search spaces (pruned per shape); the interpreter runs one small config so tests stay fast. The fused
# kernel holds gz [P, K] (fp32), z [P, K] and a ga [P, M] / pw [M, K] pair in flight: moderate blocks.
BWD_FUSED_CONFIGS = [_cfg(32, 32, 16, 2, 2), _cfg(64, 32, 32, 4, 2), _cfg(64, 64, 32, 4, 2), _cfg(128, 32, 32, 4, 2),
                     _cfg(128, 64, 32, 8, 2), _cfg(64, 32, 64, 4, 2)]
BWD_FUSED_INTERPRET_CONFIG = _cfg(32, 16, 16, 1, 1)


def _input_cfg(bp: int, bc: int, warps: int) -> "triton.Config":
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps, num_stages=2)


BWD_INPUT_CONFIGS = [_input_cfg(64, 16, 2), _input_cfg(128, 16, 4), _input_cfg(64, 32, 4), _input_cfg(128, 32, 4),
                     _input_cfg(256, 32, 8)]
BWD_INPUT_INTERPRET_CONFIG = _input_cfg(32, 16, 1)


def _prune_fused(configs, named_args, **kwargs):
    return prune_by_size(configs, {"BLOCK_M": named_args["M"], "BLOCK_K": named_args["CR"], "BLOCK_P": named_args["P"]})


def _prune_input(configs, named_args, **kwargs):
    return prune_by_size(configs, {"BLOCK_C": named_args["C"], "BLOCK_P": named_args["PIN"]})


# Cached per shape, memory format of x and of the gradient (channel and width strides), ragged index, which
# gradients are needed and dot precision; Triton adds the dtypes. The activation is applied in torch before the
# kernels (it changes neither kernel), so it is not part of the key.
BWD_FUSED_TUNING_KEY = ["CR", "M", "P", "KH", "KW", "stride_h", "stride_w", "sxc", "sxw", "sgm", "sgw",
                        "HAS_INDEX", "PRECISION", "NEED_GZ_OUT", "NEED_DW", "NEED_PW"]
BWD_INPUT_TUNING_KEY = ["C", "CR", "PIN", "KH", "KW", "stride_h", "stride_w", "sgxc", "sgxw", "HAS_INDEX"]

# reset_to_zero: the autotuner's benchmark runs the kernel several times; the atomically accumulated weight
# gradients are zeroed before each run so the tuned call's result is the sum of one run only.
_separable_bwd_fused_tuned = triton.autotune(
    configs=[BWD_FUSED_INTERPRET_CONFIG] if interpreting() else BWD_FUSED_CONFIGS,
    key=BWD_FUSED_TUNING_KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": _prune_fused},
    reset_to_zero=["gdw_ptr", "gpw_ptr"],
)(_separable_bwd_fused_kernel)

_separable_bwd_input_tuned = triton.autotune(
    configs=[BWD_INPUT_INTERPRET_CONFIG] if interpreting() else BWD_INPUT_CONFIGS,
    key=BWD_INPUT_TUNING_KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": _prune_input},
)(_separable_bwd_input_kernel)


def activation_grad(grad: torch.Tensor, y: Optional[torch.Tensor], activation: str,
                    preact=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``grad * act'(u)`` in the input dtype, and the same in fp32 where it was computed so (for the bias sum).

    relu/relu6 read their masks from the saved output ``y``; silu needs the pre-activation ``u``:
    ``preact()`` recomputes it (the forward op with activation "none")."""
    if activation == "relu":
        return grad * (y > 0), None
    if activation == "relu6":
        return grad * ((y > 0) & (y < 6)), None
    if activation == "silu":
        u = preact().float()
        s = torch.sigmoid(u)
        ga32 = grad.float() * s * (1 + u * (1 - s))
        return ga32.to(grad.dtype), ga32
    return grad, None


def _csr_of_index(index: torch.Tensor, channels: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filters grouped by the input channel they read: (order, start, count), without a device sync. An
    out-of-range index value (which the forward refused or asserted on) is sorted last and never referenced."""
    index = index.to(torch.int64)
    key = torch.where((index >= 0) & (index < channels), index, torch.full_like(index, channels))
    count = torch.zeros(channels + 1, dtype=torch.int64, device=index.device)
    count.scatter_add_(0, key, torch.ones_like(key))
    count = count[:channels].contiguous()
    start = (torch.cumsum(count, 0) - count).contiguous()
    order = torch.argsort(key, stable=True).contiguous()
    return order, start, count


def separable_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
    bias: Optional[torch.Tensor], y: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], activation: str, channel_index: Optional[torch.Tensor], needs: Sequence[bool],
    precision: str = "ieee", configs: Optional[Tuple[Optional[dict], Optional[dict]]] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(gx, gdw, gpw, gb)`` of ``act(pointwise(depthwise(x)) + bias)`` w.r.t. its four tensors, None
    where ``needs`` (four bools) says so. Arguments as the op's, already normalised; ``y`` is the saved output
    (read by relu/relu6). ``gx`` has ``x``'s memory format; the weight gradients are accumulated in fp32.

    ``configs`` (a forced ``(fused, input)`` kernel config pair, either None to autotune) are for tests."""
    need_x, need_dw, need_pw, need_b = (bool(v) for v in needs)
    need_b = need_b and bias is not None
    _, C, H, W = x.shape
    CR, _, KH, KW = dw_weight.shape
    M = pw_weight.shape[0]
    fused_cfg, input_cfg = configs if configs is not None else (None, None)

    def preact():
        return torch.ops.dsrewrite.separable_conv2d.default(x, dw_weight, pw_weight, bias, list(stride),
                                                            list(padding), list(dilation), "none", "auto",
                                                            precision, channel_index)

    ga, ga32 = activation_grad(grad, y, activation, preact)
    gb = None
    if need_b:
        gb = (ga32 if ga32 is not None else ga).sum((0, 2, 3), dtype=torch.float32).to(bias.dtype)
    gx = gdw = gpw = None
    OH = out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = out_size(W, KW, stride[1], padding[1], dilation[1])
    P = x.shape[0] * OH * OW
    dw, idx, R = depthwise_operands(dw_weight, C, channel_index)
    pw = pw_weight.reshape(M, CR).to(x.dtype).contiguous()
    if need_dw:
        gdw = torch.zeros((CR, KH * KW), dtype=torch.float32, device=x.device)
    if need_pw:
        gpw = torch.zeros((M, CR), dtype=torch.float32, device=x.device)
    gz = torch.empty((P, CR), dtype=x.dtype, device=x.device) if need_x else None
    if (need_x or need_dw or need_pw) and P > 0 and M > 0 and CR > 0:
        # unneeded outputs get a scratch element, never written: not ``dw`` (a view of the weights), which the
        # autotuner's reset_to_zero would wipe
        scratch = torch.zeros(1, dtype=torch.float32, device=x.device)
        args = (x, dw, idx, pw, ga, gz if gz is not None else scratch, gdw if gdw is not None else scratch,
                gpw if gpw is not None else scratch, C, H, W, CR, M, OH, OW, P, R, *x.stride(), *ga.stride(),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
        meta = dict(KH=KH, KW=KW, HAS_INDEX=channel_index is not None, PRECISION=precision,
                    NEED_GZ_OUT=need_x, NEED_DW=need_dw, NEED_PW=need_pw)
        launch(_separable_bwd_fused_kernel, _separable_bwd_fused_tuned, args, meta, fused_cfg,
               lambda m: (triton.cdiv(P, m["BLOCK_P"]) * triton.cdiv(CR, m["BLOCK_K"]),))
    elif gz is not None:
        gz.zero_()
    if need_x:
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
        if channel_index is not None:
            order, start, count = _csr_of_index(channel_index, C)
        else:
            order = start = count = dw  # dummies, never read
        PIN = gx.shape[0] * H * W
        if PIN > 0 and C > 0:
            args = (gz, dw, order, start, count, gx, C, H, W, CR, OH, OW, PIN, R, *gx.stride(),
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
            launch(_separable_bwd_input_kernel, _separable_bwd_input_tuned, args,
                   dict(KH=KH, KW=KW, HAS_INDEX=channel_index is not None), input_cfg,
                   lambda m: (triton.cdiv(PIN, m["BLOCK_P"]) * triton.cdiv(C, m["BLOCK_C"]),))
    if gdw is not None:
        gdw = gdw.reshape(dw_weight.shape).to(dw_weight.dtype)
    if gpw is not None:
        gpw = gpw.reshape(pw_weight.shape).to(pw_weight.dtype)
    return gx, gdw, gpw, gb
