"""torch.compile benchmark (issue 7): compiled rewritten model vs compiled original, latency ratio next to FLOP ratio.

For each model, dtype, batch and compile mode it compiles the original with Inductor (``torch.compile(model,
mode=...)``) and the rewritten one with the dsrewrite backend at each rank (``dsrewrite.compile(model, rank=...,
mode=...)``: the separable pairs become the Triton op on CUDA, the rest of the graph goes to Inductor), and times
both in the same run: ``triton.testing.do_bench`` medians on CUDA, ``dsrewrite.timing.measure.time_call`` on the CPU.
Reported per row: FLOPs kept (FlopCounterMode convention, 2 per multiply-add, from the backend's report), latency
ratio (rewritten / original; < 1 is faster), both times, compile times, and the compiled rewritten model's
relative L2 error against ``dsrewrite.rewrite()`` run eagerly (a check that the timed model is the right one).

    python benchmarks/compile.py --out benchmarks/compile.json --markdown benchmarks/compile.md     # NVIDIA GPU
    python benchmarks/compile.py --models resnet50 --ranks 4 --dtypes fp16 --batches 32 --modes max-autotune
    python benchmarks/compile.py --dry-run --out /tmp/compile.json   # a tiny CNN on the CPU: proves the script runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_cnn() -> nn.Module:
    """The --dry-run model: three 3x3 conv-BN-ReLU blocks, pooling and a classifier."""
    layers: List[nn.Module] = []
    for cin, cout, stride in ((3, 16, 1), (16, 32, 2), (32, 32, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def build(name: str) -> nn.Module:
    if name == "tiny":
        return tiny_cnn()
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of ``fn()``: do_bench on CUDA (L2 flushed, synchronised), wall time on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from dsrewrite.timing.measure import time_call

    return lambda fn: time_call(lambda: fn(), (), warmup=2, reps=10, device=device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def first_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple:
    """(output, seconds) of the first call: compilation happens there."""
    t0 = time.perf_counter()
    y = fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return y, time.perf_counter() - t0


def bench_case(name: str, dtype: str, batch: int, size: int, mode: str, ranks: Sequence[str], device: torch.device,
               sep_backend: str) -> List[Dict[str, Any]]:
    """One model, dtype, batch and mode: the compiled original once, then the compiled rewritten one per rank."""
    import dsrewrite
    from dsrewrite.dynamo.backend import clear_cache

    torch.manual_seed(0)
    model = build(name).eval().to(device=device, dtype=DTYPES[dtype])
    x = torch.randn(batch, 3, size, size, device=device, dtype=DTYPES[dtype])
    time_ms = timer(device)
    torch_mode = None if mode == "default" else mode
    rows = []
    with torch.no_grad():
        torch._dynamo.reset()
        original = torch.compile(model, mode=torch_mode, dynamic=False)
        _, compile_orig = first_call(original, x)
        t_orig = time_ms(lambda: original(x))
        for r in ranks:
            rank = r if r in ("auto", "full") else int(r)
            torch._dynamo.reset()
            clear_cache()
            compiled = dsrewrite.compile(model, rank=rank, mode=torch_mode, dynamic=False, backend=sep_backend)
            y, compile_rew = first_call(compiled, x)
            t_rew = time_ms(lambda: compiled(x))
            report = compiled.dsrewrite_reports[0]
            eager = dsrewrite.rewrite(model, x, rank=rank, backend=sep_backend, measure_time=False).model
            rows.append(dict(
                model=name, dtype=dtype, batch=batch, size=size, mode=mode, rank=str(r), sep_backend=sep_backend,
                convs_rewritten=len(report.rewritten), flops_before=report.flops_before,
                flops_after=report.flops_after, flops_ratio=report.flops_after / report.flops_before,
                params_ratio=report.params_after / report.params_before, original_ms=t_orig, rewritten_ms=t_rew,
                latency_ratio=t_rew / t_orig, compile_s_original=compile_orig, compile_s_rewritten=compile_rew,
                rel_err_vs_eager_rewrite=rel_err(y.float(), eager(x).float()),
            ))
            print(f"{name} {dtype} N={batch} {mode} rank={r}: FLOPs kept {rows[-1]['flops_ratio']:.2f}, "
                  f"{t_orig:.3f} -> {t_rew:.3f} ms (x{rows[-1]['latency_ratio']:.2f})", flush=True)
            del compiled, eager
    torch._dynamo.reset()
    return rows


def to_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"- device: {meta['device']}; torch {meta['torch']}; date {meta['date']}; command: `{meta['command']}`",
             "- FLOPs kept: rewritten / original (2 FLOPs per multiply-add, FlopCounterMode); latency ratio: "
             "rewritten / original, both compiled (< 1 is faster)", "",
             "| model | dtype | batch | mode | rank | FLOPs kept | latency ratio | original (ms) | rewritten (ms) "
             "| compile (s) orig / rew |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['mode']} | {r['rank']} | "
                     f"{r['flops_ratio']:.2f} | {r['latency_ratio']:.2f} | {r['original_ms']:.3f} | "
                     f"{r['rewritten_ms']:.3f} | {r['compile_s_original']:.0f} / {r['compile_s_rewritten']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    p.add_argument("--ranks", nargs="+", default=["2", "4", "auto"])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "fp32"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--modes", nargs="+", choices=("default", "max-autotune"), default=["default", "max-autotune"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--sep-backend", choices=("auto", "torch", "triton"), default="auto",
                   help="how the separable pairs run: auto = the Triton op on CUDA, torch = two conv ops")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--markdown", help="write a Markdown table here")
    p.add_argument("--dry-run", action="store_true", help="a tiny CNN on the CPU (fp32, batch 2, 32x32, default mode)")
    a = p.parse_args(argv)
    if a.dry_run:
        a.models, a.ranks, a.dtypes, a.batches, a.modes = ["tiny"], ["2", "full"], ["fp32"], [2], ["default"]
        a.size = 32
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny ops: threads only add synchronisation (and noise on a shared machine)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("benchmarks/compile.py: no CUDA device; use --dry-run on the CPU", file=sys.stderr)
        return 2
    rows: List[Dict[str, Any]] = []
    for name in a.models:
        for dtype in a.dtypes:
            for batch in a.batches:
                for mode in a.modes:
                    rows += bench_case(name, dtype, batch, a.size, mode, a.ranks, device, a.sep_backend)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
                date=datetime.date.today().isoformat(),
                command="python benchmarks/compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                dry_run=a.dry_run)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    md = to_markdown(rows, meta)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
