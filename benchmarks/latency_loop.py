"""target_latency, checked on the whole model (issue 14): the same call, planned from scratch, several times.

For each model (torchvision, random weights), route (PyTorch eager in the memory format the planner picks;
``inductor``: the PyTorch route with ``runtime="inductor"``, every model compiled; ONNX in onnxruntime) and run, it clears every layer-timing cache, calls the rewrite with ``target_latency``, and
records the plans the closed loop made (planned vs measured whole-model ratio), the kept ratio and its noise,
or the refusal. After each run the kept model is timed again against the original, side by side in a fresh
measurement (the "re-check" column), in the runtime and format it was planned for (freshly compiled for
``inductor``).

    python benchmarks/latency_loop.py --models resnet18 --runs 5 --json benchmarks/latency_loop.json
    python benchmarks/latency_loop.py --models resnet18 --routes inductor --runs 5 --json benchmarks/latency_loop_inductor.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List


def _clear_caches() -> None:
    from dsrewrite.timing import layers as latency
    from dsrewrite.onnx import latency as olat

    latency._CACHE.clear()
    olat._CACHE.clear()


def run_torch(model_name: str, batch: int, size: int, target: float, runtime: str = "eager") -> Dict:
    import torch
    import torchvision

    import dsrewrite
    from dsrewrite.timing.layers import to_format
    from dsrewrite.timing.measure import compare
    from dsrewrite.timing.runtimes import get_runtime

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    t0 = time.perf_counter()
    try:
        res = dsrewrite.rewrite(model, x, target_latency=target, memory_format="auto", runtime=runtime)
    except dsrewrite.DsrewriteError as e:
        return dict(refused=str(e), seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    rep = res.report
    fmt = "channels_last" if rep.time_runtime and "channels_last" in rep.time_runtime else "contiguous"
    m0, args = to_format(model, (x,), fmt)
    m1, _ = to_format(res.model, (x,), fmt)
    rt = get_runtime(runtime)
    with torch.no_grad():
        f0, f1 = rt.prepare(m0, args), rt.prepare(m1, args)
        c = compare(f0, f1, args)
        extra = {}
        if runtime == "inductor":  # how the compiled original compares with the eager one
            e = compare(m0, f0, args)
            extra = dict(compiled_over_eager=e.ratio, compiled_over_eager_noise=e.noise)
    return dict(extra,rounds=rep.latency_rounds, ratio=rep.time_ratio, noise=rep.time_noise, runtime=rep.time_runtime,
                flops_ratio=rep.flops_ratio, recheck=c.ratio, recheck_noise=c.noise, seconds=seconds)


def run_onnx(model_name: str, batch: int, size: int, target: float, folder: str) -> Dict:
    import numpy as np
    import torch
    import torchvision

    import dsrewrite
    import dsrewrite.onnx as ds_onnx
    from dsrewrite.timing.measure import compare
    from dsrewrite.onnx.measure import session

    src = os.path.join(folder, f"{model_name}_{batch}_{size}.onnx")
    if not os.path.exists(src):
        torch.manual_seed(0)
        model = torchvision.models.get_model(model_name, weights=None).eval()
        torch.onnx.export(model, (torch.randn(batch, 3, size, size),), src, dynamo=False)
    dst = os.path.join(folder, "out.onnx")
    t0 = time.perf_counter()
    try:
        res = ds_onnx.rewrite(src, dst, target_latency=target)
    except dsrewrite.DsrewriteError as e:
        return dict(refused=str(e), seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    rep = res.report
    a, b = session(src), session(dst)
    feeds = {a.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    c = compare(a.run, b.run, (None, feeds))
    return dict(rounds=rep.latency_rounds, ratio=rep.time_ratio, noise=rep.time_noise, runtime=rep.time_runtime,
                flops_ratio=rep.flops_ratio, recheck=c.ratio, recheck_noise=c.noise, seconds=seconds)


def markdown(rows: List[Dict]) -> str:
    out = ["| model | route | run | plans (planned -> measured) | kept ratio (noise) | re-check (noise) | FLOPs kept | "
           "seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("refused"):
            out.append(f"| {r['model']} | {r['route']} | {r['run']} | refused: {r['refused'][:160]} | - | - | - | "
                       f"{r['seconds']:.0f} |")
            continue
        plans = "; ".join(f"{p['planned']:.2f} -> {p['measured']:.2f}" + (" (kept)" if p.get("kept") else "")
                          for p in r["rounds"] if p.get("measured") is not None)
        out.append(f"| {r['model']} | {r['route']} | {r['run']} | {plans} | {r['ratio']:.3f} (+-{r['noise']:.3f}) | "
                   f"{r['recheck']:.3f} (+-{r['recheck_noise']:.3f}) | {r['flops_ratio']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--routes", nargs="+", default=["torch", "onnx"], choices=["torch", "inductor", "onnx"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="write the rows and the machine here")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in a.models:
            for route in a.routes:
                for run in range(1, a.runs + 1):
                    _clear_caches()
                    r = (run_onnx(model, a.batch, a.size, a.target, folder) if route == "onnx"
                         else run_torch(model, a.batch, a.size, a.target, "eager" if route == "torch" else route))
                    rows.append(dict(r, model=model, route=route, run=run))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
    table = markdown(rows)
    print(table)
    if a.json:
        from _meta import write_json  # benchmarks/ is the script's folder

        write_json(a.json, "latency_loop.py", argv, rows=rows, table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
