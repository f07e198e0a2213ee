"""Rewrite a torchvision model (random weights, no download) and print the savings report.

    python examples/rewrite_torchvision.py --model resnet18
    python examples/rewrite_torchvision.py --model vgg11 --rank 8 --report vgg11.json --markdown vgg11.md
    python examples/rewrite_torchvision.py --quick   # resnet18 at 64x64, no timing (CI)
"""
from __future__ import annotations

import argparse
import sys

import torch
import torchvision

import dsrewrite


def _rank(text: str):
    from dsrewrite.plan.policy import check_rank

    try:
        return check_rank(text)
    except dsrewrite.DsrewriteError as e:
        raise argparse.ArgumentTypeError(str(e))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="torchvision model name (default resnet18)")
    p.add_argument("--rank", type=_rank, default="auto", help="int, 'auto' (about half of each layer's FLOPs) or 'full'")
    p.add_argument("--input-size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input")
    p.add_argument("--include", action="append", help="only rewrite convs matching this glob (repeatable)")
    p.add_argument("--exclude", action="append", help="never rewrite convs matching this glob (repeatable)")
    p.add_argument("--report", help="write the report as JSON here (read it with examples/inspect_report.py)")
    p.add_argument("--markdown", help="write the report as Markdown here")
    p.add_argument("--no-time", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--quick", action="store_true", help="64x64 input and no timing (fast, for CI)")
    a = p.parse_args(argv)
    if a.model not in torchvision.models.list_models():
        p.error(f"unknown torchvision model {a.model!r}")
    size = 64 if a.quick else a.input_size

    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, weights=None).eval()
    x = torch.randn(a.batch, 3, size, size)
    result = dsrewrite.rewrite(model, x, rank=a.rank, include=a.include, exclude=a.exclude,
                              measure_time=not (a.quick or a.no_time), name=a.model)
    print(result.report.table())

    with torch.no_grad():  # how far the rewritten model is from the original on this input
        y0, y1 = model(x), result.model(x)
    print(f"relative output difference on the example input: {float((y1 - y0).norm() / y0.norm()):.3f} "
          "(before fine-tuning; see examples/digits.py)")
    if a.report:
        result.report.to_json(a.report)
        print(f"report written to {a.report}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(result.report.to_markdown())
        print(f"Markdown written to {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
