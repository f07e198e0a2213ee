"""Is a "not exact" row of ``real_models_libs.py`` float32 rounding or a wrong rewrite? The same model, built and
perturbed as that script does, rewritten at rank="full" in float32 and in float64: a real misreading of a layer
stays wrong in float64, rounding does not.

Usage: python benchmarks/float64_check.py [--models smp_fpn_timm_effb0,...]
Writes benchmarks/float64_check.json (and prints one line per model and dtype).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == HERE:  # no module of this folder may shadow a distribution
    sys.path.pop(0)
sys.path.append(HERE)


def main() -> None:
    import torch

    import dsrewrite
    import real_models_libs as R
    from _meta import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smp_fpn_timm_effb0")
    ap.add_argument("--out", default=os.path.join(HERE, "float64_check.json"))
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            m, args = R.MODELS[name][1]()
            m = m.eval()
            R.perturb(m)
            R.calibrate_bn(m, args)
            m = m.to(dtype)
            args = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
            res = dsrewrite.rewrite(m, args, rank="full", measure_time=False)
            x = tuple(torch.randn(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                      else t for t in args)
            with torch.no_grad():
                y0, y1 = m(*x), res.model(*x)
            ys0, ys1 = dsrewrite.timing.measure.tensors_of(y0), dsrewrite.timing.measure.tensors_of(y1)
            err = max(float((b.double() - c.double()).norm() / c.double().norm()) for b, c in zip(ys1, ys0))
            rows.append({"model": name, "dtype": str(dtype), "rewritten": len(res.report.rewritten), "rel_error": err})
            print(f"{name:28s} {str(dtype):14s} {len(res.report.rewritten):4d} rewritten  rel. error {err:.2e}")
    write_json(a.out, "float64_check.py", None, rows=rows)


if __name__ == "__main__":
    main()
