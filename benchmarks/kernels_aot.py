"""Compile every autotune config of every kernel for NVIDIA targets, without a GPU.

For each (kernel, config, dtype, arch) it runs Triton's real compiler down to a cubin and records the
shared memory the config needs, whether it fits the architecture's per-block limit, and which instructions
``tl.dot`` became (wgmma / mma.sync tensor cores, or plain FMA). A config that does not fit would fail to
launch on that GPU; one that compiles to FMA where tensor cores were meant is a performance bug.

    python benchmarks/kernels_aot.py --out benchmarks/kernels_aot.json --markdown
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List

from dsrewrite.kernels._aot import SHARED_LIMIT, compile_for
from dsrewrite.kernels.depthwise import DEPTHWISE_CONFIGS, _depthwise_conv2d_kernel
from dsrewrite.kernels.pointwise import POINTWISE_CONFIGS, _pointwise_conv2d_kernel
from dsrewrite.kernels.separable_conv2d import (FUSED_CONFIGS, FUSED_FALLBACK_CONFIGS, _separable_conv2d_kernel,
                                                fused_configs_for, fused_shared_bytes)

# (dtype of the tensors, tl.dot precision for fp32)
VARIANTS = [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32")]
UNIT = ["stride_h", "stride_w", "dil_h", "dil_w", "pad_h", "pad_w"]  # 3x3/1/1 convs: the JIT specialises 1s
KERNELS = {
    "fused": (_separable_conv2d_kernel, FUSED_CONFIGS + FUSED_FALLBACK_CONFIGS,
              lambda prec, k: dict(KH=k, KW=k, HAS_BIAS=True, ACT=1, PRECISION=prec, HAS_INDEX=False),
              ["sxw", "syw"] + UNIT),
    "depthwise": (_depthwise_conv2d_kernel, DEPTHWISE_CONFIGS, lambda prec, k: dict(KH=k, KW=k, HAS_INDEX=False),
                  ["sxw", "szw"] + UNIT),
    "pointwise": (_pointwise_conv2d_kernel, POINTWISE_CONFIGS,
                  lambda prec, k: dict(HAS_BIAS=True, ACT=1, PRECISION=prec), ["szw", "syw"]),
}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def sweep(archs: List[int], kernels: List[str], ksizes: List[int], max_ratio: float = 1.5) -> List[Dict]:
    rows = []
    for name in kernels:
        kernel, configs, consts, ones = KERNELS[name]
        for k in (ksizes if name != "pointwise" else [1]):
            for cfg in configs:
                for dtype, prec in VARIANTS:
                    if name == "depthwise" and prec == "tf32" and dtype == "fp32":
                        continue  # no tl.dot in the depthwise kernel: precision does not apply
                    for arch in archs:
                        rows.append(_one(name, kernel, cfg, consts(prec, k), ones, dtype, prec, arch, k, max_ratio))
    return rows


def _one(name, kernel, cfg, consts, ones, dtype, prec, arch, k, max_ratio) -> Dict:
    t0 = time.perf_counter()
    row = dict(kernel=name, k=k, config=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
               dtype=dtype, precision=prec if dtype == "fp32" and name != "depthwise" else None, arch=arch)
    if name == "fused":
        row["estimate"] = fused_shared_bytes(cfg, ITEMSIZE[dtype], k, k)
        row["kept"] = cfg in fused_configs_for(ITEMSIZE[dtype], SHARED_LIMIT[arch], k, k)
        if row["estimate"] > max_ratio * SHARED_LIMIT[arch]:  # far over: compiling it takes minutes, says nothing new
            row.update(shared_bytes=None, fits=False, mma=None, error="not compiled: estimate over "
                       f"{max_ratio:g}x the limit", seconds=0.0)
            print(json.dumps(row), flush=True)
            return row
    try:
        info = compile_for(kernel, {**consts, **cfg.kwargs}, dtype=dtype, arch=arch, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages, ones=ones)
        row.update(shared_bytes=info.shared_bytes, fits=info.fits, mma=info.mma, error=None)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result here
        row.update(shared_bytes=None, fits=False, mma=None,
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: List[Dict]) -> str:
    out = ["| kernel | k | BLOCKs | warps/stages | dtype (precision) | arch | shared KB (limit) | estimate KB | "
           "dot becomes | fits | kept by the pruner |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blocks = "x".join(str(v) for v in r["config"].values())
        dt = r["dtype"] + (f" ({r['precision']})" if r["precision"] else "")
        shared = "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.0f} ({SHARED_LIMIT[r['arch']] / 1024:.0f})"
        est = f"{r['estimate'] / 1024:.0f}" if "estimate" in r else "-"
        kept = {True: "yes", False: "no"}.get(r.get("kept"), "-")
        out.append(f"| {r['kernel']} | {r['k']} | {blocks} | {r['num_warps']}/{r['num_stages']} | {dt} | sm_{r['arch']} | "
                   f"{shared} | {est} | {r['mma'] or r['error']} | {'yes' if r['fits'] else '**no**'} | {kept} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--k", type=int, nargs="+", default=[3, 7], help="depthwise kernel sizes (default 3 7)")
    ap.add_argument("--max-ratio", type=float, default=1.5,
                    help="do not compile fused configs whose estimate exceeds this multiple of the limit (default 1.5)")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
    a = ap.parse_args(argv)
    rows = sweep(a.arch, a.kernels, a.k, a.max_ratio)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    if a.markdown:
        print(markdown(rows))
    bad = [r for r in rows if not r["fits"]]
    wrong = [r for r in rows if r.get("kept") and not r["fits"]]  # the pruner kept a config that cannot launch
    under = [r for r in rows if r.get("shared_bytes") is not None and r.get("estimate", 1 << 40) < r["shared_bytes"]]
    print(f"{len(rows)} compiled, {len(bad)} do not fit or fail; kept but not fitting: {len(wrong)}; "
          f"estimate below the compiler's number: {len(under)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
