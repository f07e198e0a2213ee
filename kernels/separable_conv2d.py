"""Fused depthwise + pointwise conv2d in one Triton kernel (v2): the depthwise result never leaves the chip.

Each program owns a 2-D tile of ``TILE_H x TILE_W`` output pixels of one image and ``BLOCK_M`` output channels;
``BLOCK_M`` covers every output channel of the layer up to ``FUSED_BLOCK_M_MAX`` (256), so the depthwise
result is computed once per pixel (``ceil(M / 256)`` times above that). The program walks the input channels
in blocks of ``BLOCK_C``: per block and per rank ``j < R`` (``R`` a constexpr) it computes the fp32
``[TILE_H*TILE_W, BLOCK_C]`` depthwise tile (``KH*KW`` vectorised loads of the input: channels are the
contiguous axis of a channels_last input, and pixel indices come from ``tl.arange`` over constexpr tile
sizes, so the compiler sees both) and feeds it to ``tl.dot`` with the ``[BLOCK_C, BLOCK_M]`` slice of the
pointwise weights. Bias and activation run on the fp32 accumulator before the one store, in the output's
memory format. The taps of a tile overlap (the halo): with ``num_stages=1`` they are plain ``ld.global``
(L1-cached: the first tap brings the halo in, the others hit L1); pipelined configs stage them with
``cp.async.cg`` (L2 only). ``fused_traffic`` models both. NCHW inputs are read as channels_last (one copy,
see ``nchw_input_copy``); ragged ranks read channels through an index (``HAS_INDEX``, one rank per channel).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import ACTIVATIONS, epilogue_store, launch, next_pow2, shared_memory_limit, tile_ids
from .env import interpreting
from .shapes import conv_output, out_size

__all__ = ["separable_conv2d_forward", "FUSED_CONFIGS", "FUSED_BLOCK_M_MAX", "fused_block_m", "fused_shared_bytes",
           "fused_configs_for", "fused_traffic", "nchw_input_copy", "tuned_config", "FUSED_TUNING_KEY", "fused_operands"]


@triton.jit
def _separable_conv2d_kernel(
    x_ptr,  # input [N, C, H, W], any strides (channels_last gives vector loads)
    dw_ptr,  # depthwise weights [KH*KW, R, CK], contiguous: tap, rank, channel
    idx_ptr,  # ragged ranks: int64 [CK], the input channel of each depthwise channel (read if HAS_INDEX)
    pw_ptr,  # pointwise weights [R, CK, M], contiguous
    b_ptr,  # bias [M] (not read unless HAS_BIAS)
    y_ptr,  # output [N, M, OH, OW], any strides
    N, C, H, W, CK, M, OH, OW,  # CK: the channels walked (C, or C*r when ragged); N only keys the autotuner
    sxn, sxc, sxh, sxw,  # input strides (elements)
    syn, sym, syh, syw,  # output strides (elements)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, R: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, HAS_INDEX: tl.constexpr,
    DW_BARRIER: tl.constexpr,  # keep the depthwise out of the dot-operand layout (see below); off in the interpreter
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t, pid_m = tile_ids(tl.cdiv(M, BLOCK_M))  # int64: offsets may pass 2**31
    tiles_w = tl.cdiv(OW, TILE_W)
    tiles = tl.cdiv(OH, TILE_H) * tiles_w  # per image
    n = pid_t // tiles
    t = pid_t % tiles
    p = tl.arange(0, TILE_H * TILE_W)  # constexpr tile sizes: the compiler sees which pixels are contiguous
    oh = (t // tiles_w) * TILE_H + p // TILE_W
    ow = (t % tiles_w) * TILE_W + p % TILE_W
    mask_p = (oh < OH) & (ow < OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + n * sxn

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    acc = tl.zeros((TILE_H * TILE_W, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, CK, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CK
        if HAS_INDEX:  # a bad index (checked asynchronously on the host) computes as zero, never reads out of bounds
            chan = tl.load(idx_ptr + offs_c, mask=mask_c, other=0).to(tl.int64)
            mask_x = mask_c & (chan >= 0) & (chan < C)
        else:
            chan = offs_c
            mask_x = mask_c
        x_chan = chan * sxc
        for j in tl.static_range(R):  # the input taps are the same for every rank: the compiler loads them once
            dw = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=tl.float32)
            for a in tl.static_range(KH):
                ih = ih0 + a * dil_h
                row_ok = mask_p & (ih >= 0) & (ih < H)
                for b in tl.static_range(KW):
                    iw = iw0 + b * dil_w
                    ok = row_ok & (iw >= 0) & (iw < W)
                    xv = tl.load(x_img + (ih * sxh + iw * sxw)[:, None] + x_chan[None, :],
                                 mask=ok[:, None] & mask_x[None, :], other=0.0)
                    wv = tl.load(dw_ptr + ((a * KW + b) * R + j) * CK + offs_c, mask=mask_c, other=0.0)
                    dw += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            if DW_BARRIER:
                # Left alone, the compiler computes the depthwise directly in the layout tl.dot reads its A operand
                # in, where every warp that shares a row of the tile holds the whole row: once per such warp
                # (4x the FMAs with mma.sync on 4 warps, 2x with wgmma on 8 warps at BLOCK_M 256). An opaque
                # identity keeps it in the load layout, computed once, then converted through shared memory
                # (benchmarks/kernels_aot.json: dw_fma_ratio, and fewer instructions and registers too).
                dw = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [dw], dtype=tl.float32, is_pure=False,
                                               pack=1)
            pw = tl.load(pw_ptr + (j * CK + offs_c)[:, None] * M + offs_m[None, :],
                         mask=mask_c[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_C, BLOCK_M]
            acc = tl.dot(dw.to(pw.dtype), pw, acc, input_precision=PRECISION)

    epilogue_store(acc, b_ptr, y_ptr, n * syn + oh * syh + ow * syw, offs_m, mask_p, mask_m, sym, HAS_BIAS, ACT)


FUSED_BLOCK_M_MAX = 256  # output channels one program covers: the depthwise is recomputed ceil(M / 256) times
_ACC_PER_THREAD = 64  # fp32 accumulator registers per thread a config may use (the rest: tiles, addresses)
# (TILE_H, TILE_W, BLOCK_C, num_stages); each is generated for every BLOCK_M, with the warps its accumulator needs
_TILES = [(4, 8, 32, 1), (8, 8, 32, 1), (8, 8, 64, 1), (4, 16, 32, 1), (8, 16, 32, 1), (16, 8, 32, 1),
          (8, 8, 32, 2), (8, 16, 16, 2)]


def _configs(tiles, warps_max: int = 8) -> list:
    out = []
    for bm in (16, 32, 64, 128, 256):
        for th, tw, bc, stages in tiles:
            warps = max(4, next_pow2(th * tw * bm // (32 * _ACC_PER_THREAD)))
            if warps <= warps_max:
                out.append(triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_M": bm, "BLOCK_C": bc},
                                         num_warps=warps, num_stages=stages))
    return out


# GPU search space (pruned per shape to the configs of the layer's BLOCK_M); the interpreter runs one small
# config per BLOCK_M so tests stay fast.
FUSED_CONFIGS = _configs(_TILES)
INTERPRET_CONFIGS = [triton.Config({"TILE_H": 4, "TILE_W": 8, "BLOCK_M": bm, "BLOCK_C": 16}, num_warps=1,
                                   num_stages=1) for bm in (16, 32, 64, 128, 256)]


def fused_block_m(m: int) -> int:
    """The ``BLOCK_M`` the kernel runs a layer with ``m`` outputs at: every output channel, up to 256."""
    return min(FUSED_BLOCK_M_MAX, max(16, next_pow2(m)))


def fused_shared_bytes(cfg: "triton.Config", itemsize: int, kh: int, kw: int, rank: int = 1) -> int:
    """Upper estimate of a config's shared memory (bytes) on sm_80/sm_90, for both memory formats (an NCHW call
    reads its input as channels_last; the output store needs none). Checked against Triton's compiler for every
    config in ``benchmarks/kernels_aot.py`` and ``tests/kernels/test_aot.py``. Per rank: the pointwise slice,
    the tap weights and the depthwise tile (its layout conversion and the dot operand); pipelined configs
    (``num_stages > 1``) also stage the next channel block's ``kh*kw`` input taps with ``cp.async``."""
    k = cfg.kwargs
    p, bm, bc, s = k["TILE_H"] * k["TILE_W"], k["BLOCK_M"], k["BLOCK_C"], cfg.num_stages
    per_rank = (bc * bm + kh * kw * bc + 2 * p * bc) * itemsize  # the depthwise tile: converted, then an operand
    taps = kh * kw * p * bc * itemsize
    staged = (s - 1) * (taps + rank * (bc * bm + kh * kw * bc) * itemsize)
    scratch = 3072  # the compiler's own (layout conversions, barriers)
    return max(staged + rank * per_rank, p * bm * itemsize) + scratch


