"""Kernel benchmark (issue 3): the Triton depthwise+pointwise kernels vs PyTorch on an NVIDIA GPU.

For each layer shape (MobileNetV2/V1/EfficientNet-B0 separable layers; the pairs the pass makes from
ResNet-50 and VGG-16 3x3 convs at ranks 2, 4, 8), batch N and dtype it times, in the same run:
  * ``eager_nchw`` / ``eager_cl``: ``F.conv2d`` depthwise then pointwise (cuDNN / native kernels),
    NCHW and channels_last;
  * ``compile`` / ``compile_max``: the same two convs under ``torch.compile`` (default and
    ``mode="max-autotune-no-cudagraphs"``: max-autotune's kernel search, without Inductor's own CUDA
    graphs, since this script applies CUDA graphs to every variant alike at small N), channels_last;
  * ``triton_nchw`` / ``triton_cl``: ``dsrewrite.kernels.separable_conv2d`` (dispatcher's choice), and
    ``triton_fused`` / ``triton_split`` (both paths, channels_last) to calibrate the dispatcher.
Times are medians of ``triton.testing.do_bench`` (``do_bench_cudagraph`` for N <= 8, where launch
overhead would dominate). Reported: speed-up of the best Triton layout over each baseline, fraction of the
*measured* device-to-device copy bandwidth (bytes = input read once + output written once + weights),
TFLOP/s (2 FLOPs per multiply-add), and max error vs fp32 eager (tf32 off), relative to max |reference|.

    python benchmarks/kernel_speed.py --dry-run                       # list the cases (no GPU needed)
    python benchmarks/kernel_speed.py --suite mobilenet --n 8 64 --dtype fp16 --out benchmarks/kernels.json
    python benchmarks/kernel_speed.py --check-configs                 # every autotune config vs F.conv2d
    python benchmarks/kernel_speed.py --e2e --n 8 --dtype fp16        # rewritten ResNet-50 / VGG-16, end to end
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Case:
    """One separable layer: depthwise ``c -> c*r`` (k x k, stride), then pointwise ``c*r -> m``."""

    suite: str
    layer: str
    n: int
    c: int
    r: int
    m: int
    h: int
    w: int
    k: int
    stride: int
    dtype: str

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> tuple:
        oh = (self.h + 2 * self.pad - self.k) // self.stride + 1
        ow = (self.w + 2 * self.pad - self.k) // self.stride + 1
        return oh, ow

    @property
    def name(self) -> str:
        return (f"{self.suite}/{self.layer} N={self.n} {self.c}x{self.h}^2 r={self.r} -> {self.m} "
                f"k={self.k} s={self.stride} {self.dtype}")


# (layer, C, r, M, H=W, k, stride): the depthwise layer of each MobileNet-style block and the pointwise
# projection that follows it.
MOBILE_LAYERS = [
    ("mnv2-b3", 144, 1, 24, 56, 3, 1),
    ("mnv2-b4s2", 144, 1, 32, 56, 3, 2),
    ("mnv2-b8", 384, 1, 64, 14, 3, 1),
    ("mnv2-b16", 960, 1, 160, 7, 3, 1),
    ("mnv1-dw9", 512, 1, 512, 14, 3, 1),
    ("effb0-b10", 672, 1, 112, 14, 5, 1),
]
# 3x3 stride-1 convs (Cin, Cout, H=W) that the pass turns into separable pairs; ranks 2, 4, 8.
RESNET50_CONVS = [("layer1", 64, 64, 56), ("layer2", 128, 128, 28), ("layer3", 256, 256, 14),
                  ("layer4", 512, 512, 7)]
VGG16_CONVS = [("conv1_2", 64, 64, 224), ("conv2_2", 128, 128, 112), ("conv3_2", 256, 256, 56),
               ("conv4_2", 512, 512, 28), ("conv5_2", 512, 512, 14)]
RANKS = (2, 4, 8)


def build_cases(suites: List[str], ns: List[int], dtypes: List[str], ranks=RANKS) -> List[Case]:
    cases = []
    for n in ns:
        for dt in dtypes:
            if "mobilenet" in suites:
                cases += [Case("mobilenet", L, n, c, r, m, h, h, k, s, dt) for L, c, r, m, h, k, s in MOBILE_LAYERS]
            for suite, convs in (("resnet50", RESNET50_CONVS), ("vgg16", VGG16_CONVS)):
                if suite in suites:
                    cases += [Case(suite, L, n, c, r, m, h, h, 3, 1, dt) for L, c, m, h in convs for r in ranks]
    return cases


def case_flops(c: Case) -> Dict[str, int]:
    """FLOPs (2 per multiply-add, :func:`dsrewrite.plan.cost_model.separable_pair_flops`): depthwise ``2*k^2*C*r*P``,
    pointwise ``2*C*r*M*P``, P output pixels."""
    from dsrewrite.plan.cost_model import separable_pair_flops  # here, like every dsrewrite/torch import of this script

    oh, ow = c.out_hw
    dw, pw = separable_pair_flops(c.c * c.r, c.m, c.k * c.k, c.n * oh * ow)
    return {"dw": dw, "pw": pw, "total": dw + pw}


def case_bytes(c: Case) -> Dict[str, int]:
    """Roofline bytes: fused = input once + output once + weights; unfused adds the intermediate
    written and read back (``2 * C*r*P``)."""
    b = ITEMSIZE[c.dtype]
    oh, ow = c.out_hw
    p = c.n * oh * ow
    weights = c.c * c.r * c.k * c.k + c.c * c.r * c.m + c.m
    fused = b * (c.n * c.c * c.h * c.w + c.m * p + weights)
    return {"fused": fused, "unfused": fused + b * 2 * c.c * c.r * p, "intermediate": b * c.c * c.r * p}


def case_traffic(c: Case, cfg: Optional[dict] = None) -> Dict[str, float]:
    """The fused kernel's analytic traffic (:func:`fused_traffic`: HBM bytes, L2 bytes, FLOPs with recompute) for
    config ``cfg`` (what the autotuner chose; default: the first config the pruner keeps on an H100), channels_last."""
    from dsrewrite.kernels.separable_conv2d import FUSED_CONFIGS, fused_configs_for, fused_traffic

    if cfg is None:
        first = fused_configs_for(ITEMSIZE[c.dtype], 232448, c.k, c.k, c.m, c.r, FUSED_CONFIGS)[0]
        cfg = dict(first.kwargs, num_stages=first.num_stages)
    t = fused_traffic(c.n, c.c, c.h, c.w, c.m, c.r, c.k, c.k, (c.stride, c.stride), (c.pad, c.pad), (1, 1),
                      ITEMSIZE[c.dtype], cfg, num_stages=cfg.get("num_stages", 1))
    return dict(t, config=cfg)


def peak_memory_bytes(c: Case) -> int:
    """Rough upper bound of what one case allocates (input + intermediate + outputs of all variants)."""
    return case_bytes(c)["unfused"] * 4


def _geomean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


# ------------------------------------------------------------------------------------------- GPU part
def _bench(fn: Callable, cudagraph: bool) -> float:
    """Median milliseconds of ``fn``."""
    import triton.testing as tt

    if cudagraph:  # replays a captured graph on a side stream; no L2 flush between reps
        return float(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(gib: float = 1.0) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted), median of do_bench."""
    import torch

    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a), cudagraph=False)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def l2_bandwidth(mib: int = 8, reps: int = 200) -> float:
    """Measured copy bandwidth (bytes/s, read + write) of a buffer that stays in L2: back-to-back copies timed
    with CUDA events (do_bench would flush L2 between reps)."""
    import torch

    a = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(10):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * reps / (start.elapsed_time(end) * 1e-3)


