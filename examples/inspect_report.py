"""Inspect a saved dsrewrite report: print it as a table, JSON and Markdown, and plot it per layer (PNG).

    python examples/rewrite_torchvision.py --model resnet18 --report r18.json
    python examples/inspect_report.py r18.json --plot r18.png
    python examples/inspect_report.py --quick --plot out.png   # makes a small report first (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsrewrite import DsrewriteError, Report  # noqa: E402


def plot(report: Report, path: str) -> None:
    """Per-layer FLOPs before and after (log scale) and, for rewritten layers, the weight error."""
    layers = report.layers
    xs = range(len(layers))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * len(layers) + 2), 7.5), sharex=True)
    ax1.bar([x - 0.2 for x in xs], [L.flops_before for L in layers], 0.4, label="before", color="#888888")
    ax1.bar([x + 0.2 for x in xs], [L.flops_after for L in layers], 0.4, label="after",
            color=["#1f77b4" if L.rewritten else "#cccccc" for L in layers])
    ax1.set_yscale("log")
    ax1.set_ylabel("FLOPs (2 x MACs)")
    ax1.set_title(f"{report.model or 'model'}: FLOPs {100 * (report.flops_ratio or 1):.1f}% of the original, "
                  f"{len(report.rewritten)}/{len(layers)} convs rewritten")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8, frameon=False)
    ax2.bar(list(xs), [L.error if L.rewritten and L.error is not None else 0.0 for L in layers], color="#d62728")
    ax2.set_ylabel("relative weight error")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels([L.name for L in layers], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _quick_report(path: str) -> None:
    import torch
    import torchvision

    import dsrewrite

    model = torchvision.models.resnet18(weights=None).eval()
    dsrewrite.rewrite(model, torch.randn(1, 3, 64, 64), measure_time=False, name="resnet18").report.to_json(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", help="report JSON (from `dsrewrite rewrite --report` or Report.to_json)")
    p.add_argument("--plot", default="report.png", help="where to save the per-layer plot (default report.png)")
    p.add_argument("--markdown", help="also write the Markdown to this path")
    p.add_argument("--no-json", action="store_true", help="do not print the JSON")
    p.add_argument("--quick", action="store_true", help="without a report path: make one from resnet18 at 64x64")
    a = p.parse_args(argv)
    path = a.report
    if path is None:
        if not a.quick:
            p.error("give a report JSON path (or --quick to make one)")
        path = os.path.join(tempfile.mkdtemp(prefix="dsrewrite-"), "resnet18.json")
        _quick_report(path)
    try:
        report = Report.from_json(path)
    except DsrewriteError as e:
        p.error(str(e))

    print(report.table())
    print()
    print(report.to_markdown())
    if not a.no_json:
        print(report.to_json())
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(report.to_markdown())
    plot(report, a.plot)
    print(f"per-layer plot saved to {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
