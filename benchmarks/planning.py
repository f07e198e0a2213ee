"""Planning benchmark: rank allocation and data-aware initialisation vs uniform rank and tensorly-torch CP.

Part 1 (digits CNN, trained here in a few seconds on sklearn's bundled digits): test accuracy and logit error
vs FLOPs for uniform rank (plain SVD), plain-SVD allocation (target_flops), data-aware allocation
(target_flops + calibration), each also with ragged per-channel ranks (ragged=True), and tensorly-torch CP
(`FactorizedConv.from_conv`, factorized) at equal FLOPs.
Part 2 (a real pretrained CNN shipped inside a wheel: facenet-pytorch's MTCNN ONet, `--facenet-wheel`):
output error and decision agreement vs FLOPs on crops of sklearn's bundled sample images.
Part 3: measured CPU latency of FLOP-aware vs latency-aware plans at the same budget (resnet18), and of the
latency-aware plan with every pair in the grouped depthwise form (what the per-layer choice of form adds).

Usage: python benchmarks/planning.py [--quick] [--facenet-wheel PATH.whl] [--out benchmarks/planning.json]
"""
from __future__ import annotations

import argparse
import copy
import warnings
import json
import math
import os
import sys
import tempfile
import time
import zipfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dsrewrite  # noqa: E402
from dsrewrite.timing.layers import to_format  # noqa: E402
from dsrewrite.timing.measure import time_side_by_side  # noqa: E402


def flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return int(c.get_total_flops())


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------- models
def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1300], perm[1300:]
    return x[tr], y[tr], x[te], y[te]


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def train(model, x, y, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------------- CP baseline
def cp_model(model: nn.Module, x: torch.Tensor, target: float, total: int):
    """tensorly-torch CP on every conv with Cin > 1, per-layer ranks scaled so the model's FLOPs ~= target."""
    import tltorch

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.shape)) for n, m in convs]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    dense = {n: 2 * m.in_channels * m.out_channels * math.prod(m.kernel_size) * math.prod(outs[n][2:])
             for n, m in convs}
    per_rank = {n: 2 * (m.in_channels + sum(m.kernel_size) + m.out_channels) * math.prod(outs[n][2:])
                for n, m in convs}  # approximate CP FLOPs per rank unit (input-resolution 1x1 counted at output)
    fixed = total / x.shape[0] - sum(dense.values())

    def ranks(alpha):
        return {n: max(1, int(alpha * dense[n] / per_rank[n])) for n, _ in convs}

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if fixed + sum(ranks(mid)[n] * per_rank[n] for n, _ in convs) <= target * total / x.shape[0]:
            lo = mid
        else:
            hi = mid
    rk = ranks(lo)
    cp = copy.deepcopy(model)
    torch.manual_seed(0)
    for n, m in convs:
        fc = tltorch.FactorizedConv.from_conv(m, rank=rk[n], factorization="cp", implementation="factorized")
        parent, _, attr = n.rpartition(".")
        setattr(cp.get_submodule(parent) if parent else cp, attr, fc)
    return cp.eval()


# ---------------------------------------------------------------------------------------------- part 1
def uniform_for(model, x, target, ragged: bool = False):
    best = None
    for r in range(1, 10):
        res = dsrewrite.rewrite(model, x, rank=r, measure_time=False, ragged=ragged)
        if res.report.flops_ratio <= target:
            best = res
    return best


def part_digits(quick: bool):
    xtr, ytr, xte, yte = digits_data()
    torch.manual_seed(0)
    model = digits_cnn()
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs=15 if quick else 30)
    train_s = time.perf_counter() - t0
    x1 = xte[:1]
    total = flops(model, xte)
    with torch.no_grad():
        ref = model(xte)
    acc0 = float((ref.argmax(1) == yte).float().mean())
    cal = xtr[:256]
    rows = []
    for target in ((0.3, 0.5) if quick else (0.25, 0.35, 0.5, 0.7)):
        cands = {
            "uniform rank (plain SVD)": uniform_for(model, x1, target),
            "uniform rank + calibration": None,
            "uniform rank, ragged": uniform_for(model, x1, target, ragged=True),
            "plain SVD allocation": dsrewrite.rewrite(model, x1, target_flops=target, measure_time=False),
            "plain SVD allocation, ragged": dsrewrite.rewrite(model, x1, target_flops=target, ragged=True,
                                                              measure_time=False),
            "data-aware allocation + init": dsrewrite.rewrite(model, x1, target_flops=target, calibration=cal,
                                                              measure_time=False),
            "data-aware allocation + init, ragged": dsrewrite.rewrite(model, x1, target_flops=target, calibration=cal,
                                                                      ragged=True, measure_time=False),
        }
        u = cands["uniform rank (plain SVD)"]
        if u is not None:
            r = u.report.rewritten[0].rank
            cands["uniform rank + calibration"] = dsrewrite.rewrite(model, x1, rank=r, calibration=cal,
                                                                    measure_time=False)
        models = {k: (v.model if v is not None else None) for k, v in cands.items()}
        try:
            models["tensorly-torch CP"] = cp_model(model, xte, target, total)
        except Exception as e:  # noqa: BLE001
            print("tltorch CP failed:", e)
        for name, m in models.items():
            if m is None:
                continue
            with torch.no_grad():
                out = m(xte)
            rows.append(dict(target=target, method=name, flops_ratio=flops(m, xte) / total,
                             params=sum(p.numel() for p in m.parameters()),
                             accuracy=float((out.argmax(1) == yte).float().mean()), logit_error=rel(out, ref),
                             ranks=[L.rank for L in cands[name].report.layers] if name in cands and cands[name] else None))
    return dict(accuracy_original=acc0, train_seconds=train_s, params_original=sum(p.numel() for p in model.parameters()),
                test_images=len(xte), calibration_images=len(cal), rows=rows)