def run_case(c: Case, variants: List[str], cudagraph_max_n: int, copy_bw: float, l2_bw: float = 0.0) -> dict:
    import torch
    import torch.nn.functional as F

    from dsrewrite.kernels import separable_conv2d

    dt = getattr(torch, DTYPES[c.dtype])
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(c.n, c.c, c.h, c.w, device="cuda", generator=g).to(dt)
    dw = torch.randn(c.c * c.r, 1, c.k, c.k, device="cuda", generator=g).to(dt)
    pw = (torch.randn(c.m, c.c * c.r, 1, 1, device="cuda", generator=g) / math.sqrt(c.c * c.r)).to(dt)
    bias = torch.randn(c.m, device="cuda", generator=g).to(dt)
    x_cl = x.to(memory_format=torch.channels_last)

    def two_convs(inp, dw_, pw_, b_):
        return F.conv2d(F.conv2d(inp, dw_, None, c.stride, c.pad, 1, c.c), pw_, b_)

    fns: Dict[str, Callable] = {
        "eager_nchw": lambda: two_convs(x, dw, pw, bias),
        "eager_cl": lambda: two_convs(x_cl, dw, pw, bias),
        "triton_nchw": lambda: separable_conv2d(x, dw, pw, bias, stride=c.stride, padding=c.pad),
        "triton_cl": lambda: separable_conv2d(x_cl, dw, pw, bias, stride=c.stride, padding=c.pad),
        "triton_fused": lambda: separable_conv2d(x_cl, dw, pw, bias, stride=c.stride, padding=c.pad, path="fused"),
        "triton_split": lambda: separable_conv2d(x_cl, dw, pw, bias, stride=c.stride, padding=c.pad, path="split"),
    }
    if "compile" in variants:
        f = torch.compile(two_convs, dynamic=False)
        fns["compile"] = lambda: f(x_cl, dw, pw, bias)
    if "compile_max" in variants:
        f_max = torch.compile(two_convs, mode="max-autotune-no-cudagraphs", dynamic=False)
        fns["compile_max"] = lambda: f_max(x_cl, dw, pw, bias)

    cudagraph = c.n <= cudagraph_max_n
    from dsrewrite.kernels import choose_path

    row: dict = {**asdict(c), "name": c.name, "flops": case_flops(c), "bytes": case_bytes(c),
                 "cudagraph": cudagraph, "ms": {}, "errors": {},
                 "dispatcher": choose_path(c.c * c.r, c.m, c.k, c.k, ITEMSIZE[c.dtype])}
    with torch.no_grad():
        prev_tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        ref = two_convs(x.float(), dw.float(), pw.float(), bias.float())
        torch.backends.cudnn.allow_tf32 = prev_tf32
        scale = ref.abs().max().item() or 1.0
        for name in variants:
            if name not in fns:
                continue
            try:
                out = fns[name]()  # warm-up: compiles, autotunes
                torch.cuda.synchronize()
                if name in ("triton_cl", "triton_fused") and "traffic" not in row:
                    from dsrewrite.kernels.separable_conv2d import tuned_config

                    tuned = tuned_config()
                    if tuned is not None and (name == "triton_fused" or row["dispatcher"] == "fused"):
                        row["traffic"] = case_traffic(c, tuned)
                row["errors"][name] = (out.float() - ref).abs().max().item() / scale
                row["ms"][name] = _bench(fns[name], cudagraph)
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                row["ms"][name] = None
                row["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    ms = row["ms"]
    tri = [ms.get(k) for k in ("triton_nchw", "triton_cl") if ms.get(k)]
    best_tri = min(tri) if tri else None
    row["triton_ms"] = best_tri
    row["speedup"] = {b: (ms[b] / best_tri if best_tri and ms.get(b) else None)
                      for b in ("eager_nchw", "eager_cl", "compile", "compile_max")}
    eager = [ms.get(b) for b in ("eager_nchw", "eager_cl") if ms.get(b)]
    row["speedup"]["best_eager"] = min(eager) / best_tri if (best_tri and eager) else None
    if best_tri:
        sec = best_tri * 1e-3
        row["tflops"] = case_flops(c)["total"] / sec / 1e12
        row["bw_fraction"] = case_bytes(c)["fused"] / sec / copy_bw
    t = row.get("traffic")
    fused_ms = ms.get("triton_fused") or (ms.get("triton_cl") if row["dispatcher"] == "fused" else None)
    if t and fused_ms:  # how far from each roofline the fused kernel is, and which one binds
        t["hbm_ms"] = t["hbm_bytes"] / copy_bw * 1e3
        t["l2_ms"] = t["l2_bytes"] / l2_bw * 1e3 if l2_bw else None
        t["measured_ms"] = fused_ms
        t["of_hbm_roofline"] = t["hbm_ms"] / fused_ms
    return row


def check_configs() -> int:
    """Every autotune config of the three kernels on a few odd shapes vs F.conv2d (fp32 ieee, fp16, bf16)."""
    import torch
    import torch.nn.functional as F

    from dsrewrite.kernels.depthwise import DEPTHWISE_CONFIGS, depthwise_conv2d_forward
    from dsrewrite.kernels.pointwise import POINTWISE_CONFIGS, pointwise_conv2d_forward
    from dsrewrite.kernels.common import shared_memory_limit
    from dsrewrite.kernels.separable_conv2d import fused_configs_for, separable_conv2d_forward

    bad = 0
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        for (n, c, r, m, h, k) in ((2, 24, 1, 40, 13, 3), (1, 144, 2, 160, 9, 5), (3, 20, 3, 24, 7, 3)):
            x = torch.randn(n, c, h, h + 2, device="cuda").to(dt).to(memory_format=torch.channels_last)
            dw = torch.randn(c * r, 1, k, k, device="cuda").to(dt)
            pw = (torch.randn(m, c * r, 1, 1, device="cuda") / math.sqrt(c * r)).to(dt)
            b = torch.randn(m, device="cuda").to(dt)
            z64 = F.conv2d(x.double(), dw.double(), None, 1, k // 2, 1, c)
            y64 = F.conv2d(z64, pw.double(), b.double())
            runs = [("fused", cfg, lambda cf: separable_conv2d_forward(
                x, dw, pw, b, (1, 1), (k // 2, k // 2), (1, 1), "none", "ieee", config=cf), y64)
                for cfg in fused_configs_for(x.element_size(), shared_memory_limit(x.device), k, k, m, r)]
            runs += [("depthwise", cfg, lambda cf: depthwise_conv2d_forward(
                x, dw, (1, 1), (k // 2, k // 2), (1, 1), config=cf), z64) for cfg in DEPTHWISE_CONFIGS]
            z = z64.to(dt).contiguous(memory_format=torch.channels_last)
            runs += [("pointwise", cfg, lambda cf: pointwise_conv2d_forward(
                z, pw, b, "none", "ieee", config=cf), F.conv2d(z.double(), pw.double(), b.double()))
                for cfg in POINTWISE_CONFIGS]
            for kind, cfg, fn, ref in runs:
                out = fn(dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                err = (out.double() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
                ok = math.isfinite(err) and err <= tol
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} {kind:9s} {str(dt):14s} {cfg} "
                      f"shape={(n, c, r, m, h, k)} err={err:.2e}")
    print(f"{bad} failing config(s)")
    return bad


def end_to_end(ns: List[int], dtypes: List[str], ranks: List[int]) -> List[dict]:
    """Rewritten ResNet-50 / VGG-16 (backend='triton') vs the original model: latency and FLOP ratios."""
    import torch
    import torchvision

    import dsrewrite

    rows = []
    for model_name in ("resnet50", "vgg16"):
        for n in ns:
            for dt_name in dtypes:
                dt = getattr(torch, DTYPES[dt_name])
                model = torchvision.models.get_model(model_name, weights=None).eval().cuda().to(dt)
                x = torch.randn(n, 3, 224, 224, device="cuda", dtype=dt)
                base = {}
                for fmt in ("nchw", "cl"):
                    m = model.to(memory_format=torch.channels_last) if fmt == "cl" else model
                    xi = x.to(memory_format=torch.channels_last) if fmt == "cl" else x
                    with torch.no_grad():
                        base[fmt] = _bench(lambda: m(xi), cudagraph=False)
                x_cl = x.to(memory_format=torch.channels_last)
                for rank in ranks:
                    try:
                        res = dsrewrite.rewrite(model, x[:1], rank=rank, backend="triton", measure_time=False)
                        new = res.model
                        with torch.no_grad():
                            t_new = _bench(lambda: new(x_cl), cudagraph=False)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"{model_name} N={n} {dt_name} rank={rank}: failed: {type(e).__name__}: {e}")
                        continue
                    rep = res.report
                    rows.append({"model": model_name, "n": n, "dtype": dt_name, "rank": rank,
                                 "ms_original_nchw": base["nchw"], "ms_original_cl": base["cl"],
                                 "ms_rewritten_triton": t_new,
                                 "latency_ratio": t_new / min(base.values()),
                                 "flop_ratio": rep.flops_after / rep.flops_before})
                    print(f"{model_name} N={n} {dt_name} rank={rank}: latency ratio "
                          f"{rows[-1]['latency_ratio']:.3f}, FLOP ratio {rows[-1]['flop_ratio']:.3f}")
    return rows


def markdown(rows: List[dict]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| case | path | Triton ms | x eager NCHW | x eager CL | x compile | x max-autotune | "
             "TFLOP/s | BW frac | max err | fused config | model HBM MB / L2 MB | HBM / L2 roofline ms | "
             "of HBM roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["speedup"]
        errs = [v for k, v in r["errors"].items() if k.startswith("triton") and isinstance(v, float)]
        t = r.get("traffic") or {}
        cfg = t.get("config") or {}
        cfg_s = (f"{cfg['TILE_H']}x{cfg['TILE_W']}x{cfg['BLOCK_C']} M{cfg['BLOCK_M']} w{cfg.get('num_warps')}"
                 f" s{cfg.get('num_stages')}") if cfg else "-"
        model = f"{t['hbm_bytes'] / 1e6:.1f} / {t['l2_bytes'] / 1e6:.1f}" if t else "-"
        roof = f"{f(t.get('hbm_ms'), '{:.4f}')} / {f(t.get('l2_ms'), '{:.4f}')}" if t else "-"
        lines.append(f"| {r['name']} | {r['dispatcher']} | {f(r['triton_ms'], '{:.4f}')} | {f(s['eager_nchw'])} | "
                     f"{f(s['eager_cl'])} | {f(s['compile'])} | {f(s['compile_max'])} | {f(r.get('tflops'))} | "
                     f"{f(r.get('bw_fraction'))} | {f(max(errs) if errs else None, '{:.1e}')} | {cfg_s} | {model} | "
                     f"{roof} | {f(t.get('of_hbm_roofline'))} |")
    return "\n".join(lines)


def summary(rows: List[dict]) -> dict:
    big = [r for r in rows if r["n"] >= 8]
    return {
        "geomean_speedup_best_eager_n>=8": _geomean([r["speedup"]["best_eager"] for r in big]),
        "geomean_speedup_max_autotune_n>=8": _geomean([r["speedup"]["compile_max"] for r in big]),
        "geomean_speedup_best_eager_all": _geomean([r["speedup"]["best_eager"] for r in rows]),
        "fused_vs_split_dispatcher_right": sum(
            1 for r in rows if r["ms"].get("triton_fused") and r["ms"].get("triton_split")
            and (r["dispatcher"] == "fused") == (r["ms"]["triton_fused"] <= r["ms"]["triton_split"])),
        "cases": len(rows),
    }


ALL_VARIANTS = ["eager_nchw", "eager_cl", "compile", "compile_max", "triton_nchw", "triton_cl",
                "triton_fused", "triton_split"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--suite", nargs="+", default=["mobilenet", "resnet50", "vgg16"],
                   choices=["mobilenet", "resnet50", "vgg16"])
    p.add_argument("--n", nargs="+", type=int, default=[1, 8, 64, 256], help="batch sizes")
    p.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS), help="ranks for ResNet-50/VGG-16 pairs")
    p.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    p.add_argument("--max-gb", type=float, default=20.0, help="skip cases whose tensors exceed this (GiB)")
    p.add_argument("--cudagraph-max-n", type=int, default=8, help="use CUDA graphs for N <= this")
    p.add_argument("--limit", type=int, default=0, help="run only the first LIMIT cases (0: all)")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--dry-run", action="store_true", help="list the cases with FLOPs and bytes, run nothing")
    p.add_argument("--check-configs", action="store_true", help="check every autotune config, then exit")
    p.add_argument("--e2e", action="store_true", help="also time rewritten ResNet-50 / VGG-16 end to end")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = build_cases(args.suite, args.n, args.dtype, args.ranks)
    skipped = [c for c in cases if peak_memory_bytes(c) > args.max_gb * 2**30]
    cases = [c for c in cases if c not in skipped]
    if args.limit:
        cases = cases[:args.limit]
    if args.dry_run:
        for c in cases:
            fl, by, t = case_flops(c), case_bytes(c), case_traffic(c)
            print(f"{c.name:70s} GFLOP={fl['total'] / 1e9:9.3f} fused MB={by['fused'] / 1e6:9.1f} "
                  f"unfused MB={by['unfused'] / 1e6:9.1f} FLOP/B={fl['total'] / by['fused']:7.1f} "
                  f"model: HBM MB={t['hbm_bytes'] / 1e6:.1f} L2 MB={t['l2_bytes'] / 1e6:.1f} "
                  f"recompute={t['recompute']:.0f}x")
        print(f"{len(cases)} cases ({len(skipped)} skipped over --max-gb {args.max_gb})")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --dry-run to list the cases)", file=sys.stderr)
        return 2
    if args.check_configs:
        return 1 if check_configs() else 0
    bw, l2 = copy_bandwidth(), l2_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  measured D2D copy bandwidth: {bw / 1e9:.0f} GB/s, "
          f"L2-resident copy: {l2 / 1e9:.0f} GB/s")
    rows = []
    for i, c in enumerate(cases):
        rows.append(run_case(c, args.variants, args.cudagraph_max_n, bw, l2))
        print(f"[{i + 1}/{len(cases)}] {c.name}: triton {rows[-1]['triton_ms']} ms, "
              f"x best eager {rows[-1]['speedup']['best_eager']}", flush=True)
        torch.cuda.empty_cache()
    table = markdown(rows)
    print(table)
    summ = summary(rows)
    print(json.dumps(summ, indent=1))
    e2e = end_to_end(args.n, args.dtype, args.ranks) if args.e2e else []
    if args.out:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__,
                "copy_bandwidth_Bps": bw, "l2_copy_bandwidth_Bps": l2, "skipped": [c.name for c in skipped]}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "summary": summ, "cases": rows, "end_to_end": e2e}, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
