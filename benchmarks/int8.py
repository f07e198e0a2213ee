"""Int8 after dsrewrite (issue 25): original vs rewritten models, in float and through onnxruntime static
quantization, with the int8 model's onnxruntime latency.

Models (all on the ONNX route, ``dsrewrite.onnx.rewrite``):

- ``ppocr``: RapidOCR's PP-OCRv4 recogniser (real weights, opset 12, weights in ``Constant`` nodes), rewritten at
  ``rank=4`` (KxK convs); metric: CER on held-out rendered lines against the original float model's text (and
  against the rendered text), data and scoring from ``benchmarks/onnx_calibration.py``;
- ``digits``: the digits CNN of ``dsrewrite demo`` (trained here with a fixed seed, ``benchmarks/pareto.py``'s
  ``digits_task``), exported to ONNX (opset 17, batch axis dynamic), ``rank=4``; metric: test accuracy (360 images);
- ``onet``: facenet-pytorch's MTCNN ONet with its real weights (``pareto.py``'s ``onet_task``), exported the same
  way, ``rank=4``; metric: box error (relative Frobenius error of the box regression) against the original float
  model on 256 crops.

Variants per model: the original; rewritten ``plain`` (SVD) and ``calibrated`` (``calibration=``: 32 rendered
lines / 512 training images / 128 crops), each without and with ``int8_friendly=True`` (balanced scales). Each is
scored in float and after ``dsrewrite.onnx.quantize.quantize_static`` (onnxruntime ``quantize_static``: QDQ,
int8 weights per channel, uint8 activations, MinMax ranges from 16 calibration feeds, the model as it is: no
pre-processing, no excluded nodes; ``--per-tensor`` adds per-tensor weights, ``--percentile`` the Percentile
method).

The wrapper first writes each depthwise conv with several filters per channel as a ``Gather`` and one filter per
channel (``gather_depthwise=True``: onnxruntime's int8 depthwise kernel takes only that form); each rewritten
variant is also timed quantized as written (``gather_depthwise=False``).

Time: each int8 model against the original int8 model in onnxruntime (2 intra-op threads, default graph
optimisations), side by side in interleaved rounds (``dsrewrite.timing.measure.compare``: fastest of each; the ratio's
noise is half the IQR of the per-round ratios), on the timing input (ppocr 1x3x48x320, digits the 360 test images,
onet 256 crops); the 1-minute load average is recorded with each timing (2 shared cores: not precise under load).

    python benchmarks/int8.py --per-tensor --percentile --json benchmarks/int8.json --markdown benchmarks/int8.md
    python benchmarks/int8.py --models digits,onet --pt2e --skip-onnx --json benchmarks/int8_pt2e.json \\
        --markdown benchmarks/int8_pt2e.md                         # the PyTorch models through PT2E
    python benchmarks/int8.py --models digits --eval-lines 20      # smoke
    python benchmarks/int8.py --render benchmarks/int8.json --markdown benchmarks/int8.md
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

THREADS = 2
QUANT_FEEDS = 16
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Task:
    """One model: its ONNX file, rewrite options, calibration data, the quantizer's feeds, scoring and timing."""

    def __init__(self, name: str, path: str, rewrite_kw: Dict[str, Any], calibration: Any, quant_feeds: List[dict],
                 evaluate: Callable[[str], Dict[str, Any]], metric: str, timing_feed: Dict[str, np.ndarray],
                 error_feeds: List[dict], info: Dict[str, Any]) -> None:
        self.name, self.path, self.rewrite_kw, self.calibration = name, path, rewrite_kw, calibration
        self.quant_feeds, self.evaluate, self.metric, self.timing_feed, self.info = (quant_feeds, evaluate, metric,
                                                                                      timing_feed, info)
        self.error_feeds = error_feeds  # held-out inputs on which an int8 model's output is compared with its float
        self.torch = None  # benchmarks/pareto.py's Task of the PyTorch model (digits, onet): the PT2E rows


def _export(model, x, path: str, outputs: Sequence[str]) -> str:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=list(outputs), dynamic_axes={"x": {0: "n"}, **{o: {0: "n"} for o in outputs}})
    return path


def _session(path: str):
    from dsrewrite.onnx.measure import session

    return session(path, THREADS)


