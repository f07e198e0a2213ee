"""Does a `target_latency` plan hold when timed independently? (issue 23, item 5)

The same call, repeated: torchvision's resnet18 (random weights) exported to ONNX at batch 1, then
``dsrewrite.onnx.rewrite(src, dst, target_latency=T)`` N times in a row. After each, the two files are timed
independently of dsrewrite's own loop: fresh onnxruntime sessions (2 intra-op threads, default graph
optimisations), 31 interleaved rounds, the median of the per-round time ratios (and its quartiles). A plan
"holds" when that median meets the target.

    python benchmarks/latency_repeat.py --repeats 5 --target 0.6 --json benchmarks/latency_repeat.json \\
        --markdown benchmarks/latency_repeat.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _meta import write_json  # noqa: E402


def independent_ratio(src: str, dst: str, rounds: int = 31, threads: int = 2) -> dict:
    """Median (and quartiles) of per-round time ratios dst/src in fresh onnxruntime sessions, interleaved."""
    import onnxruntime as ort

    def session(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    a, b = session(src), session(dst)
    name = a.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    for s in (a, b, a, b):
        s.run(None, feed)
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.run(None, feed)
        t1 = time.perf_counter()
        b.run(None, feed)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    q = statistics.quantiles(ratios, n=4)
    return dict(median=statistics.median(ratios), q1=q[0], q3=q[2], rounds=rounds)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    import torch
    import torchvision

    import dsrewrite.onnx as ds_onnx

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "resnet18.onnx")
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), src, input_names=["x"], dynamo=False)
        for i in range(a.repeats):
            dst = os.path.join(d, f"out{i}.onnx")
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            try:
                _, rep = ds_onnx.rewrite(src, dst, target_latency=a.target)
            except Exception as e:  # noqa: BLE001 - a refusal is a row too
                rows.append(dict(run=i + 1, refused=str(e).splitlines()[0], load=load))
                print(rows[-1])
                continue
            ind = independent_ratio(src, dst)
            rows.append(dict(run=i + 1, rewritten=len(rep.rewritten), flops_ratio=rep.flops_ratio,
                             reported=rep.time_ratio, reported_median=rep.time_median_ratio,
                             reported_noise=rep.time_noise, met_note=not (rep.notes and "NOT MET" in rep.notes[0]),
                             independent=ind, holds=ind["median"] <= a.target, seconds=time.perf_counter() - t0,
                             load=load))
            print({k: v for k, v in rows[-1].items()})
    held = sum(1 for r in rows if r.get("holds"))
    if a.json:
        write_json(a.json, "latency_repeat.py", argv if argv is not None else sys.argv[1:], target=a.target,
                   rows=rows, held=held, loadavg_end=os.getloadavg())
    if a.markdown:
        out = ["# target_latency plans timed independently (issue 23, item 5)", "",
               f"- Date: {time.strftime('%Y-%m-%d')}; 2-core CPU, onnxruntime, 2 intra-op threads; torchvision resnet18 "
               f"(random weights) at batch 1; target_latency={a.target:g}.",
               "- Command: `python benchmarks/latency_repeat.py " + " ".join(argv if argv is not None else sys.argv[1:])
               + "`", f"- Plans whose independent median meets the target: **{held} of {len(rows)}**.", "",
               "| run | layers rewritten | FLOPs kept | reported (median, noise) | independent median (quartiles) | "
               "holds | load |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "refused" in r:
                out.append(f"| {r['run']} | refused: {r['refused'][:120]} | | | | | {r['load']:.1f} |")
                continue
            i = r["independent"]
            med = "-" if r["reported_median"] is None else f"{r['reported_median']:.2f}"
            out.append(f"| {r['run']} | {r['rewritten']} | {r['flops_ratio']:.2f} | {med} (+-{r['reported_noise']:.2f})"
                       f"{'' if r['met_note'] else ', target NOT MET note'} | {i['median']:.2f} ({i['q1']:.2f}-"
                       f"{i['q3']:.2f}) | {'yes' if r['holds'] else 'no'} | {r['load']:.1f} |")
        with open(a.markdown, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
