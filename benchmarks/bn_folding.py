"""What BatchNorm folding does to the CPU time of the separable pairs (issue 14, item 3).

A rewritten conv keeps the BatchNorm after it, so in PyTorch eager a pair is three ops (depthwise, pointwise,
BN). Folding the BN into the conv first (``torch.fx.experimental.optimization.fuse``, eval mode) and rewriting
the folded model gives pairs whose pointwise conv carries the BN (two ops). Timed side by side, interleaved
(``dsrewrite.timing.measure.compare``), in eager NCHW and channels_last, Inductor and onnxruntime: the original, the
folded original, the rewrite of the original and the rewrite of the folded model, all at the same uniform
rank, as ratios to the (unfolded) original in that runtime.

    python benchmarks/bn_folding.py --json benchmarks/bn_folding.json
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--runtimes", nargs="+", default=["eager", "inductor", "onnxruntime"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import torch
    import torchvision
    from torch.fx.experimental.optimization import fuse

    import dsrewrite
    from dsrewrite.timing.layers import to_format
    from dsrewrite.timing.measure import compare
    from dsrewrite.timing.runtimes import get_runtime

    torch.manual_seed(0)
    rows: List[Dict] = []
    for name in a.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(a.batch, 3, a.size, a.size)
        folded = fuse(model)
        res = dsrewrite.rewrite(model, x, rank=a.rank, measure_time=False)
        res_f = dsrewrite.rewrite(folded, x, rank=a.rank, measure_time=False)
        n = len([L for L in res.report.layers if L.rewritten])
        with torch.no_grad():
            ref = model(x)
            err = float((res_f.model(x) - res.model(x)).norm() / ref.norm())
        variants = {"original": model, "original, BN folded": folded, "rewritten": res.model,
                    "rewritten, BN folded first": res_f.model}
        for rt_name in a.runtimes:
            fmts = ["contiguous", "channels_last"] if rt_name != "onnxruntime" else ["contiguous"]
            for fmt in fmts:
                rt = get_runtime(rt_name, ort_threads=torch.get_num_threads())
                m0, args = to_format(model, (x,), fmt)
                with torch.no_grad():
                    f0 = rt.prepare(m0, args)
                    for label, m in variants.items():
                        if label == "original":
                            continue
                        mm, _ = to_format(m, (x,), fmt)
                        c = compare(f0, rt.prepare(mm, args), args)
                        rows.append(dict(model=name, runtime=rt_name, format=fmt, variant=label, ratio=c.ratio,
                                         noise=c.noise, original_ms=c.before_ms, ms=c.after_ms))
                        print(json.dumps(rows[-1]), flush=True)
        rows.append(dict(model=name, note=f"rank {a.rank} on {n} convs of each model, FLOPs kept "
                         f"{res.report.flops_ratio:.3f}; relative output difference between the two rewrites "
                         f"{err:.3g} (random-weight BatchNorms are the identity, so both compute the same function; "
                         f"times do not depend on the values)"))
    out = ["| model | runtime | format | variant | time ratio to the original (noise) |", "|---|---|---|---|---|"]
    for r in rows:
        if "variant" in r:
            out.append(f"| {r['model']} | {r['runtime']} | {'NCHW' if r['format'] == 'contiguous' else r['format']} | "
                       f"{r['variant']} | {r['ratio']:.3f} (+-{r['noise']:.3f}) |")
    table = "\n".join(out)
    print(table)
    if a.json:
        from _meta import write_json  # benchmarks/ is the script's folder

        write_json(a.json, "bn_folding.py", argv, rows=rows, table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
