"""Real architectures at rank="full": is the rewrite exact, or refused with a reason, on models we did not write?

Part 1 (timm, random weights, eval mode): each architecture through ``dsrewrite.rewrite(rank="full")`` on the
route it takes (fx, or the module-swap fallback when it does not trace), and again with tracing disabled
(the fallback route forced). Per model: convs found / rewritten / skipped, folded run-time weights,
self-check failures, and the whole-model relative output error against the original on a fresh input
(float32; exact means <= 1e-4). A crash is a row, not an abort.

Part 2 (ONNX files shipped inside Python packages, when installed: rapidocr-onnxruntime, silero-vad,
ddddocr): see ``benchmarks/real_onnx.py``.

Usage: python benchmarks/real_models.py [--models a,b,...] [--out benchmarks/real_models.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Optional

import torch

# the models named in issue 11 first, then a spread of families (plain, grouped, depthwise, dilated, hybrid)
MODELS = [
    "tf_efficientnet_b0", "tf_mixnet_s", "tf_efficientnetv2_b0", "tf_efficientnet_lite0",
    "tf_mobilenetv3_small_100", "dm_nfnet_f0", "vit_small_r26_s32_224", "resnetv2_50x1_bit",
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_004",
    "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "mixnet_s", "ghostnet_100",
    "densenet121", "dla34", "dpn68", "vgg11", "repvgg_a0", "cspresnet50", "cspdarknet53",
    "hrnet_w18_small", "res2net50_14w_8s", "nf_resnet50", "nfnet_l0", "convnext_atto", "convnextv2_atto",
    "inception_v3", "xception41", "rexnet_100", "lcnet_050", "tinynet_e", "semnasnet_050", "fbnetc_100",
    "skresnet18", "resnest14d", "gernet_s", "botnet26t_256", "halonet26t", "coatnet_nano_rw_224",
    "maxvit_nano_rw_256", "efficientformer_l1", "levit_128s", "poolformer_s12", "edgenext_xx_small",
    "mobilevit_xxs", "fastvit_t8", "ese_vovnet19b_dw", "hardcorenas_a", "visformer_tiny", "ecaresnet26t",
    "legacy_seresnet18", "bat_resnext26ts", "sebotnet33ts_256", "cs3darknet_s", "darknet17",
    "resnet18d", "tresnet_m",
]


def _input_size(model) -> tuple:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def run_one(name: str, force_swap: bool) -> dict:
    import timm

    import dsrewrite
    import dsrewrite.api as api

    row = {"model": name, "forced": "module-swap" if force_swap else None}
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as e:  # noqa: BLE001 - an architecture this timm version lacks
        row["error"] = f"create_model: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    size = _input_size(model)
    x = torch.randn(1, *size)
    real_trace = api.trace
    if force_swap:
        def untraceable(*a, **k):
            raise RuntimeError("tracing disabled by the benchmark")
        api.trace = untraceable
    t0 = time.perf_counter()
    try:
        res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    finally:
        api.trace = real_trace
    row["rewrite_s"] = round(time.perf_counter() - t0, 2)
    rep = res.report
    row.update(route=rep.route, input=list(x.shape), convs=len(rep.layers), rewritten=len(rep.rewritten),
               skipped=len(rep.skipped),
               folded=sum(1 for L in rep.rewritten if L.note and "folded" in L.note),
               self_check_failed=sum(1 for L in rep.skipped if (L.reason or "").startswith("self-check failed")))
    reasons: dict = {}
    for L in rep.skipped:
        key = (L.reason or "").split(" (")[0]
        key = "already depthwise" if key.startswith("already depthwise") else key
        key = "grouped convolution" if key.startswith("grouped convolution") else key
        reasons[key] = reasons.get(key, 0) + 1
    row["skip_reasons"] = reasons
    xt = torch.randn(1, *size)  # a fresh input, not the one the pass saw
    try:
        with torch.no_grad():
            y0, y1 = model(xt), res.model(xt)
        y0 = y0 if isinstance(y0, torch.Tensor) else y0[0]
        y1 = y1 if isinstance(y1, torch.Tensor) else y1[0]
        row["rel_error"] = float((y1.double() - y0.double()).norm() / y0.double().norm())
    except Exception as e:  # noqa: BLE001
        row["error"] = f"rewritten model fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row


def markdown(rows: list) -> str:
    """The RESULTS.md table: one line per model, the route it takes and the forced module-swap route side by side."""
    def err(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return "error: " + r["error"]
        return f"{r['rel_error']:.1e}" + (f" ({r['self_check_failed']} self-check skips)" if r["self_check_failed"] else "")

    out = ["| model | route taken | convs rewritten / found | run-time weights folded | skipped (reasons) | "
           "full-rank rel. error | forced module-swap: rewritten, error |", "|---|---|---|---|---|---|---|"]
    by_model: dict = {}
    for r in rows:
        by_model.setdefault(r["model"], {})["swap" if r.get("forced") else "own"] = r
    for name, pair in by_model.items():
        r, f = pair.get("own"), pair.get("swap")
        if r is None or "convs" not in r:
            out.append(f"| {name} | - | - | - | - | {err(r)} | - |")
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["skip_reasons"].items(), key=lambda kv: -kv[1]))
        forced = "-" if f is None else (f"{f.get('rewritten', '-')}, {err(f)}")
        out.append(f"| {name} | {r['route']} | {r['rewritten']} / {r['convs']} | {r['folded']} | {reasons} | "
                   f"{err(r)} | {forced} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-forced-swap", action="store_true", help="only the route each model takes")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "real_models.json"))
    ap.add_argument("--table", metavar="JSON", help="only print the Markdown table of an earlier run")
    a = ap.parse_args()
    if a.table:
        with open(a.table) as f:
            print(markdown(json.load(f)["rows"]))
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import timm

    rows = []
    for name in a.models.split(","):
        for forced in (False,) if a.no_forced_swap else (False, True):
            row = run_one(name, forced)
            rows.append(row)
            err = row.get("rel_error")
            print(f"{name:28s} {row.get('forced') or '':12s} {row.get('route', '-'):26s} "
                  f"{row.get('rewritten', '-')!s:>3}/{row.get('convs', '-')!s:<4} folded {row.get('folded', '-')!s:>2} "
                  f"selfcheck-fail {row.get('self_check_failed', '-')!s:>2} "
                  f"err {'-' if err is None else f'{err:.1e}'} {row.get('error', '')}", flush=True)
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    meta = {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/real_models.py", "commit": commit}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    exact = [r for r in rows if r.get("rel_error") is not None and r["rel_error"] <= 1e-4]
    bad = [r for r in rows if r.get("rel_error") is not None and r["rel_error"] > 1e-4]
    errs = [r for r in rows if "error" in r]
    print(f"\n{len(rows)} runs: {len(exact)} exact (<= 1e-4), {len(bad)} not exact, {len(errs)} errors\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
