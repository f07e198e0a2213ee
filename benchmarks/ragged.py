"""CPU latency of ragged vs uniform ranks (torch ops backend), side by side with the original in one run.

A ragged pair gathers its input channels and runs a depthwise conv with one filter per channel
(``groups == channels``); a uniform pair at rank r > 1 runs a depthwise conv with r filters per channel.
Both have the same FLOPs. A third uniform model runs each pair in the depthwise form the latency planner
picks for it (``LayerTimer.gathered``: grouped, or gathered like a ragged pair; same weights, same FLOPs).
Times are the fastest of ``--reps`` rounds; each round runs the four models in turn, so drift on a shared
machine hits all of them alike.

Also the depthwise conv alone (batch 4, 3x3), r filters per channel vs the gathered one-filter-per-channel form.

Usage: python benchmarks/ragged.py [--quick] [--out ragged.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dsrewrite  # noqa: E402
from dsrewrite.timing.layers import LayerTimer, to_format  # noqa: E402
from dsrewrite.timing.measure import time_side_by_side  # noqa: E402

CASES = [("resnet18", (4, 3, 112, 112)), ("vgg16", (1, 3, 224, 224))]


def planned_forms(result, memory_format: str):
    """A copy of a uniform rewrite with each pair in the form LayerTimer measured faster at its shape."""
    timer = LayerTimer("cpu", backend="torch", memory_format=memory_format)
    model = copy.deepcopy(result.model)
    for d in result.decisions:
        if d.rewritten:
            model.get_submodule(d.site.spec.name).gather_input = timer.gathered(d.site.spec, d.factors.rank)
    return model, sum(m.gather_input for m in model.modules() if isinstance(m, dsrewrite.SeparableConv2d))


def run(quick: bool, reps: int):
    cpu = torch.device("cpu")
    rows = []
    for name, shape in CASES[:1] if quick else CASES:
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(*shape)
        for rank in (2,) if quick else (2, 4):
            uni = dsrewrite.rewrite(model, x, rank=rank, backend="torch", measure_time=False)
            rag = dsrewrite.rewrite(model, x, rank=rank, backend="torch", measure_time=False, ragged=True)
            for fmt in ("contiguous", "channels_last"):
                planned, n_gathered = planned_forms(uni, fmt)
                models = {k: to_format(m, (x,), fmt) for k, m in
                          (("original", model), ("uniform", uni.model), ("planned", planned), ("ragged", rag.model))}
                args = models["original"][1]
                best = dict(zip(models, time_side_by_side([m for m, _ in models.values()], args, device=cpu,
                                                          reps=reps, max_seconds=float("inf"))))
                rows.append(dict(model=name, input=list(shape), rank=rank, memory_format=fmt,
                                 flops_ratio=uni.report.flops_ratio, original_ms=best["original"],
                                 uniform_ms=best["uniform"], planned_ms=best["planned"], ragged_ms=best["ragged"],
                                 gathered_layers=n_gathered, layers=len(uni.report.rewritten)))
                print(rows[-1], flush=True)
    return rows


def depthwise_only(reps: int):
    """The depthwise conv alone: r filters per channel (uniform) vs one filter per channel on the input
    gathered to C*r channels (what a ragged pair runs), the gather included."""
    cpu = torch.device("cpu")
    rows = []
    for c, hw in ((64, 28), (128, 14), (256, 7)):
        for r in (2, 4):
            x = torch.randn(4, c, hw, hw)
            w = torch.randn(c * r, 1, 3, 3)
            index = torch.arange(c).repeat_interleave(r)
            uniform = lambda x: F.conv2d(x, w, padding=1, groups=c)  # noqa: E731
            gathered = lambda x: F.conv2d(x.index_select(1, index), w, padding=1, groups=c * r)  # noqa: E731
            best = dict(zip(("uniform", "gathered"), time_side_by_side([uniform, gathered], (x,), device=cpu,
                                                                       reps=reps, max_seconds=float("inf"))))
            rows.append(dict(channels=c, hw=hw, rank=r, uniform_ms=best["uniform"], gathered_ms=best["gathered"]))
            print(rows[-1], flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| model | input | rank | FLOPs kept | format | original ms | uniform ms (x orig) | "
             "uniform, planned forms ms (x orig) | layers gathered | ragged ms (x orig) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["original_ms"]
        x = lambda k: f"{r[k]:.1f} ({r[k] / o:.2f}x)"  # noqa: E731
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['rank']} | {r['flops_ratio']:.3f} | "
                     f"{r['memory_format']} | {o:.1f} | {x('uniform_ms')} | {x('planned_ms')} | "
                     f"{r['gathered_layers']}/{r['layers']} | {x('ragged_ms')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resnet18 at rank 2 only, few rounds")
    ap.add_argument("--reps", type=int, default=None, help="rounds (default 15, 2 with --quick)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    t0 = time.perf_counter()
    reps = a.reps or (2 if a.quick else 15)
    rows = run(a.quick, reps)
    dw = depthwise_only(reps)
    res = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads(),
               seconds=time.perf_counter() - t0, rows=rows, depthwise_only=dw)
    print(markdown(rows))
    print("| channels | HxW | rank | depthwise, r filters per channel ms | gathered, 1 filter per channel ms |")
    print("|---|---|---|---|---|")
    for r in dw:
        print(f"| {r['channels']} | {r['hw']}x{r['hw']} | {r['rank']} | {r['uniform_ms']:.3f} | {r['gathered_ms']:.3f} |")
    print(f"total {res['seconds']:.0f} s, {res['threads']} threads")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
