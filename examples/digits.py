"""Digits end to end: train a small CNN on scikit-learn's handwritten digits, rewrite it to about half its
conv FLOPs, fine-tune it back by distillation, and print the accuracy at each step.

    python examples/digits.py                      # one seed, ~20 s on a 2-core CPU
    python examples/digits.py --seeds 0 1 2 --check  # the measurement quoted in docs/finetune.md
    python examples/digits.py --quick              # a few seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import sys

from dsrewrite.demo import run_digits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (split, init, training)")
    p.add_argument("--target", type=float, default=0.5, help="fraction of the conv FLOPs to keep (default 0.5)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="epochs to train the original (default 30)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default 10)")
    p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    p.add_argument("--train", choices=("all", "separable"), default="all", help="which parameters to fine-tune")
    p.add_argument("--check", action="store_true", help="exit 1 unless every seed is within --tolerance points")
    p.add_argument("--tolerance", type=float, default=1.0, help="allowed accuracy loss in points (--check)")
    p.add_argument("--report", help="write the (last seed's) rewrite report as JSON to this path")
    p.add_argument("--json", help="write the measured numbers as JSON to this path")
    p.add_argument("--quick", action="store_true", help="a short run: 3 pretraining epochs, 1 fine-tuning epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if not 0 < a.target < 1:
        p.error("--target must be between 0 and 1")

    rows = []
    for seed in a.seeds:
        out = run_digits(seed, quick=a.quick, pretrain_epochs=a.pretrain_epochs, finetune_epochs=a.finetune_epochs,
                         target=a.target, lr=a.lr, train=a.train, progress=not a.no_progress)
        rows.append(out)
        if a.report:
            out["report"].to_json(a.report)

    print()
    print(rows[-1]["report"].table())
    print()
    print("seed  rank  conv FLOPs kept  original  rewritten  fine-tuned  change   fine-tune epochs  time")
    for r in rows:
        print(f"{r['seed']:<4}  {r['rank']:<4}  {100 * r['conv_flops_ratio']:>14.1f}%  {r['before']:>7.2f}%  "
              f"{r['rewritten']:>8.2f}%  {r['finetuned']:>9.2f}%  {r['finetuned'] - r['before']:+6.2f}  "
              f"{r['finetune_epochs']:>16}  {r['seconds']:4.0f} s")
    if a.json:
        keep = ("seed", "rank", "conv_flops_ratio", "flops_ratio", "before", "rewritten", "finetuned",
                "finetune_epochs", "pretrain_epochs", "seconds")
        with open(a.json, "w") as f:
            json.dump([{k: r[k] for k in keep} for r in rows], f, indent=2)
    if a.check:
        bad = [r["seed"] for r in rows if r["finetuned"] < r["before"] - a.tolerance]
        if bad:
            print(f"FAIL: seeds {bad} did not recover to within {a.tolerance} points")
            return 1
        print(f"OK: every seed within {a.tolerance} point(s) of the original accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