def digits(tmp: str, a: argparse.Namespace) -> Task:
    from pareto import digits_task

    from dsrewrite.demo import load_digits_data

    t = digits_task(quick=False, epochs=0, seed=a.seed)  # trains the model (its own scoring is of torch models)

    x_tr, y_tr, x_te, y_te = load_digits_data(a.seed)
    path = _export(t.model, x_te[:2], os.path.join(tmp, "digits.onnx"), ["logits"])
    labels = y_te.numpy()

    def evaluate(p: str) -> Dict[str, Any]:
        out = _session(p).run(None, {"x": x_te.numpy()})[0]
        return dict(accuracy=100.0 * float((out.argmax(1) == labels).mean()))

    cal = x_tr[:512].numpy()
    quant = [{"x": x_tr[512 + 32 * i: 512 + 32 * (i + 1)].numpy()} for i in range(QUANT_FEEDS)]
    task = Task("digits", path, dict(rank=4), cal, quant, evaluate, "accuracy", {"x": x_te.numpy()},
                [{"x": x_te.numpy()}], dict(model="digits CNN (dsrewrite.demo.DigitsCNN), trained here",
                                            test_images=len(x_te), calibration_images=len(cal),
                                            quant_feeds=f"{QUANT_FEEDS} x 32 other training images"))
    task.torch = t
    return task


def onet(tmp: str, a: argparse.Namespace) -> Task:
    from pareto import onet_task
    from planning import sample_crops

    t = onet_task(a.facenet_wheel, quick=True, epochs=0)
    test = t.x.numpy()
    path = _export(t.model, t.x[:2], os.path.join(tmp, "onet.onnx"), ["box", "landmarks", "prob"])
    ref = _session(path).run(None, {"x": test})

    def evaluate(p: str) -> Dict[str, Any]:
        out = _session(p).run(None, {"x": test})
        rel = lambda u, v: float(np.linalg.norm(u - v) / np.linalg.norm(v))  # noqa: E731
        return dict(box_error=rel(out[0], ref[0]), landmark_error=rel(out[1], ref[1]),
                    agreement=100.0 * float((out[2].argmax(1) == ref[2].argmax(1)).mean()))

    cal = t.calibration.numpy()
    other = sample_crops(8 * QUANT_FEEDS, 5).numpy()
    quant = [{"x": other[8 * i: 8 * (i + 1)]} for i in range(QUANT_FEEDS)]
    task = Task("onet", path, dict(rank=4), cal, quant, evaluate, "box_error", {"x": test}, [{"x": test}],
                dict(model="facenet-pytorch MTCNN ONet (weights from the wheel)", test_crops=len(test),
                     calibration_crops=len(cal), quant_feeds=f"{QUANT_FEEDS} x 8 other crops"))
    task.torch = t
    return task


def ppocr(tmp: str, a: argparse.Namespace) -> Task:
    from onnx_calibration import eval_rec, fidelity, find_models, fonts, make_data, make_ocr, rec_feeds, score

    class Src:
        wheel, models_dir = a.wheel, a.models_dir

    models = find_models(Src, tmp)
    font_paths = fonts()
    calib, _ = make_data(a.seed, 0, a.calib_lines, 0, 6, (480, 800), font_paths)
    held, _ = make_data(a.seed, 1, a.eval_lines, 0, 6, (480, 800), font_paths)
    base = make_ocr(models)
    original = eval_rec(base, held)["hyps"]

    def evaluate(p: str) -> Dict[str, Any]:
        hyps = eval_rec(make_ocr(models, rec=p), held)["hyps"]
        truth = score(list(zip(hyps, [t for _, t in held])))
        return dict(cer_vs_original=100.0 * fidelity(hyps, original), cer=100.0 * truth["cer"],
                    exact=100.0 * truth["exact"])

    feeds = rec_feeds(base, calib, 8)
    quant = rec_feeds(base, calib[:QUANT_FEEDS], 1)
    shape = (1, *base.text_rec.rec_image_shape)
    timing = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return Task("ppocr", models["rec"], dict(rank=4, input_shapes={"x": shape}), feeds, quant, evaluate,
                "cer_vs_original", timing, rec_feeds(base, held[:32], 8), dict(model="RapidOCR PP-OCRv4 recogniser (ch_PP-OCRv4_rec_infer.onnx)", calib_lines=len(calib),
                     eval_lines=len(held), quant_feeds=f"{QUANT_FEEDS} calibration lines, one per feed"))


TASKS = {"ppocr": ppocr, "digits": digits, "onet": onet}