# ---------------------------------------------------------------------------------------------- part 2
def onet_from_wheel(wheel: str):
    d = tempfile.mkdtemp(prefix="facenet_")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(d)
    sys.path.insert(0, d)
    from facenet_pytorch.models.mtcnn import ONet

    return ONet(pretrained=True).eval()


def sample_crops(n: int, seed: int, size: int = 48):
    from sklearn.datasets import load_sample_images

    imgs = [torch.tensor(im, dtype=torch.float32).permute(2, 0, 1) for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        s = int(torch.randint(40, 200, (1,), generator=g))
        y0 = int(torch.randint(0, im.shape[1] - s, (1,), generator=g))
        x0 = int(torch.randint(0, im.shape[2] - s, (1,), generator=g))
        crop = im[:, y0:y0 + s, x0:x0 + s][None]
        out.append(F.interpolate(crop, size=(size, size), mode="area"))
    return (torch.cat(out) - 127.5) * 0.0078125  # MTCNN's normalisation


def part_onet(wheel: str, quick: bool):
    model = onet_from_wheel(wheel)
    cal, test = sample_crops(128, 0), sample_crops(256 if not quick else 128, 1)
    total = flops(model, test)
    with torch.no_grad():
        ref = model(test)

    def metrics(m):
        with torch.no_grad():
            out = m(test)
        return dict(box_error=rel(out[0], ref[0]), landmark_error=rel(out[1], ref[1]),
                    prob_error=rel(out[2], ref[2]),
                    agreement=float((out[2].argmax(1) == ref[2].argmax(1)).float().mean()))

    rows = []
    for target in ((0.5,) if quick else (0.4, 0.5, 0.7)):
        runs = {
            "uniform rank (plain SVD)": uniform_for(model, test[:1], target),
            "uniform rank, ragged": uniform_for(model, test[:1], target, ragged=True),
            "plain SVD allocation": dsrewrite.rewrite(model, test[:1], target_flops=target, measure_time=False),
            "plain SVD allocation, ragged": dsrewrite.rewrite(model, test[:1], target_flops=target, ragged=True,
                                                              measure_time=False),
            "data-aware allocation + init": dsrewrite.rewrite(model, test[:1], target_flops=target, calibration=cal,
                                                              measure_time=False),
            "data-aware allocation + init, ragged": dsrewrite.rewrite(model, test[:1], target_flops=target,
                                                                      calibration=cal, ragged=True, measure_time=False),
        }
        models = {k: v.model for k, v in runs.items() if v is not None}
        try:
            models["tensorly-torch CP"] = cp_model(model, test, target, total)
        except Exception as e:  # noqa: BLE001
            print("tltorch CP failed on ONet:", e)
        for name, m in models.items():
            rows.append(dict(target=target, method=name, flops_ratio=flops(m, test) / total, **metrics(m)))
    return dict(model="facenet-pytorch MTCNN ONet (weights inside the wheel)", test_crops=len(test),
                calibration_crops=len(cal), rows=rows)


# ---------------------------------------------------------------------------------------------- part 3
def part_latency(quick: bool):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(4, 3, 112, 112) if not quick else torch.randn(2, 3, 64, 64)

    total = flops(model, x)
    rows = [dict(plan="original", target=None, flops_ratio=1.0, rewritten=0, model=model)]
    for target in ((0.7,) if quick else (0.6, 0.8)):
        t0 = time.perf_counter()
        fl = dsrewrite.rewrite(model, x, target_flops=target, measure_time=False)
        fl_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            la = dsrewrite.rewrite(model, x, target_latency=target, measure_time=False)
            la_target = target
        except dsrewrite.DsrewriteError as e:  # report it, then plan at the smallest reachable time
            import re

            least = float(re.search(r"smallest reachable is ([0-9.]+)", str(e)).group(1))
            rows.append(dict(plan="latency-aware (target_latency)", target=target, refused=str(e)))
            la_target = min(1.0, least + 0.01)
            la = dsrewrite.rewrite(model, x, target_latency=la_target, measure_time=False)
        la_s = time.perf_counter() - t0
        # the same latency-aware plan with every pair in the grouped depthwise form: what the planner's
        # per-layer choice of form (gather_input) adds
        grouped = copy.deepcopy(la.model)
        for m in grouped.modules():
            if isinstance(m, dsrewrite.SeparableConv2d):
                m.gather_input = False
        for name, m, r, secs, tg in (("FLOP-aware (target_flops)", fl.model, fl, fl_s, target),
                                     ("latency-aware (target_latency)", la.model, la, la_s, la_target),
                                     ("latency-aware, every pair grouped", grouped, la, None, la_target)):
            rows.append(dict(plan=name, target=tg, flops_ratio=flops(m, x) / total,
                             rewritten=len(r.report.rewritten), plan_seconds=secs,
                             gathered=sum(getattr(mod, "gather_input", False) for mod in m.modules()),
                             notes=[n for n in r.report.notes if "latency" in n], model=m))
    # every model timed side by side (in turn in each of 15 rounds; the fastest kept), in both memory formats
    timed = [r for r in rows if "model" in r]
    for fmt in ("contiguous", "channels_last"):
        fns = [to_format(r["model"], (x,), fmt) for r in timed]
        ms = time_side_by_side([m for m, _ in fns], fns[0][1], reps=15, warmup=3, max_seconds=120.0)
        for r, t in zip(timed, ms):
            r[f"{fmt}_ms"] = t
    for r in timed:
        del r["model"]
    return dict(model="torchvision resnet18 (random weights)", input=list(x.shape), threads=torch.get_num_threads(),
                rows=rows)


# ---------------------------------------------------------------------------------------------- output
def markdown(res) -> str:
    lines = []
    d = res["digits"]
    lines += [f"### Digits CNN (original test accuracy {100 * d['accuracy_original']:.1f}%, "
              f"{d['test_images']} test images, {d['calibration_images']} calibration images, "
              f"trained in {d['train_seconds']:.1f} s)", "",
              "| FLOPs target | method | FLOPs kept (measured) | accuracy | logit rel. error |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['target']:.2f} | {r['method']} | {r['flops_ratio']:.3f} | {100 * r['accuracy']:.1f}% "
                     f"| {r['logit_error']:.3f} |")
    if res.get("onet"):
        o = res["onet"]
        lines += ["", f"### {o['model']}: {o['test_crops']} crops of sklearn sample images, "
                      f"{o['calibration_crops']} other crops for calibration", "",
                  "| FLOPs target | method | FLOPs kept | box err | landmark err | face-prob err | decision agreement |",
                  "|---|---|---|---|---|---|---|"]
        for r in o["rows"]:
            lines.append(f"| {r['target']:.2f} | {r['method']} | {r['flops_ratio']:.3f} | {r['box_error']:.3f} | "
                         f"{r['landmark_error']:.3f} | {r['prob_error']:.3f} | {100 * r['agreement']:.1f}% |")
    L = res["latency"]
    lines += ["", f"### CPU latency, {L['model']}, input {L['input']}, {L['threads']} threads (fastest of 15 rounds, "
                        "all plans in turn in each round)", "",
              "| plan | target | FLOPs kept | convs rewritten | pairs gathered | NCHW ms | channels_last ms | planning s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in L["rows"]:
        tgt = "-" if r["target"] is None else f"{r['target']:.2f}"
        if "refused" in r:
            lines.append(f"| {r['plan']} | {tgt} | refused: {r['refused']} | | | | | |")
            continue
        secs = "-" if r.get("plan_seconds") is None else f"{r['plan_seconds']:.1f}"
        lines.append(f"| {r['plan']} | {tgt} | {r['flops_ratio']:.3f} | {r['rewritten']} | {r.get('gathered', 0)} | "
                     f"{r['contiguous_ms']:.2f} | {r['channels_last_ms']:.2f} | {secs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--facenet-wheel", help="path to a facenet_pytorch wheel (MTCNN weights are inside it)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the tables as Markdown here")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", module="tensorly")
    t0 = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    res["digits"] = part_digits(a.quick)
    print(f"digits done ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["onet"] = part_onet(a.facenet_wheel, a.quick) if a.facenet_wheel else None
    print(f"onet done ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["latency"] = part_latency(a.quick)
    res["seconds"] = time.perf_counter() - t0
    md = markdown(res)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    print(f"total {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
