"""Compile the Triton kernels for NVIDIA targets without a GPU and record what the compiler made of them.

For the fused forward kernel, every autotune config at ``BLOCK_M`` 128 and 256 (the layer widths the kernel
covers in one program), for sm_90 and sm_80, fp16 / bf16 / fp32 (tf32), channels_last and NCHW calls, 3x3
and 7x7, it runs Triton's real pipeline down to a cubin and reads the cubin back (``cuobjdump``, shipped with
Triton): shared memory (compiled vs ``fused_shared_bytes``), registers and spills, and in the SASS of the main
loop the global loads by width (vector vs one element), ``cp.async`` copies, and the FP32 FMAs against the
number the depthwise tile needs (``dw_fma_ratio``: 1.0 when nothing is computed twice). Extra rows: rank 2,
the ragged index, NCHW read directly (the route of inputs narrower than 16 bytes per pixel), the kernel
without its ``DW_BARRIER`` identity, the halo-gather variant that was tried, and the split and backward
kernels. A config whose estimate is over the architecture's limit is recorded, not compiled.

    python benchmarks/kernels_aot.py --json benchmarks/kernels_aot.json --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

from dsrewrite.kernels.aot import SHARED_LIMIT, compile_case, dw_fma_ratio, fused_case
from dsrewrite.kernels.depthwise import DEPTHWISE_CONFIGS
from dsrewrite.kernels.pointwise import POINTWISE_CONFIGS
from dsrewrite.kernels.separable_backward import BWD_FUSED_CONFIGS, BWD_INPUT_CONFIGS
from dsrewrite.kernels.separable_conv2d import FUSED_CONFIGS, fused_configs_for, fused_shared_bytes

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
PRECISION = {"fp32": "tf32", "fp16": "tf32", "bf16": "tf32"}  # fp32 means tf32 tensor cores, as cuDNN's default
CL_UNIT = ["stride_h", "stride_w", "dil_h", "dil_w"]


def fused_rows(archs: List[int], dtypes: List[str], layouts: List[str], ksizes: List[int],
               block_ms: List[int], max_ratio: float) -> List[dict]:
    """(case, row) pairs for the fused kernel: the main sweep, then the extra rows."""
    out = []
    for bm in block_ms:
        for cfg in (c for c in FUSED_CONFIGS if c.kwargs["BLOCK_M"] == bm):
            for k in ksizes:
                for dtype in dtypes:
                    for layout in layouts:
                        for arch in archs:
                            out.append(_fused(cfg, dtype, arch, layout, k, 1, False, max_ratio))
    first = [c for c in FUSED_CONFIGS if c.kwargs["BLOCK_M"] == 128][:2]
    for arch in archs:
        for cfg in first:
            out.append(_fused(cfg, "fp16" if arch >= 90 else "bf16", arch, "channels_last", 3, 2, False, max_ratio))
            out.append(_fused(cfg, "fp16", arch, "channels_last", 3, 1, True, max_ratio))
            out.append(_fused(cfg, "fp16", arch, "nchw_direct", 3, 1, False, max_ratio))
    for arch in archs:  # without the DW_BARRIER identity: what the compiler does with the depthwise then
        for cfg in [c for c in FUSED_CONFIGS if c.kwargs["TILE_H"] == 8 and c.kwargs["TILE_W"] == 8
                    and c.kwargs["BLOCK_C"] == 32 and c.num_stages == 1 and c.kwargs["BLOCK_M"] in (128, 256)]:
            case, row = _fused(cfg, "fp16", arch, "channels_last", 3, 1, False, max_ratio)
            case["constexprs"]["DW_BARRIER"] = False
            out.append((case, dict(row, kernel="fused_no_barrier")))
    for arch in archs:  # the explicit-halo variant that was not adopted (benchmarks/kernel_variants.py)
        cfg = first[1]
        spec = fused_case(cfg, "fp16", arch)
        consts = {k: v for k, v in spec["constexprs"].items() if k not in ("HAS_INDEX", "DW_BARRIER")}
        consts.update(SH=1, SW=1, DH=1, DW=1)
        case = dict(spec, kernel="kernel_variants:_halo_gather_kernel", constexprs=consts,
                    ones=[o for o in spec["ones"] if o not in CL_UNIT])
        out.append((case, dict(kernel="halo_gather", arch=arch, dtype="fp16", layout="channels_last", k=3, rank=1,
                               ragged=False, config=dict(cfg.kwargs, num_warps=cfg.num_warps,
                                                         num_stages=cfg.num_stages))))
    return out


def _fused(cfg, dtype, arch, layout, k, rank, ragged, max_ratio):
    case = fused_case(cfg, dtype, arch, layout, k, rank, ragged, PRECISION[dtype])
    est = fused_shared_bytes(cfg, ITEMSIZE[dtype], k, k, rank)
    m = cfg.kwargs["BLOCK_M"]
    row = dict(kernel="fused", arch=arch, dtype=dtype, layout=layout, k=k, rank=rank, ragged=ragged,
               config=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages), smem_estimate=est,
               kept=cfg in fused_configs_for(ITEMSIZE[dtype], SHARED_LIMIT[arch], k, k, m, rank))
    if est > max_ratio * SHARED_LIMIT[arch]:
        row.update(fits=False, smem_bytes=None, error=f"not compiled: estimate over {max_ratio:g}x the limit")
        return None, row
    return case, row


def other_rows(archs: List[int]) -> List[tuple]:
    """The split kernels (channels_last, 3x3) and the backward kernels, one or two configs each."""
    out = []
    for arch in archs:
        for dtype in ("fp16", "fp32"):
            for cfg in DEPTHWISE_CONFIGS[-2:]:
                case = dict(kernel="depthwise", constexprs=dict(KH=3, KW=3, HAS_INDEX=False, **cfg.kwargs), dtype=dtype,
                            arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            ones=["sxc", "szc"] + CL_UNIT, pointer_dtypes={"idx_ptr": "i64"})
                out.append((case, dict(kernel="depthwise", arch=arch, dtype=dtype, layout="channels_last", k=3,
                                       config=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))))
            for cfg in POINTWISE_CONFIGS[:2]:
                case = dict(kernel="pointwise", constexprs=dict(HAS_BIAS=True, ACT=0, PRECISION="tf32", **cfg.kwargs),
                            dtype=dtype, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            ones=["szc", "sym"])
                out.append((case, dict(kernel="pointwise", arch=arch, dtype=dtype, layout="channels_last", k=1,
                                       config=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))))
            for name, configs, consts in (
                    ("bwd_fused", BWD_FUSED_CONFIGS[:2], dict(KH=3, KW=3, HAS_INDEX=False, PRECISION="tf32",
                                                               NEED_GZ_OUT=True, NEED_DW=True, NEED_PW=True)),
                    ("bwd_input", BWD_INPUT_CONFIGS[:2], dict(KH=3, KW=3, HAS_INDEX=False))):
                for cfg in configs:
                    case = dict(kernel=name, constexprs=dict(consts, **cfg.kwargs), dtype=dtype, arch=arch,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages, ones=CL_UNIT,
                                pointer_dtypes={"idx_ptr": "i64", "order_ptr": "i64", "start_ptr": "i64",
                                                    "count_ptr": "i64", "gdw_ptr": "fp32", "gpw_ptr": "fp32"})
                    out.append((case, dict(kernel=name, arch=arch, dtype=dtype, layout="any", k=3,
                                           config=dict(cfg.kwargs, num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages))))
    return out


def _run(case: dict) -> dict:
    t0 = time.perf_counter()
    try:
        info = compile_case(case)
        info["error"] = None
    except Exception as e:  # noqa: BLE001 - a compile failure is a result here
        info = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def finish(case: dict, row: dict, info: dict) -> dict:
    """Merge the compiler's numbers into a row with the fields the tests and docs read."""
    loop = info.get("loop") or {}
    row.update(fits=bool(info.get("fits")), smem_bytes=info.get("shared_bytes"), mma=info.get("mma"),
               registers=info.get("registers"), spill_bytes=info.get("spill_bytes"),
               global_loads_vector=loop.get("loads_vector"), global_loads_scalar=loop.get("loads_scalar"),
               cp_async=loop.get("cp_async"), loop_ffma=loop.get("ffma"),
               dw_fma_ratio=(dw_fma_ratio(case, info) if case["kernel"] in ("fused", "kernel_variants:_halo_gather_kernel")
                             and not info.get("error") else None),
               error=info.get("error"), seconds=info.get("seconds"))
    row.setdefault("smem_estimate", None)
    return row


