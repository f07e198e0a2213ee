"""Correctness of the Triton kernels on a CUDA GPU (issue 13), the first step of ``benchmarks/gpu_check.sh``.

The unit tests run the kernels in the Triton interpreter on CPU tensors; this runs the compiled kernels on
the GPU, against two float64 ``F.conv2d`` calls, and prints one markdown row per case:
  * the autotune-key regression: fused 5x5 and 7x7 fp16/bf16, the same shape in NCHW, then channels_last, then
    with a ragged index, through the autotuner (a reused NCHW config could fail with ``OutOfResources``);
  * fp16, bf16, fp32-tf32 and fp32-ieee, NCHW and channels_last, fused and split path, with and without a
    ragged channel index, each activation, stride 2 and dilation 2 among them;
  * the backward (input, both weights, bias) against float64 autograd of the two ``F.conv2d`` calls.
Tolerances (``max|y - ref| <= tol * max|ref|``): fp32-ieee 1e-5, tf32 5e-3, fp16 5e-3, bf16 3e-2.

    python benchmarks/gpu_check.py            # on a GPU; exit status 1 if any case fails
    python benchmarks/gpu_check.py --dry-run  # list the cases, import the kernels, run nothing (CPU)
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from typing import List, NamedTuple, Optional

TOL = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}
DTYPE = {"fp32-ieee": "float32", "fp32-tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class Case(NamedTuple):
    name: str
    dtype: str  # key of TOL
    n: int
    c: int
    r: int
    m: int
    hw: int
    k: int
    stride: int = 1
    dil: int = 1
    cl: bool = False
    ragged: bool = False
    act: Optional[str] = None
    bias: bool = True
    path: str = "auto"
    backward: bool = False


def cases() -> List[Case]:
    out = []
    # the autotune-key regression (issue 13): same shape, NCHW then channels_last then ragged, autotuned
    for k in (5, 7):
        for dt in ("fp16", "bf16"):
            for cl, ragged in ((False, False), (True, False), (True, True)):
                out.append(Case(f"key-k{k}", dt, 8, 96, 2, 128, 28, k, cl=cl, ragged=ragged, path="fused"))
    # dtype x layout x path x ragged matrix, odd channel counts, each activation, stride/dilation
    acts = [None, "relu", "relu6", "silu"]
    i = 0
    for dt in ("fp16", "bf16", "fp32-tf32", "fp32-ieee"):
        for cl in (False, True):
            for path in ("fused", "split"):
                for ragged in (False, True):
                    stride, dil = (2, 1) if i % 3 == 1 else ((1, 2) if i % 3 == 2 else (1, 1))
                    out.append(Case("matrix", dt, 2, 24 + i % 5, 3, 40 + 3 * (i % 7), 17, 3, stride, dil, cl, ragged,
                                    acts[i % 4], bias=i % 2 == 0, path=path))
                    i += 1
    # backward vs float64 autograd
    for dt in ("fp32-ieee", "fp16"):
        for cl in (False, True):
            out.append(Case("backward", dt, 2, 16, 2, 32, 12, 3, cl=cl, act="silu", backward=True))
    out.append(Case("backward", "fp32-ieee", 2, 16, 2, 32, 12, 5, ragged=True, act="relu", backward=True))
    return out


def _rel(a, b) -> float:
    b = b.detach()
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_case(c: Case, dev: str = "cuda") -> dict:
    import torch
    import torch.nn.functional as F

    from dsrewrite.kernels import separable_conv2d

    dt = getattr(torch, DTYPE[c.dtype])
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(describe(c).encode()))  # same data every run
    cr = c.c * c.r
    x = torch.randn(c.n, c.c, c.hw, c.hw, generator=g)
    dw = torch.randn(cr, 1, c.k, c.k, generator=g) / c.k
    pw = torch.randn(c.m, cr, 1, 1, generator=g) / cr ** 0.5
    b = torch.randn(c.m, generator=g) if c.bias else None
    idx = torch.randint(0, c.c, (cr,), generator=g) if c.ragged else None
    pad = c.dil * (c.k - 1) // 2

    def two_convs(x_, dw_, pw_, b_):
        xi = x_[:, idx] if idx is not None else x_
        z = F.conv2d(xi, dw_, None, c.stride, pad, c.dil, xi.shape[1])
        y = F.conv2d(z, pw_, b_)
        return {None: y, "relu": F.relu(y), "relu6": F.relu6(y), "silu": F.silu(y)}[c.act]

    leaves64 = [t.double().requires_grad_(c.backward) if t is not None else None for t in (x, dw, pw, b)]
    ref = two_convs(*leaves64)
    fmt = torch.channels_last if c.cl else torch.contiguous_format
    leaves = [t.to(dev, dt).requires_grad_(c.backward) if t is not None else None for t in (x, dw, pw, b)]
    xin = leaves[0].to(memory_format=fmt) if c.cl else leaves[0]
    prec = {"fp32-ieee": "ieee", "fp32-tf32": "tf32"}.get(c.dtype)
    t0 = time.perf_counter()
    y = separable_conv2d(xin, leaves[1], leaves[2], leaves[3], stride=c.stride, padding=pad, dilation=c.dil,
                         activation=c.act, path=c.path, precision=prec,
                         channel_index=idx.to(dev) if idx is not None else None)
    if dev == "cuda":
        torch.cuda.synchronize()
    row = {"case": c, "ms_first_call": 1e3 * (time.perf_counter() - t0), "errors": {}}
    ok = y.is_contiguous(memory_format=fmt) and bool(torch.isfinite(y).all())
    row["errors"]["y"] = _rel(y.float().cpu(), ref.detach())
    if c.backward:
        gy = torch.randn(ref.shape, generator=g)
        ref.backward(gy.double())
        y.backward(gy.to(dev, dt).to(memory_format=fmt))
        for name, a, r in zip(("dx", "ddw", "dpw", "db"), leaves, leaves64):
            if a is not None:
                row["errors"][name] = _rel(a.grad.float().cpu(), r.grad)
    row["ok"] = ok and all(e <= TOL[c.dtype] for e in row["errors"].values())
    return row


def describe(c: Case) -> str:
    return (f"{c.name} {c.dtype} N={c.n} {c.c}x{c.hw}^2 r={c.r}{' ragged' if c.ragged else ''} -> {c.m} k={c.k} "
            f"s={c.stride} d={c.dil} {'cl' if c.cl else 'nchw'} {c.path} {c.act or 'none'}"
            f"{' +bias' if c.bias else ''}{' +backward' if c.backward else ''}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the cases and import the kernels; run nothing")
    args = p.parse_args(argv)
    todo = cases()
    if args.dry_run:
        import dsrewrite.kernels.separable_conv2d  # noqa: F401 - the package must resolve (staging, Triton)

        for c in todo:
            print(describe(c))
        print(f"{len(todo)} cases (dry run: nothing launched)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device (use --dry-run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference runs on the CPU anyway
    print("| case | max rel err (y; grads) | first call ms | ok |\n|---|---|---|---|", flush=True)
    bad = 0
    for c in todo:
        try:
            row = run_case(c)
            errs = "; ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
            ok, ms = row["ok"], f"{row['ms_first_call']:.0f}"
        except Exception as e:  # noqa: BLE001 - report every case, OutOfResources included
            errs, ok, ms = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", False, "-"
        bad += not ok
        print(f"| {describe(c)} | {errs} | {ms} | {'ok' if ok else 'FAIL'} |", flush=True)
    print(f"\n{len(todo) - bad}/{len(todo)} cases passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
