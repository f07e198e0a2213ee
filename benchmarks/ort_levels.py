"""What onnxruntime's graph optimisation level does to the separable pairs' CPU time (issue 14, item 3).

Exports torchvision models (random weights, eval mode: BatchNorm folded into the convs by the exporter) to
ONNX, rewrites each at half its FLOPs (``dsrewrite.onnx.rewrite(..., target_flops=0.5)``, one fixed plan), and
times original and rewritten side by side (interleaved rounds, fastest of each) in sessions at every graph
optimisation level, with the default thread count.

    python benchmarks/ort_levels.py --json benchmarks/ort_levels.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet34"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import numpy as np
    import onnxruntime as ort
    import torch
    import torchvision

    import dsrewrite.onnx as ds_onnx
    from dsrewrite.timing.measure import compare
    from dsrewrite.onnx.measure import session

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.models:
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            src, dst = os.path.join(d, f"{name}.onnx"), os.path.join(d, f"{name}_ds.onnx")
            torch.onnx.export(model, (torch.randn(a.batch, 3, a.size, a.size),), src, dynamo=False)
            rep = ds_onnx.rewrite(src, dst, target_flops=0.5).report
            feeds = None
            for level in ("disable", "basic", "extended", "all"):
                before, after = session(src, optimization=level), session(dst, optimization=level)
                if feeds is None:
                    shape = (a.batch, 3, a.size, a.size)
                    feeds = {before.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
                c = compare(before.run, after.run, (None, feeds))
                rows.append(dict(model=name, level=level, original_ms=c.before_ms, rewritten_ms=c.after_ms,
                                 ratio=c.ratio, noise=c.noise, flops_ratio=rep.flops_ratio,
                                 rewritten_convs=len(rep.rewritten)))
                print(json.dumps(rows[-1]), flush=True)
    table = ["| model | graph optimisation | original ms | rewritten ms | ratio (noise) | FLOPs kept |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['level']} | {r['original_ms']:.2f} | {r['rewritten_ms']:.2f} | "
                     f"{r['ratio']:.2f} (+-{r['noise']:.2f}) | {r['flops_ratio']:.3f} |")
    print("\n".join(table))
    if a.json:
        meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                    onnxruntime=ort.__version__, torch=torch.__version__,
                    command="python benchmarks/ort_levels.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, table="\n".join(table)), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