def markdown(rows: List[dict]) -> str:
    """One line per (kernel, arch, dtype, layout, k, rank): ranges over the configs compiled."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        key = (r["kernel"], r["arch"], r["dtype"], r["layout"], r["k"], r.get("rank", "-"),
               "ragged" if r.get("ragged") else "")
        groups.setdefault(key, []).append(r)
    out = ["| kernel | arch | dtype | layout | k | rank | configs compiled / fit / kept | shared KB (compiled) | "
           "estimate >= compiled | registers | spills | main-loop loads vector / scalar (max) | cp.async | "
           "dw_fma_ratio (max) | dot |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def rng(vals, fmt="{:.0f}"):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        lo, hi = min(vals), max(vals)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    for key, rs in groups.items():
        comp = [r for r in rs if r.get("smem_bytes") is not None]
        est = [r for r in comp if r.get("smem_estimate") is not None]
        est_ok = f"{sum(r['smem_estimate'] >= r['smem_bytes'] for r in est)}/{len(est)}" if est else "-"
        ratio = [r["dw_fma_ratio"] for r in comp if r.get("dw_fma_ratio") is not None]
        kept = sum(bool(r.get("kept")) for r in rs) if rs[0]["kernel"] == "fused" else "-"
        out.append(f"| {key[0]} | sm_{key[1]} | {key[2]} | {key[3]}{' ' + key[6] if key[6] else ''} | {key[4]} | "
                   f"{key[5]} | {len(comp)} / {sum(r['fits'] for r in comp)} / {kept} | "
                   f"{rng([r['smem_bytes'] / 1024 for r in comp])} | {est_ok} | {rng([r.get('registers') for r in comp])} | "
                   f"{rng([r.get('spill_bytes') for r in comp])} | {rng([r.get('global_loads_vector') for r in comp])} / "
                   f"{rng([r.get('global_loads_scalar') for r in comp])} | {rng([r.get('cp_async') for r in comp])} | "
                   f"{max(ratio) if ratio else '-'} | {rng([r.get('mma') for r in comp], '{}')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(ITEMSIZE))
    ap.add_argument("--layout", nargs="+", default=["channels_last", "nchw"], choices=["channels_last", "nchw", "nchw_direct"])
    ap.add_argument("--k", type=int, nargs="+", default=[3, 7], help="depthwise kernel sizes (default 3 7)")
    ap.add_argument("--block-m", type=int, nargs="+", default=[128, 256], help="fused BLOCK_M values (default 128 256)")
    ap.add_argument("--max-ratio", type=float, default=1.0,
                    help="do not compile fused configs whose estimate exceeds this multiple of the limit (default 1)")
    ap.add_argument("--no-extra", action="store_true", help="only the fused sweep (no rank-2, ragged, split, backward rows)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel (default: all cores)")
    ap.add_argument("--json", "--out", dest="json", help="write the rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown summary at the end")
    a = ap.parse_args(argv)
    pairs = fused_rows(a.arch, a.dtype, a.layout, a.k, a.block_m, a.max_ratio)
    if not a.no_extra:
        pairs += other_rows(a.arch)
    todo = [(i, case) for i, (case, _) in enumerate(pairs) if case is not None]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        infos = dict(zip([i for i, _ in todo], pool.map(_run, [c for _, c in todo])))
    rows = []
    for i, (case, row) in enumerate(pairs):
        rows.append(finish(case, row, infos[i]) if case is not None else
                    {**row, "mma": None, "registers": None, "spill_bytes": None, "global_loads_vector": None,
                     "global_loads_scalar": None, "cp_async": None, "loop_ffma": None, "dw_fma_ratio": None,
                     "seconds": 0.0})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python benchmarks/kernels_aot.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)
    if a.markdown:
        print(markdown(rows))
    compiled = [r for r in rows if r.get("smem_bytes") is not None]
    errors = [r for r in rows if r.get("error") and not r["error"].startswith("not compiled")]
    under = [r for r in compiled if r.get("smem_estimate") is not None and r["smem_estimate"] < r["smem_bytes"]]
    wrong = [r for r in rows if r.get("kept") and not r["fits"]]
    print(f"{len(rows)} rows, {len(compiled)} compiled in {time.perf_counter() - t0:.0f} s, {len(errors)} errors; "
          f"estimate below the compiler's number: {len(under)}; kept by the pruner but not fitting: {len(wrong)}",
          file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
