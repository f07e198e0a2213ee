"""Kernel variants that were tried and not adopted, kept so ``benchmarks/kernels_aot.py`` can show why.

``_halo_gather_kernel``: the fused forward with an explicit input halo. Each channel block loads the tile's
halo once (``[HALO_P, BLOCK_C]``, HALO_P the halo's pixel count rounded up to a power of two) and forms each
tap's shifted window with ``tl.gather`` instead of a load. In Triton 3.6-3.9 the compiler lowers that gather
to warp shuffles in a layout sized for the halo, which replicates the smaller output tile (>= 2x the FMAs) and
loads the halo one element at a time; ``benchmarks/kernels_aot.json`` rows of kernel ``halo_gather``.
Forward only, stride and dilation as constexprs, no ragged index; not used by the package.
"""
import triton
import triton.language as tl

from dsrewrite.kernels.common import epilogue_store, tile_ids


@triton.jit
def _halo_gather_kernel(
    x_ptr, dw_ptr, idx_ptr, pw_ptr, b_ptr, y_ptr,
    N, C, H, W, CK, M, OH, OW,
    sxn, sxc, sxh, sxw, syn, sym, syh, syw,
    pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
    DW: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    HALO_H: tl.constexpr = (TILE_H - 1) * SH + (KH - 1) * DH + 1
    HALO_W: tl.constexpr = (TILE_W - 1) * SW + (KW - 1) * DW + 1
    HALO_P: tl.constexpr = triton.next_power_of_2(HALO_H * HALO_W)
    pid_t, pid_m = tile_ids(tl.cdiv(M, BLOCK_M))
    tiles_w = tl.cdiv(OW, TILE_W)
    tiles = tl.cdiv(OH, TILE_H) * tiles_w
    n = pid_t // tiles
    t = pid_t % tiles
    oh0 = (t // tiles_w) * TILE_H
    ow0 = (t % tiles_w) * TILE_W
    p = tl.arange(0, TILE_H * TILE_W)
    ph = p // TILE_W
    pw_ = p % TILE_W
    oh = oh0 + ph
    ow = ow0 + pw_
    mask_p = (oh < OH) & (ow < OW)
    q = tl.arange(0, HALO_P)
    ih = oh0 * SH - pad_h + q // HALO_W
    iw = ow0 * SW - pad_w + q % HALO_W
    mask_q = (q < HALO_H * HALO_W) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_halo = x_ptr + n * sxn + ih * sxh + iw * sxw
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    zero_c = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=tl.int32)
    acc = tl.zeros((TILE_H * TILE_W, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, CK, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CK
        halo = tl.load(x_halo[:, None] + (offs_c * sxc)[None, :], mask=mask_q[:, None] & mask_c[None, :], other=0.0)
        for j in tl.static_range(R):
            dw = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=tl.float32)
            for a in tl.static_range(KH):
                for b in tl.static_range(KW):
                    src = (ph * SH + a * DH) * HALO_W + pw_ * SW + b * DW
                    xv = tl.gather(halo, src[:, None] + zero_c, 0)
                    wv = tl.load(dw_ptr + ((a * KW + b) * R + j) * CK + offs_c, mask=mask_c, other=0.0)
                    dw += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            pw = tl.load(pw_ptr + (j * CK + offs_c)[:, None] * M + offs_m[None, :],
                         mask=mask_c[:, None] & mask_m[None, :], other=0.0)
            acc = tl.dot(dw.to(pw.dtype), pw, acc, input_precision=PRECISION)
    epilogue_store(acc, b_ptr, y_ptr, n * syn + oh * syh + ow * syw, offs_m, mask_p, mask_m, sym, HAS_BIAS, ACT)
