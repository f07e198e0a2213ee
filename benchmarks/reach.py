"""Reach (issue 22, item 6): how much of a model's work each dsrewrite layer kind can touch, and how far a budget
over KxK convs only, or over every weight layer, can take it.

For each timm architecture (random weights, nothing downloaded, eval mode), at 224x224, batch 1:

* **MAC shares by layer kind**, counted with forward hooks on every ``nn.Conv*d`` / ``nn.Linear`` against
  ``FlopCounterMode``'s whole-model total: dense KxK (groups=1, a kernel side > 1), 1x1 (groups=1, every side 1),
  depthwise/grouped (groups > 1), linear, and other (the rest of the total: attention matmuls, ...).
* **The share dsrewrite can touch** and **the smallest reachable FLOPs ratio**, per ``kinds``: from the
  :class:`~dsrewrite.errors.BudgetUnreachable` that ``rewrite(model, x, target_flops=1e-6, kinds=...)`` raises,
  which lists every eligible layer's ``(dense, cheapest pair)`` cost and the model's total: touchable share =
  sum of the eligible layers' dense FLOPs / total; smallest reachable = the error's ``reachable`` (every eligible
  layer at its cheapest rank, the others dense). ``kinds`` (``--kinds``): ``kxk`` and ``all`` by default (each
  call factorises every eligible layer: vgg16's 25088x4096 classifier alone takes a minute on 2 cores);
  ``pointwise`` and ``linear`` on request.

Then, for a few of them (``--latency-models``), at batch 8 and a lower resolution (``--latency-size``, 160 by
default: full 224 runs do not fit 2 cores' time), **measured time of ``target_latency`` plans** (eager, planned
and checked in eager by ``rewrite``'s closed loop), with ``kinds="kxk"`` and ``kinds="all"``: the report's
side-by-side ratio (``dsrewrite.timing.measure.compare``: fastest of interleaved rounds, noise = half the IQR of the
per-round ratios), re-measured here with ``compare`` in eager and, with ``--onnxruntime``, in onnxruntime
(both models exported the CLI's way, 2 intra-op threads). A refused target is recorded with its message.
The 1-minute load average of the machine is recorded with every timing (other processes share the 2 cores).

Usage:
  python benchmarks/reach.py --onnxruntime                    # the committed run: 14 models, 3 timed
  python benchmarks/reach.py --quick                          # 3 models, no latency
  python benchmarks/reach.py --models resnet50,convnext_tiny --latency-models resnet50
Writes benchmarks/reach.json and benchmarks/reach.md (``--json``, ``--md``); ``--render`` rewrites the Markdown
from a JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import dsrewrite  # noqa: E402
from dsrewrite.errors import BudgetUnreachable, DsrewriteError  # noqa: E402
from dsrewrite.timing.measure import compare, count_flops  # noqa: E402

MODELS = ("resnet18", "resnet50", "vgg16", "densenet121", "mobilenetv3_large_100", "efficientnet_b0",
          "regnety_016", "fastvit_t8", "efficientvit_b1", "mobilevit_s", "convnext_tiny",
          "vit_small_patch16_224", "convnext_atto", "deit_tiny_patch16_224")
MORE = ("cspdarknet53", "repvgg_a2", "hrnet_w18_small", "mixer_b16_224")  # --models, when time allows
QUICK = ("resnet18", "mobilenetv3_large_100", "convnext_atto")
LATENCY_MODELS = ("resnet50", "mobilenetv3_large_100", "convnext_tiny")
KINDS = ("kxk", "pointwise", "linear", "all")
DEFAULT_KINDS = ("kxk", "all")
SHARES = ("kxk", "1x1", "grouped", "linear", "other")
THREADS = 2
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def build(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False).eval()


# ---------------------------------------------------------------------------------------------- counting
def layer_kind(m: nn.Module) -> Optional[str]:
    """The share column of a weight module: ``kxk`` / ``1x1`` / ``grouped`` / ``linear`` (None: not counted)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.groups > 1:
            return "grouped"
        return "1x1" if all(k == 1 for k in m.kernel_size) else "kxk"
    return None