def quantize(task: Task, src: str, dst: str, **kw: Any) -> Optional[str]:
    """``src`` through onnxruntime static quantization; the error's first line instead when it fails."""
    from dsrewrite.onnx.quantize import quantize_static

    try:
        quantize_static(src, dst, task.quant_feeds, **kw)
        _session(dst)  # loads
        return None
    except Exception as e:  # noqa: BLE001 - a failure is a result
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def time_pair(before: str, after: str, feed: Dict[str, np.ndarray]) -> Dict[str, Any]:
    from dsrewrite.timing.measure import compare

    s0, s1 = _session(before), _session(after)
    c = compare(lambda: s0.run(None, feed), lambda: s1.run(None, feed), (), reps=20, max_seconds=8.0, min_reps=8)
    return dict(ms_before=round(c.before_ms, 3), ms_after=round(c.after_ms, 3), ratio=round(c.ratio, 3),
                noise=round(c.noise, 3), load=load())


PAIR_NODES = ("_depthwise", "_pointwise", "_reduce", "_expand")  # the names the ONNX backend gives a pair's nodes


def output_error(task: Task, float_path: str, int8_path: str) -> float:
    """Relative error of the int8 model's first output against its own float model's, over ``error_feeds``."""
    s0, s1 = _session(float_path), _session(int8_path)
    num = den = 0.0
    for f in task.error_feeds:
        y0 = s0.run(None, f)[0].astype(np.float64)
        y1 = s1.run(None, f)[0].astype(np.float64)
        num, den = num + float(((y1 - y0) ** 2).sum()), den + float((y0 ** 2).sum())
    return math.sqrt(num / den)


def run_task(task: Task, tmp: str, a: argparse.Namespace) -> List[Dict[str, Any]]:
    import onnx

    import dsrewrite.onnx as ds_onnx

    quant_modes = [("int8", {})]
    if a.per_tensor:
        quant_modes.append(("int8 per-tensor", dict(per_channel=False)))
    if a.percentile:
        quant_modes.append(("int8 percentile", dict(calibrate_method="percentile")))
    rows: List[Dict[str, Any]] = []
    variants = [("original", None, False)] + [(f"{c}{' balanced' if b else ''}", c, b)
                                              for c in ("plain", "calibrated") for b in (False, True)]
    orig_int8 = None
    for label, mode, bal in variants:
        row: Dict[str, Any] = dict(model=task.name, variant=label)
        stem = os.path.join(tmp, f"{task.name}_{mode or 'original'}_{int(bal)}")
        path = task.path if mode is None else stem + ".onnx"
        if mode is not None:
            t0 = time.perf_counter()
            _, rep = ds_onnx.rewrite(task.path, path, progress=False, measure_time=False, int8_friendly=bal,
                                     calibration=task.calibration if mode == "calibrated" else None, **task.rewrite_kw)
            row.update(rewrite_s=round(time.perf_counter() - t0, 1), layers=len(rep.rewritten),
                       flops=round(rep.flops_ratio, 4), notes=[n for n in rep.notes if "opset" in n or "int8" in n])
        row["float"] = task.evaluate(path)
        pairs = [n.name for n in onnx.load(path).graph.node if n.name.endswith(PAIR_NODES)]
        for qname, kw in quant_modes:
            qpath = f"{stem}_{qname.replace(' ', '_')}.onnx"
            err = quantize(task, path, qpath, **kw)
            if err:
                row[qname] = dict(error=err)
                continue
            row[qname] = dict(task.evaluate(qpath), output_error=output_error(task, path, qpath))
            if pairs:  # the pairs alone in int8 (the rest of the model float): what balancing can change
                only = f"{stem}_pairs.onnx"
                err = quantize(task, path, only, nodes_to_quantize=pairs, **kw)
                row[qname]["pairs_output_error"] = err or output_error(task, path, only)
            if qname == "int8":
                if mode is None:
                    orig_int8 = qpath
                if not a.no_time and orig_int8:
                    row[qname]["time"] = time_pair(orig_int8, qpath, task.timing_feed)
                if not a.no_time and mode is not None and not bal:  # onnxruntime's quantizer on the pairs as written
                    as_written = f"{stem}_as_written.onnx"
                    err = quantize(task, path, as_written, gather_depthwise=False, **kw)
                    row[qname]["time_as_written"] = (dict(error=err) if err else
                                                     time_pair(orig_int8, as_written, task.timing_feed))
        log(f"{task.name} {label}: float {row['float']}, " + ", ".join(f"{q}: {row[q]}" for q, _ in quant_modes))
        rows.append(row)
    return rows


class _Frozen(__import__("torch").nn.Module):
    """A PT2E-converted model behind a module whose ``eval()`` does not reach it (exported models refuse
    ``eval()``; they are in eval mode already)."""

    def __init__(self, converted) -> None:
        super().__init__()
        object.__setattr__(self, "converted", converted)

    def forward(self, x):
        return self.converted(x)


