"""Core benchmark (issue 2): rewrite time, and CPU latency of original vs rewritten models.

Measures, side by side in one run:
  * how long ``dsrewrite.rewrite`` takes on ResNet-50 and VGG-16 vs a forward pass at batch 8;
  * CPU latency of the original and the rewritten model at several ranks, NCHW and channels_last
    (torch ops backend: there is no Triton on the CPU), with the FLOP ratio next to the time ratio.
Timings are medians of interleaved runs (original, rewritten, original, ...), so drift hits both alike.

    python benchmarks/core.py --out benchmarks/core.json      # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

import dsrewrite


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rewrite_time(name: str, reps: int) -> dict:
    model = torchvision.models.get_model(name, weights=None).eval()
    x8 = torch.randn(8, 3, 224, 224)
    x1 = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x8)
        fwd = _median_time(lambda: model(x8), reps)
    rw = _median_time(lambda: dsrewrite.rewrite(model, x1, rank=4, measure_time=False), reps)
    return {"model": name, "rewrite_s": rw, "forward_b8_s": fwd, "rewrite_over_3_forwards": rw / (3 * fwd)}


def latency(name: str, ranks, batch: int, size: int, reps: int) -> list:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    rows = []
    for rank in ranks:
        res = dsrewrite.rewrite(model, x, rank=rank, backend="torch", measure_time=False)
        for fmt in ("nchw", "channels_last"):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            a = model.to(memory_format=mf)
            b = res.model.to(memory_format=mf)
            xi = x.contiguous(memory_format=mf)
            with torch.no_grad():
                a(xi), b(xi)  # warm-up
                ta, tb = [], []
                for _ in range(reps):
                    t0 = time.perf_counter(); a(xi); ta.append(time.perf_counter() - t0)
                    t0 = time.perf_counter(); b(xi); tb.append(time.perf_counter() - t0)
            rows.append({
                "model": name, "rank": rank, "format": fmt, "batch": batch, "size": size,
                "flops_ratio": res.report.flops_ratio, "params_ratio": res.report.params_ratio,
                "orig_ms": 1e3 * statistics.median(ta), "rewritten_ms": 1e3 * statistics.median(tb),
            })
            rows[-1]["time_ratio"] = rows[-1]["rewritten_ms"] / rows[-1]["orig_ms"]
            print(f"{name:10s} rank={rank!s:5s} {fmt:13s} FLOPs x{rows[-1]['flops_ratio']:.2f}  "
                  f"time {rows[-1]['orig_ms']:.1f} -> {rows[-1]['rewritten_ms']:.1f} ms "
                  f"(x{rows[-1]['time_ratio']:.2f})", flush=True)
        model = model.to(memory_format=torch.contiguous_format)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    p.add_argument("--ranks", nargs="+", default=["1", "2", "4", "auto"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="write all numbers as JSON here")
    a = p.parse_args()
    ranks = [int(r) if r.isdigit() else r for r in a.ranks]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "rewrite": [], "latency": []}
    for name in a.models:
        out["rewrite"].append(rewrite_time(name, 3))
        r = out["rewrite"][-1]
        print(f"{name}: rewrite {r['rewrite_s']:.2f} s, forward at batch 8 {r['forward_b8_s']:.2f} s "
              f"(rewrite = {r['rewrite_over_3_forwards']:.2f} x three forwards)", flush=True)
    for name in a.models:
        out["latency"] += latency(name, ranks, a.batch, a.size, a.reps)
    print("\n| model | rank | format | FLOPs kept | params kept | original ms | rewritten ms | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["latency"]:
        print(f"| {r['model']} | {r['rank']} | {r['format']} | {r['flops_ratio']:.2f} | {r['params_ratio']:.2f} | "
              f"{r['orig_ms']:.1f} | {r['rewritten_ms']:.1f} | {r['time_ratio']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
