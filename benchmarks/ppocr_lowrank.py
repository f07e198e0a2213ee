"""PP-OCRv4 with every weight layer in one budget (issue 22, item 6): RapidOCR's recogniser and detector (real
weights) rewritten by ``dsrewrite.onnx.rewrite(..., kinds="all", calibration=...)``; text read vs measured time.

The data, the preprocessing, the OCR runs and the scoring are those of ``benchmarks/onnx_calibration.py``
(imported from it, not copied): text lines and pages rendered with PIL in the DejaVu fonts, calibration and
held-out data from different seeds and disjoint halves of the word list; recogniser arm (``rec``): RapidOCR on
single line images, recognition only; detector arm (``det``): full RapidOCR (rewritten detector, original
recogniser) on held-out pages. CER = Levenshtein distance / reference length over all lines (pages), after
NFKC and whitespace normalisation; ``CER vs original`` is the CER of the rewritten model's text against the
original model's text on the same images (0: reads exactly what the original reads).

Rows per arm, all with ``kinds="all"`` and ``calibration=`` feeds made by RapidOCR's own preprocessing
(whitened SVD per layer, then the sequential refit, computed in onnxruntime):

* ``target_flops`` 0.9 / 0.8 / 0.7 (``--targets``, whole-model fractions);
* ``target_latency`` (``--latency-targets``, default 0.85): planned and checked in onnxruntime by the
  route's closed loop; a target no plan reaches is a row with the refusal;
* the smallest reachable FLOPs ratio with ``kinds="kxk"`` (KxK convs only, as before issue 22) and with
  ``kinds="all"``, from the refusal of ``target_flops=0.01``.

Time: the original and each rewritten ``.onnx`` in onnxruntime sessions (2 intra-op threads, default graph
optimisations), side by side in interleaved rounds on one random input of the FLOPs shape
(``dsrewrite.timing.measure.compare``: fastest of each, noise = half the IQR of the per-round ratios); rec
1x3x48x320 (RapidOCR's ``rec_img_shape``), det 1x3x736x1216 (a 480x800 page after RapidOCR's preprocessing).
The 1-minute load average is recorded with every timing: the 2 cores are shared.

Needs ``pip install rapidocr_onnxruntime==1.4.4`` (benchmark-only; the .onnx files ship in the wheel).

    python benchmarks/ppocr_lowrank.py --json benchmarks/ppocr_lowrank.json --markdown benchmarks/ppocr_lowrank.md
    python benchmarks/ppocr_lowrank.py --arms rec --targets 0.8 --latency-targets --eval-lines 20   # smoke
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from onnx_calibration import (_pct, det_feeds, eval_det, eval_rec, fidelity, find_models, fonts,  # noqa: E402
                              make_data, make_ocr, page_input_shape, rec_feeds)

THREADS = 2
KINDS = ("kxk", "pointwise", "linear")
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def smallest(model, shape, kinds: str) -> Dict[str, Any]:
    """The smallest reachable FLOPs ratio with ``kinds`` and the share of the FLOPs its layers hold, from the
    refusal of ``target_flops=0.01``."""
    import dsrewrite.onnx as ds_onnx
    from dsrewrite.errors import BudgetUnreachable, DsrewriteError

    with tempfile.TemporaryDirectory() as d:
        try:
            ds_onnx.rewrite(model, os.path.join(d, "m.onnx"), target_flops=0.01, kinds=kinds, strict=True,
                            input_shapes={"x": shape}, progress=False, measure_time=False)
        except BudgetUnreachable as e:
            return dict(kinds=kinds, reachable=round(e.reachable, 4), layers=len(e.layers),
                        touchable=round(sum(d for d, _ in e.layers) / e.total, 4))
        except DsrewriteError as e:
            return dict(kinds=kinds, error=str(e).splitlines()[0][:300])
    return dict(kinds=kinds, error="target_flops=0.01 was met")


def time_onnx(before: str, after: str, shape: Sequence[int]) -> Dict[str, Any]:
    """Both files in onnxruntime, side by side in interleaved rounds on one random input (pool threads sleeping
    when idle: two spinning sessions take the cores from each other, RESULTS.md, issue 23 item 5)."""
    from dsrewrite.timing.measure import compare
    from dsrewrite.onnx.measure import session

    s0, s1 = session(before, THREADS, spinning=False), session(after, THREADS, spinning=False)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    f0 = {s0.get_inputs()[0].name: x}
    f1 = {s1.get_inputs()[0].name: x}
    c = compare(lambda: s0.run(None, f0), lambda: s1.run(None, f1), (), reps=20, max_seconds=12.0, min_reps=8)
    return dict(ms_before=round(c.before_ms, 2), ms_after=round(c.after_ms, 2), time_ratio=round(c.ratio, 3),
                time_noise=round(c.noise, 3), time_median_ratio=round(c.central, 3), rounds=c.rounds, load=load())


def rewrite_row(model, out_path: str, shape, feeds, budget: Dict[str, float]) -> Dict[str, Any]:
    """One calibrated all-kinds rewrite at ``budget`` (``target_flops`` or ``target_latency``)."""
    import dsrewrite.onnx as ds_onnx

    kw: Dict[str, Any] = dict(kinds="all", calibration=feeds, input_shapes={"x": shape}, progress=False,
                              measure_time="target_latency" in budget, **budget)
    if "target_latency" in budget:
        kw["ort_threads"] = THREADS
    t0 = time.perf_counter()
    _, report = ds_onnx.rewrite(model, out_path, **kw)
    rw = report.rewritten
    return dict(model_flops=round(report.flops_ratio, 4), params=round(report.params_after / report.params_before, 4),
                rewritten={k: sum(1 for lr in rw if lr.kind == k) for k in KINDS},
                ranks={lr.name: lr.rank for lr in rw},
                calib_error_after=(float(np.mean([lr.calib_error_after for lr in rw if lr.calib_error_after is not None]))
                                   if any(lr.calib_error_after is not None for lr in rw) else None),
                report_time_ratio=(round(report.time_after_ms / report.time_before_ms, 3)
                                   if report.time_after_ms and report.time_before_ms else None),
                report_time_noise=report.time_noise, notes=list(report.notes)[:5],
                rewrite_s=round(time.perf_counter() - t0, 1))


def markdown(data: Dict[str, Any]) -> str:
    m = data["meta"]
    out = ["# PP-OCRv4 (RapidOCR, real weights): every weight layer in one budget, calibrated (issue 22)", "",
           f"- Date: {m['date']}; machine: {m['machine']}, torch {m['torch']}, onnxruntime {data['onnxruntime']} "
           f"({THREADS} intra-op threads), rapidocr_onnxruntime {data['rapidocr_onnxruntime']}; no GPU.",
           f"- Command: `{m['command']}` (wall {data['total_s'] / 60:.1f} min; load average at start / end "
           f"{data['loadavg_start']} / {data['loadavg_end']}).",
           f"- Data: {data['data']['calib_lines']} calibration lines ({data['data']['calib_pages']} pages), "
           f"{data['data']['eval_lines']} held-out lines ({data['data']['eval_pages']} pages); FLOPs and time at "
           f"rec {data['shapes']['rec']}, det {data['shapes']['det']}.",
           "- kinds='all', calibrated; time: onnxruntime, original vs rewritten side by side (fastest of interleaved "
           "rounds, +- half the IQR of the per-round ratios); load = 1-minute load average at that timing.", ""]
    for arm, reach in data["reach"].items():
        parts = [f"kinds={r['kinds']}: " + (f"{r['reachable']:.3f} (its layers hold {r['touchable']:.3f} of the FLOPs)"
                                            if "reachable" in r else r.get("error", "?")) for r in reach]
        out.append(f"- {arm}: smallest reachable FLOPs ratio, " + "; ".join(parts) + ".")
    out += ["", "| arm | budget | model FLOPs | pairs (kxk/1x1/linear) | CER % | exact % | CER % vs original's text "
            "| ms before / after | time ratio | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        budget = r["budget"]
        if r.get("error"):
            out.append(f"| {r['arm']} | {budget} | {r['error'][:200]} | | | | | | | |")
            continue
        rw = r.get("rewritten", {})
        t = r.get("time", {})
        ms = f"{t['ms_before']:.1f} / {t['ms_after']:.1f}" if "ms_before" in t else "-"
        tr = f"{t['time_ratio']:.2f} +- {t['time_noise']:.2f}" if "time_ratio" in t else t.get("error", "-")
        out.append(f"| {r['arm']} | {budget} | {r.get('model_flops', 1.0):.3f} | "
                   f"{rw.get('kxk', 0)}/{rw.get('pointwise', 0)}/{rw.get('linear', 0)} | {_pct(r['cer'], 2)} | "
                   f"{_pct(r['exact'])} | {_pct(r.get('cer_vs_original'), 2)} | {ms} | {tr} | {t.get('load', '-')} |")
    if data.get("missing"):
        out += [""] + [f"- Not measured: {x}" for x in data["missing"]]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--wheel", help="the rapidocr_onnxruntime wheel to take the .onnx files from")
    src.add_argument("--models-dir", help="a folder holding the PP-OCRv4 .onnx files")
    ap.add_argument("--arms", nargs="+", choices=["rec", "det"], default=["rec", "det"])
    ap.add_argument("--targets", nargs="*", type=float, default=[0.9, 0.8, 0.7], help="whole-model target_flops")
    ap.add_argument("--latency-targets", nargs="*", type=float, default=[0.85])
    ap.add_argument("--calib-lines", type=int, default=32)
    ap.add_argument("--eval-lines", type=int, default=100, help="held-out rec lines")
    ap.add_argument("--det-eval-lines", type=int, default=48, help="held-out lines on the detector's pages")
    ap.add_argument("--lines-per-page", type=int, default=6)
    ap.add_argument("--page-size", nargs=2, type=int, default=[480, 800], metavar=("H", "W"))
    ap.add_argument("--det-calib-crop", nargs=2, type=int, default=[352, 640], metavar=("H", "W"))
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args(argv)

    import onnx
    import onnxruntime

    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    font_paths = fonts()
    lpp = a.lines_per_page
    page = tuple(a.page_size)
    calib_lines, calib_pages = make_data(a.seed, 0, a.calib_lines, math.ceil(a.calib_lines / lpp), lpp, page,
                                         font_paths)
    eval_lines, eval_pages = make_data(a.seed, 1, a.eval_lines, math.ceil(a.det_eval_lines / lpp), lpp, page,
                                       font_paths)
    log(f"data: {len(calib_lines)} calibration lines, {len(calib_pages)} pages; {len(eval_lines)} held-out lines, "
        f"{len(eval_pages)} pages")
    rows: List[Dict[str, Any]] = []
    reach: Dict[str, List[Dict[str, Any]]] = {}
    missing: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = find_models(a, tmp)
        base = make_ocr(models)
        shapes = {"rec": (1, *base.text_rec.rec_image_shape), "det": page_input_shape(base, page)}
        for arm in a.arms:
            shape = shapes[arm]
            evaluate = (lambda o: eval_rec(o, eval_lines)) if arm == "rec" else (lambda o: eval_det(o, eval_pages))
            res = evaluate(base)
            original = res.pop("hyps")
            rows.append(dict(arm=arm, budget="original", cer_vs_original=0.0, **res))
            log(f"{arm} original: CER {_pct(res['cer'], 2)} %")
            model = onnx.load(models[arm])
            reach[arm] = [smallest(model, shape, k) for k in ("kxk", "all")]
            log(f"{arm} smallest reachable: {reach[arm]}")
            feeds = (rec_feeds(base, calib_lines, a.calib_batch) if arm == "rec" else
                     det_feeds(base, calib_pages, tuple(a.det_calib_crop), np.random.default_rng([a.seed, 2])))
            budgets = [dict(target_flops=t) for t in a.targets] + [dict(target_latency=t) for t in a.latency_targets]
            for budget in budgets:
                (name, value), = budget.items()
                row: Dict[str, Any] = dict(arm=arm, budget=f"{name}={value:g}")
                out_path = os.path.join(tmp, f"{arm}_{name}_{value:g}.onnx")
                try:
                    row.update(rewrite_row(model, out_path, shape, feeds, budget))
                    ocr = make_ocr(models, **{arm: out_path})
                    res = evaluate(ocr)
                    hyps = res.pop("hyps")
                    row.update(res, cer_vs_original=fidelity(hyps, original))
                    if not a.no_time:
                        row["time"] = time_onnx(models[arm], out_path, shape)
                except Exception as e:  # noqa: BLE001 - a failing budget is a row, not an abort
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                rows.append(row)
                log(f"{arm} {row['budget']}: " + (row["error"] if row.get("error") else
                    f"FLOPs {row['model_flops']:.3f}, pairs {row['rewritten']}, CER {_pct(row['cer'], 2)} %, vs "
                    f"original {_pct(row['cer_vs_original'], 2)} %, time {row.get('time')}"))
    from _meta import emit  # benchmarks/ is the script's folder
    from importlib.metadata import version

    data = dict(onnxruntime=onnxruntime.__version__, rapidocr_onnxruntime=version("rapidocr-onnxruntime"),
                shapes={k: list(v) for k, v in shapes.items()},
                data=dict(seed=a.seed, calib_lines=len(calib_lines), calib_pages=len(calib_pages),
                          eval_lines=len(eval_lines), eval_pages=len(eval_pages), page_size=page),
                reach=reach, rows=rows, missing=missing, total_s=round(time.perf_counter() - _T0, 1),
                loadavg_start=loadavg_start, loadavg_end=[round(v, 2) for v in os.getloadavg()])
    emit("ppocr_lowrank.py", argv, data, a.json, a.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