def run_pt2e(task: Task) -> List[Dict[str, Any]]:
    """The PyTorch model (digits, onet) rewritten on the torch route and quantized by PT2E with the X86 Inductor
    quantizer (``dsrewrite.backends.int8.quantize_pt2e``, ranges from the same feeds as onnxruntime's), scored in eager."""
    import torch

    import dsrewrite
    from dsrewrite.backends.int8 import quantize_pt2e

    t = task.torch
    example = t.x[:8]
    batches = [torch.from_numpy(f["x"]) for f in task.quant_feeds]
    rows = []
    for mode, bal in [(None, False)] + [(c, b) for c in ("plain", "calibrated") for b in (False, True)]:
        label = "original" if mode is None else f"{mode}{' balanced' if bal else ''}"
        model = t.model
        if mode is not None:
            model = dsrewrite.rewrite(t.model, example, rank=4, measure_time=False, int8_friendly=bal,
                                      calibration=torch.from_numpy(task.calibration) if mode == "calibrated" else None
                                      ).model
        row = dict(model=task.name, variant=label, float=t.evaluate(model))
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantize_pt2e(model, example, calibration=batches)
            row["pt2e"] = dict(t.evaluate(_Frozen(q)), seconds=round(time.perf_counter() - t0, 1))
        except Exception as e:  # noqa: BLE001 - a failure is a result
            row["pt2e"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        log(f"{task.name} PT2E {label}: {row}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ output
def _m(d: Dict[str, Any], metric: str) -> str:
    if "error" in d:
        return "fails: " + d["error"][:80]
    v = d.get(metric)
    if v is None:
        return "-"
    if isinstance(v, str):
        return "fails: " + v[:80]
    return f"{v:.4f}" if metric in ("box_error", "output_error", "pairs_output_error") else f"{v:.2f}"


METRICS = {"ppocr": ("cer_vs_original", "CER % vs the original float model's text"),
           "digits": ("accuracy", "accuracy %"), "onet": ("box_error", "box error vs the original float model")}


def markdown(data: Dict[str, Any]) -> str:
    m = data["meta"]
    out = ["# Int8 after dsrewrite (issue 25): onnxruntime static quantization of original and rewritten models", "",
           f"- Date: {m['date']}; machine: {m['machine']}, torch {m['torch']}, onnxruntime {data['onnxruntime']} "
           f"({THREADS} intra-op threads); no GPU.",
           f"- Command: `{m['command']}` (wall {data['total_s'] / 60:.1f} min; 1-minute load average at start / end "
           f"{data['loadavg_start'][0]} / {data['loadavg_end'][0]}; the 2 cores are shared, so times are indicative)."]
    if data["rows"]:
        out += [
           "- int8: `dsrewrite.onnx.quantize.quantize_static` = onnxruntime `quantize_static` on the model as it is "
           "(no pre-processing, no excluded nodes): QDQ, int8 weights per channel, uint8 activations, MinMax ranges "
           f"over {QUANT_FEEDS} feeds; `per-tensor`: int8 weights per tensor; `percentile`: Percentile ranges.",
           "- int8 output error: relative error of the int8 model's first output against the same model in float, on "
           "held-out inputs; pairs only: the same with only the pairs' nodes quantized (what `int8_friendly` can "
           "change).",
           "- time: the int8 model against the original int8 model, side by side in onnxruntime (fastest of interleaved "
           "rounds); ratio +- half the IQR of the per-round ratios; load: 1-minute load average then. The wrapper "
           "writes a pair's depthwise conv as a Gather and one filter per channel before quantizing "
           "(`gather_depthwise=True`, the default); `as written`: the ratio with the depthwise conv quantized as "
           "the rewrite wrote it (several filters per channel, onnxruntime's slow int8 path)."]
    out.append("")
    for name, info in data["tasks"].items():
        out.append(f"- {name}: " + "; ".join(f"{k}: {v}" for k, v in info.items()))
    out.append("")
    extra = [k for k in ("int8 per-tensor", "int8 percentile") if any(k in r for r in data["rows"])]
    for name in data["tasks"]:
        rows = [r for r in data["rows"] if r["model"] == name]
        if not rows:
            continue
        metric, words = METRICS[name]
        out += [f"## {name}: {words}", "",
                "| variant | FLOPs | float | int8 | int8 output error | pairs only | "
                + "".join(f"{k} | {k} output error | " for k in extra)
                + "int8 ms (original int8 ms) | ratio (as written) | load |",
                "|---|---|---|---|---|---|" + "---|---|" * len(extra) + "---|---|---|"]
        for r in rows:
            q = r.get("int8", {})
            t = q.get("time") or {}
            ms = f"{t['ms_after']:.2f} ({t['ms_before']:.2f})" if t else "-"
            ratio = f"{t['ratio']:.2f} +- {t['noise']:.2f}" if t else "-"
            w = q.get("time_as_written") or {}
            if "ratio" in w:
                ratio += f" ({w['ratio']:.2f} +- {w['noise']:.2f})"
            cells = [r["variant"], f"{r.get('flops', 1.0):.4f}", _m(r["float"], metric), _m(q, metric),
                     _m(q, "output_error"), _m(q, "pairs_output_error")]
            for k in extra:
                cells += [_m(r.get(k, {}), metric), _m(r.get(k, {}), "output_error")]
            out.append("| " + " | ".join(cells + [ms, ratio, str(t.get("load", "-"))]) + " |")
        if name == "ppocr":
            out += ["", "CER % against the rendered text (float / int8): " + "; ".join(
                f"{r['variant']} {_m(r['float'], 'cer')} / {_m(r.get('int8', {}), 'cer')}" for r in rows) + "."]
        notes = sorted({n for r in rows for n in r.get("notes", [])})
        if notes:
            out += [""] + [f"- report note: {n}" for n in notes]
        out.append("")
    if data.get("pt2e_rows"):
        out += ["## PT2E (PyTorch models, torch route): X86 Inductor quantizer, scored in eager", "",
                "`dsrewrite.rewrite(model, x, rank=4, ...)` then `dsrewrite.backends.int8.quantize_pt2e` (strict `torch.export`, "
                "`prepare_pt2e` with `X86InductorQuantizer`'s default static config, ranges from the same "
                f"{QUANT_FEEDS} feeds as onnxruntime's, `convert_pt2e`); no timing (the converted model is run in "
                "eager, as quantize/dequantize ops; Inductor lowers it to int8 kernels).", "",
                "| model | variant | float | PT2E int8 |", "|---|---|---|---|"]
        for r in data["pt2e_rows"]:
            metric = METRICS[r["model"]][0]
            out.append(f"| {r['model']} ({METRICS[r['model']][1]}) | {r['variant']} | {_m(r['float'], metric)} | "
                       f"{_m(r['pt2e'], metric)} |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocr,digits,onet")
    ap.add_argument("--wheel", help="the rapidocr_onnxruntime wheel to take the .onnx files from")
    ap.add_argument("--models-dir", help="a folder holding the PP-OCRv4 .onnx files")
    ap.add_argument("--facenet-wheel", default=next(iter(sorted(
        __import__("glob").glob("/tmp/wheels/facenet_pytorch-*.whl"))), None))
    ap.add_argument("--calib-lines", type=int, default=32)
    ap.add_argument("--eval-lines", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-tensor", action="store_true")
    ap.add_argument("--percentile", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--pt2e", action="store_true", help="also the PyTorch models (digits, onet) through PT2E")
    ap.add_argument("--skip-onnx", action="store_true", help="only the PT2E rows")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--render", metavar="JSON", help="only write the Markdown of a run's JSON (runs nothing)")
    a = ap.parse_args(argv)
    if a.render:
        import json

        with open(a.render) as f:
            md = markdown(json.load(f))
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(md)
        print(md)
        return 0

    import logging

    import onnxruntime
    import torch

    torch.set_num_threads(THREADS)
    onnxruntime.set_default_logger_severity(3)
    logging.disable(logging.WARNING)  # the quantizer's advice to pre-process, on every call
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    rows: List[Dict[str, Any]] = []
    pt2e_rows: List[Dict[str, Any]] = []
    infos: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            task = TASKS[name](tmp, a)
            infos[name] = task.info
            log(f"{name}: {task.info}")
            if not a.skip_onnx:
                rows += run_task(task, tmp, a)
            if a.pt2e and task.torch is not None:
                pt2e_rows += run_pt2e(task)
    data = dict(onnxruntime=onnxruntime.__version__, tasks=infos, rows=rows, pt2e_rows=pt2e_rows, total_s=round(time.perf_counter() - _T0, 1),
                loadavg_start=loadavg_start, loadavg_end=[round(v, 2) for v in os.getloadavg()])
    from _meta import emit

    emit("int8.py", argv, data, a.json, a.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
