"""onnxruntime CPU latency of torchvision models exported to ONNX, original vs rewritten at several ranks.

Every variant of a model is loaded into its own onnxruntime session and timed in interleaved rounds (one run
of each variant per round), so drift on a shared machine hits all of them alike; the median per variant is
reported next to the FLOPs ratio (whole graph, 2 x MACs, from the dsrewrite.onnx report). Random weights
(weights=None) with randomised BatchNorm statistics; the exporter folds BN into the convs.

    python benchmarks/onnx_latency.py --models resnet18 resnet50 vgg16 --ranks 1 2 4 auto \
        --batch 4 --threads 2 --runs 7 --out benchmarks/onnx_latency.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from dsrewrite.onnx import rewrite


def export(name: str, batch: int, size: int, folder: str) -> str:
    model = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # trained-like statistics (not the init's 1/0)
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.num_features, generator=g))
    path = os.path.join(folder, f"{name}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(batch, 3, size, size),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return path


def session(model, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def bench_model(name: str, ranks, args, folder: str) -> list:
    t0 = time.perf_counter()
    path = export(name, args.batch, args.size, folder)
    variants = [("original", session(path, args.threads), None)]
    for r in ranks:
        t = time.perf_counter()
        model, report = rewrite(path, rank=int(r) if r.isdigit() else r)
        print(f"  {name} rank {r}: rewritten in {time.perf_counter() - t:.1f} s, "
              f"{len(report.rewritten)} convs, FLOPs kept {report.flops_ratio:.2f}", file=sys.stderr)
        variants.append((r, session(model, args.threads), report))
        del model
    x = {"x": np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)}
    for _, sess, _ in variants:  # warm-up
        for _ in range(2):
            sess.run(None, x)
    times = {label: [] for label, _, _ in variants}
    for _ in range(args.runs):
        for label, sess, _ in variants:
            t = time.perf_counter()
            sess.run(None, x)
            times[label].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times["original"])
    rows = []
    for label, _, report in variants[1:]:
        ms = statistics.median(times[label])
        rows.append(dict(model=name, rank=label, flops_before=report.flops_before, flops_after=report.flops_after,
                         flops_kept=report.flops_ratio, params_kept=report.params_ratio, convs_rewritten=len(report.rewritten),
                         original_ms=base, rewritten_ms=ms, time_ratio=ms / base,
                         original_runs_ms=times["original"], rewritten_runs_ms=times[label]))
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def markdown(rows) -> str:
    lines = ["| model | rank | convs rewritten | FLOPs kept | params kept | original (ms) | rewritten (ms) | time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['rank']} | {r['convs_rewritten']} | {r['flops_kept']:.2f} | "
                     f"{r['params_kept']:.2f} | {r['original_ms']:.1f} | {r['rewritten_ms']:.1f} | {r['time_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16"])
    p.add_argument("--ranks", nargs="+", default=["1", "2", "4", "auto"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--runs", type=int, default=7, help="interleaved timed rounds (median reported)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += bench_model(name, args.ranks, args, folder)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), onnxruntime=ort.__version__, torch=torch.__version__,
                command="python " + " ".join(sys.argv), batch=args.batch, size=args.size, threads=args.threads,
                runs=args.runs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