def fused_configs_for(itemsize: int, shared_limit: int, kh: int, kw: int, m: int, rank: int = 1,
                      configs: Optional[Sequence["triton.Config"]] = None) -> list:
    """The configs for a layer with ``m`` outputs (its ``BLOCK_M``) whose shared memory fits ``shared_limit``
    (an unpipelined config of that ``BLOCK_M`` always remains: the smallest estimate)."""
    bm = fused_block_m(m)
    configs = [c for c in (configs if configs is not None else FUSED_CONFIGS) if c.kwargs["BLOCK_M"] == bm]
    kept = [c for c in configs if fused_shared_bytes(c, itemsize, kh, kw, rank) <= shared_limit]
    return kept or [min(configs, key=lambda c: fused_shared_bytes(c, itemsize, kh, kw, rank))]


def _prune(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    kept = fused_configs_for(x.element_size(), shared_memory_limit(x.device), kwargs["KH"], kwargs["KW"],
                             named_args["M"], kwargs["R"], configs)
    if interpreting():
        return kept[:1]
    oh, ow, ck = named_args["OH"], named_args["OW"], named_args["CK"]
    small = [c for c in kept if c.kwargs["TILE_H"] <= max(4, next_pow2(oh))
             and c.kwargs["TILE_W"] <= max(8, next_pow2(ow)) and c.kwargs["BLOCK_C"] <= max(16, next_pow2(ck))]
    return small or kept[:1]


# What a tuned config is cached under. Beyond the shape: the channel and width strides of the input and output
# (memory format), the rank, the ragged index, bias, activation and dot precision. Triton adds the dtype of every
# tensor argument to the key itself (3.0 on; tests/kernels/test_tuning.py checks it).
FUSED_TUNING_KEY = ["N", "CK", "M", "OH", "OW", "KH", "KW", "R", "stride_h", "stride_w", "sxc", "sxw", "sym",
                    "syw", "HAS_INDEX", "HAS_BIAS", "ACT", "PRECISION"]

_separable_conv2d_tuned = triton.autotune(
    configs=INTERPRET_CONFIGS if interpreting() else FUSED_CONFIGS,
    key=FUSED_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(_separable_conv2d_kernel)


def tuned_config() -> Optional[dict]:
    """The config the autotuner chose for the most recent tuned launch (``TILE_H``, ``TILE_W``, ``BLOCK_M``,
    ``BLOCK_C``, ``num_warps``, ``num_stages``), or None before any: for the benchmark's traffic model."""
    best = getattr(_separable_conv2d_tuned, "best_config", None)
    if best is None:
        return None
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


def nchw_input_copy(channels: int, itemsize: int) -> bool:
    """Whether an NCHW call reads a channels_last copy of its input (True) or the input as it is.

    In NCHW the tile's contiguous axis is the pixel row, and every tap shifts it off alignment: the compiled
    loads are scalar, ~9x (3x3) more load instructions than channels_last (``benchmarks/kernels_aot.json``).
    The copy costs one extra read and write of the input (``2*itemsize*N*C*H*W`` bytes, about half the fused
    kernel's own compulsory traffic when ``C == M``) and buys vector loads once a channel vector is at least 16
    bytes. Below that (stems with 3 channels) the copy buys nothing. Not measured on a GPU yet: the benchmark
    times both (``triton_nchw`` vs ``triton_cl``)."""
    return channels * itemsize >= 16


def fused_operands(dw_weight: torch.Tensor, pw_weight: torch.Tensor, in_channels: int,
                   channel_index: Optional[torch.Tensor]):
    """The kernel's weight layouts: depthwise ``[KH*KW, R, CK]``, pointwise ``[R, CK, M]`` (both contiguous
    along the channels a program walks), the int64 index (or a dummy), ``R`` and ``CK``. Uniform ranks: depthwise
    channel ``c*R + j`` is rank ``j`` of input channel ``c``; ragged: one rank per depthwise channel."""
    cr, _, kh, kw = dw_weight.shape
    m = pw_weight.shape[0]
    if channel_index is not None:
        r, ck = 1, cr
        idx = channel_index.to(torch.int64).contiguous()
    else:
        r, ck = max(cr // max(in_channels, 1), 1), in_channels
        idx = None
    dw = dw_weight.reshape(ck, r, kh * kw).permute(2, 1, 0).contiguous()
    pw = pw_weight.reshape(m, ck, r).permute(2, 1, 0).contiguous()
    return dw, pw, (idx if idx is not None else dw), r, ck


def fused_traffic(n: int, c: int, h: int, w: int, m: int, r: int, kh: int, kw: int, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], itemsize: int, cfg: Dict[str, int],
                  num_stages: int = 1, nchw_copy: bool = False) -> Dict[str, float]:
    """Analytic traffic of one call with config ``cfg`` (``TILE_H``, ``TILE_W``, ``BLOCK_M``): bytes from HBM,
    bytes from L2, FLOPs (2 per multiply-add, depthwise computed ``ceil(M/BLOCK_M)`` times).

    HBM: the input once (the tiles' halos overlap their neighbours' and are assumed to hit L2), the output once,
    the weights once, plus the NCHW copy when it happens. L2: every program reads its tile's halo (unpipelined,
    L1 serves the other taps) or all ``kh*kw`` taps (``cp.async.cg`` bypasses L1), for each ``BLOCK_M`` block,
    plus the weights per program."""
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    th, tw, bm = cfg["TILE_H"], cfg["TILE_W"], cfg["BLOCK_M"]
    tiles = n * math.ceil(oh / th) * math.ceil(ow / tw)
    mblocks = math.ceil(m / bm)
    halo = (min(h, (th - 1) * stride[0] + (kh - 1) * dilation[0] + 1)
            * min(w, (tw - 1) * stride[1] + (kw - 1) * dilation[1] + 1))
    px_per_prog = halo if num_stages <= 1 else kh * kw * th * tw
    weights = (c * r * kh * kw + c * r * m + m) * itemsize
    hbm = (n * c * h * w + n * m * oh * ow) * itemsize + weights
    if nchw_copy:
        hbm += 2 * n * c * h * w * itemsize
    l2 = tiles * mblocks * (px_per_prog * c * itemsize + (c * r * kh * kw + c * r * bm) * itemsize)
    l2 += n * m * oh * ow * itemsize
    flops = 2 * n * oh * ow * c * r * (kh * kw * mblocks + m)
    return {"hbm_bytes": float(hbm), "l2_bytes": float(l2), "flops": float(flops), "recompute": float(mblocks)}


def separable_conv2d_forward(
    x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, bias: Optional[torch.Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], activation: str = "none",
    precision: str = "ieee", config: Optional[dict] = None, channel_index: Optional[torch.Tensor] = None,
    nchw_copy: Optional[bool] = None,
) -> torch.Tensor:
    """Launch the fused kernel. Arguments are already normalised (pairs of ints, activation name).

    ``channel_index`` (ragged ranks): int64 ``[C*r]``, the input channel each depthwise filter reads.
    ``config`` (``{"TILE_H", "TILE_W", "BLOCK_C", "num_warps", "num_stages"}``; ``BLOCK_M`` defaults to
    :func:`fused_block_m`) bypasses the autotuner: tests and the benchmark use it to check every config.
    ``nchw_copy`` overrides :func:`nchw_input_copy` for an NCHW input (the output keeps the input's format).
    """
    _, C, H, W = x.shape
    CR, _, KH, KW = dw_weight.shape
    M = pw_weight.shape[0]
    y, P = conv_output(x, (KH, KW), M, stride, padding, dilation)
    if P == 0 or M == 0:
        return y
    if nchw_copy is None:
        nchw_copy = nchw_input_copy(C, x.element_size())
    if nchw_copy and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    dw, pw, idx, R, CK = fused_operands(dw_weight, pw_weight.to(x.dtype), C, channel_index)
    b = bias.contiguous() if bias is not None else pw  # dummy pointer, never read
    OH, OW = y.shape[2], y.shape[3]

    def grid(meta):
        tiles = triton.cdiv(OH, meta["TILE_H"]) * triton.cdiv(OW, meta["TILE_W"])
        return (y.shape[0] * tiles * triton.cdiv(M, meta["BLOCK_M"]),)

    meta = dict(KH=KH, KW=KW, R=R, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], PRECISION=precision,
                HAS_INDEX=channel_index is not None, DW_BARRIER=not interpreting())
    args = (x, dw, idx, pw, b, y, y.shape[0], C, H, W, CK, M, OH, OW, *x.stride(), *y.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    if config is not None:
        config = {"BLOCK_M": fused_block_m(M), **config}
    launch(_separable_conv2d_kernel, _separable_conv2d_tuned, args, meta, config, grid)
    return y