def mac_shares(model: nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """MACs per layer kind (forward hooks) as shares of ``FlopCounterMode``'s total (2 FLOPs per MAC)."""
    macs = {k: 0 for k in SHARES}
    hooks = []

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        kind = layer_kind(m)
        if isinstance(m, nn.Linear):
            macs[kind] += out.numel() * m.in_features
        else:
            k = 1
            for s in m.kernel_size:
                k *= s
            macs[kind] += out.numel() * (m.in_channels // m.groups) * k

    for m in model.modules():
        if layer_kind(m) is not None:
            hooks.append(m.register_forward_hook(hook))
    try:
        flops = count_flops(model, (x,))
    finally:
        for h in hooks:
            h.remove()
    total = flops / 2
    macs["other"] = max(total - sum(macs[k] for k in SHARES if k != "other"), 0)
    return dict(total_gmacs=round(total / 1e9, 4), shares={k: round(v / total, 4) for k, v in macs.items()})


def reach(model: nn.Module, x: torch.Tensor, kinds: str) -> Dict[str, Any]:
    """Touchable share and smallest reachable FLOPs ratio with ``kinds``, from the refusal of an unreachable budget
    (1e-6: a ViT over all kinds reaches below 0.01, as FlopCounterMode on the CPU leaves attention uncounted)."""
    t0 = time.perf_counter()
    try:
        dsrewrite.rewrite(model, x, target_flops=1e-6, kinds=kinds, measure_time=False, strict=True)
    except BudgetUnreachable as e:
        touch = sum(d for d, _ in e.layers)
        return dict(touchable=round(touch / e.total, 4), reachable=round(e.reachable, 4), layers=len(e.layers),
                    seconds=round(time.perf_counter() - t0, 1))
    except DsrewriteError as e:  # nothing eligible, or another refusal: said as such
        return dict(touchable=0.0, reachable=1.0, layers=0, error=str(e).splitlines()[0],
                    seconds=round(time.perf_counter() - t0, 1))
    return dict(error="target_flops=1e-6 was met", seconds=round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------------------------------------- latency
def latency_row(name: str, kinds: str, target: float, size: int, batch: int, ort: bool) -> Dict[str, Any]:
    """``target_latency`` plan in eager with ``kinds``; the report's ratio, and ours in eager (and onnxruntime)."""
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(batch, 3, size, size)
    row: Dict[str, Any] = dict(model=name, kinds=kinds, target_latency=target, size=size, batch=batch)
    t0 = time.perf_counter()
    try:
        res = dsrewrite.rewrite(model, x, target_latency=target, kinds=kinds, runtime="eager")
    except DsrewriteError as e:
        row.update(refused=str(e).splitlines()[0], plan_seconds=round(time.perf_counter() - t0, 1), load=load())
        return row
    rep = res.report
    row.update(plan_seconds=round(time.perf_counter() - t0, 1), flops_ratio=round(rep.flops_after / rep.flops_before, 4),
               rewritten={k: sum(1 for lr in rep.layers if lr.rewritten and lr.kind == k) for k in ("kxk", "pointwise", "linear")},
               report_ratio=round(rep.time_after_ms / rep.time_before_ms, 3) if rep.time_before_ms else None,
               report_noise=round(rep.time_noise, 3) if rep.time_noise is not None else None,
               report_runtime=rep.time_runtime, load_plan=load())
    fmt = torch.channels_last if rep.time_runtime and "channels_last" in rep.time_runtime else torch.contiguous_format
    before, after = model.to(memory_format=fmt), res.model.eval().to(memory_format=fmt)
    xf = x.contiguous(memory_format=fmt)
    c = compare(before, after, (xf,), reps=20, max_seconds=15.0, min_reps=8)
    row.update(eager=dict(before_ms=round(c.before_ms, 2), after_ms=round(c.after_ms, 2), ratio=round(c.ratio, 3),
                          noise=round(c.noise, 3), rounds=c.rounds, memory_format=str(fmt).split(".")[-1], load=load()))
    if ort:
        from dsrewrite.timing.runtimes import get_runtime

        rt = get_runtime("onnxruntime")
        try:
            fb, fa = rt.prepare(model, (x,)), rt.prepare(res.model, (x,))
            c = compare(fb, fa, (x,), reps=20, max_seconds=15.0, min_reps=8)
            row.update(onnxruntime=dict(before_ms=round(c.before_ms, 2), after_ms=round(c.after_ms, 2),
                                        ratio=round(c.ratio, 3), noise=round(c.noise, 3), rounds=c.rounds, load=load()))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row.update(onnxruntime=dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return row


# ---------------------------------------------------------------------------------------------- output
def _f(v: Optional[float], nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render(data: Dict[str, Any]) -> str:
    meta = data["meta"]
    out = ["# Reach: the share of work each layer kind holds, and how far a budget gets (issue 22)", "",
           f"- Date: {meta['date']}; machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, no GPU.",
           f"- Command: `{meta['command']}`",
           *[f"- Rows of {', '.join(u['models'])} replaced by `{u['command']}` ({u['date']})" for u in meta.get("updates", [])],
           "- timm models, random weights, eval mode; shares at 224x224, batch 1 (forward hooks on Conv/Linear modules "
           "against FlopCounterMode's total; 'other' is the rest that FlopCounterMode counts: matmuls outside "
           "modules. On the CPU it does not count scaled_dot_product_attention, so a ViT's attention is in no column "
           "and its linear share is of the counted work).",
           "- touchable: sum of the eligible layers' dense FLOPs / the model's, from the refusal of "
           "`target_flops=1e-6` with that `kinds`; smallest: the smallest reachable FLOPs ratio that refusal states "
           "(every eligible layer at its cheapest rank).", "",
           "## MAC shares by layer kind", "",
           "| model | GMACs | dense KxK | 1x1 | depthwise/grouped | linear | other |", "|---|---|---|---|---|---|---|"]
    for r in data["models"]:
        s = r["shares"]
        out.append(f"| {r['model']} | {r['total_gmacs']:.2f} | " + " | ".join(f"{s[k]:.3f}" for k in SHARES) + " |")
    kinds = [k for k in KINDS if any(k in r["reach"] for r in data["models"])]
    out += ["", "## What dsrewrite can touch, and the smallest reachable FLOPs ratio", "",
            "| model | " + " | ".join(f"touchable: {k}" for k in kinds) + " | " +
            " | ".join(f"smallest: {k}" for k in kinds) + " |", "|---|" + "---|" * (2 * len(kinds))]
    for r in data["models"]:
        g = r["reach"]
        out.append(f"| {r['model']} | " + " | ".join(_f(g.get(k, {}).get("touchable"), 3) for k in kinds) + " | " +
                   " | ".join(_f(g.get(k, {}).get("reachable"), 3) for k in kinds) + " |")
    errs = [(r["model"], k, g["error"]) for r in data["models"] for k, g in r["reach"].items() if g.get("error")]
    if errs:
        out += [""] + [f"- {m}, kinds={k}: {e}" for m, k, e in errs]
    lat = data.get("latency") or []
    if lat:
        lm = data.get("latency_setup", {})
        out += ["", f"## Measured time of `target_latency` plans (batch {lm.get('batch')}, {lm.get('size')}x{lm.get('size')}, eager)", "",
                "Planned and checked in eager by `rewrite`'s closed loop; time ratio < 1 is faster. 'report' is the "
                "rewrite's own side-by-side measurement, 'eager' / 'onnxruntime' are re-measured here (fastest of "
                "interleaved rounds, +- half the IQR of the per-round ratios); load = 1-minute load average.", "",
                "| model | kinds | target | FLOPs kept | pairs (kxk/1x1/linear) | report | eager | onnxruntime | load |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in lat:
            if r.get("refused"):
                out.append(f"| {r['model']} | {r['kinds']} | {r['target_latency']} | refused: {r['refused']} | | | | | {r.get('load')} |")
                continue
            e, o = r.get("eager", {}), r.get("onnxruntime", {})
            rw = r.get("rewritten", {})
            ort = (f"{o['ratio']:.2f} +- {o['noise']:.2f}" if "ratio" in o else (o.get("error", "-")[:60] if o else "-"))
            out.append(f"| {r['model']} | {r['kinds']} | {r['target_latency']} | {r['flops_ratio']:.2f} | "
                       f"{rw.get('kxk', 0)}/{rw.get('pointwise', 0)}/{rw.get('linear', 0)} | "
                       f"{_f(r.get('report_ratio'))} +- {_f(r.get('report_noise'))} | {e['ratio']:.2f} +- {e['noise']:.2f} | "
                       f"{ort} | {e.get('load')} |")
    if data.get("notes"):
        out += [""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated timm names (default: all of MODELS)")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)}, no latency")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="kinds= values whose reach is computed")
    p.add_argument("--latency-models", default=",".join(LATENCY_MODELS), help="'' for none")
    p.add_argument("--latency-targets", default="0.8", help="comma-separated target_latency values")
    p.add_argument("--latency-kinds", default="kxk,all")
    p.add_argument("--latency-size", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--onnxruntime", action="store_true", help="also time the plans in onnxruntime")
    p.add_argument("--json", default=os.path.join(HERE, "reach.json"))
    p.add_argument("--md", default=os.path.join(HERE, "reach.md"))
    p.add_argument("--render", default=None, help="rewrite the Markdown from this JSON and exit")
    p.add_argument("--update", action="store_true", help="replace the rows of --models in the existing --json (its "
                   "other rows and latency kept; the command is added to meta.updates)")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            data = json.load(f)
        with open(a.md, "w") as f:
            f.write(render(data))
        return
    torch.set_num_threads(THREADS)
    names = QUICK if a.quick and not a.models else tuple(a.models.split(",")) if a.models else MODELS
    lat_names = () if a.quick else tuple(n for n in a.latency_models.split(",") if n)
    rows, lat = [], []
    for name in names:
        torch.manual_seed(0)
        model = build(name)
        x = torch.randn(1, 3, 224, 224)
        row = dict(model=name, **mac_shares(model, x))
        row["reach"] = {k: reach(model, x, k) for k in a.kinds.split(",")}
        log(f"{name}: shares {row['shares']}, reachable kxk {row['reach']['kxk'].get('reachable')} "
            f"all {row['reach']['all'].get('reachable')}")
        rows.append(row)
    for name in lat_names:
        for t in (float(v) for v in a.latency_targets.split(",")):
            for kinds in a.latency_kinds.split(","):
                r = latency_row(name, kinds, t, a.latency_size, a.batch, a.onnxruntime)
                log(f"latency {name} {kinds} {t}: {r.get('refused') or (r.get('eager'), r.get('onnxruntime'))}")
                lat.append(r)
    from _meta import write_json  # benchmarks/ is the script's folder

    notes = []
    if lat_names:
        notes.append(f"Latency rows at {a.latency_size}x{a.latency_size}, batch {a.batch}, for {len(lat_names)} models only: "
                     "full-size runs of every model do not fit 2 cores' time.")
    payload = dict(models=rows, latency=lat, latency_setup=dict(size=a.latency_size, batch=a.batch),
                   loadavg_end=list(os.getloadavg()), notes=notes)
    if a.update:
        with open(a.json) as f:
            old = json.load(f)
        write_json(a.json + ".tmp", "reach.py", argv, **payload)
        with open(a.json + ".tmp") as f:
            new = json.load(f)
        os.remove(a.json + ".tmp")
        mine = {r["model"] for r in rows}
        old["models"] = [r if r["model"] not in mine else next(n for n in rows if n["model"] == r["model"])
                         for r in old["models"]] + [r for r in rows if r["model"] not in {o["model"] for o in old["models"]}]
        old["latency"] = old.get("latency", []) + lat
        old["meta"].setdefault("updates", []).append(dict(new["meta"], models=sorted(mine),
                                                          loadavg_end=payload["loadavg_end"]))
        data = old
        with open(a.json, "w") as f:
            json.dump(data, f, indent=1)
    else:
        write_json(a.json, "reach.py", argv, **payload)
        with open(a.json) as f:
            data = json.load(f)
    with open(a.md, "w") as f:
        f.write(render(data))
    log(f"wrote {a.json} and {a.md}")


if __name__ == "__main__":
    main()
