"""Data-aware calibration on the ONNX route (issue 15): PP-OCRv4 through RapidOCR, plain SVD vs calibrated.

The PP-OCRv4 recogniser and detector shipped in the rapidocr-onnxruntime 1.4.4 wheel are rewritten with
``dsrewrite.onnx.rewrite`` at several budgets, plain (weights only) and calibrated (``calibration=`` feeds,
computed in onnxruntime), and every rewritten file is passed to RapidOCR itself as its model path. Measured:

* Text: lines rendered with PIL in the DejaVu fonts that ship with matplotlib (Sans, Serif, Sans Mono; regular,
  bold, oblique), sizes, ink/background levels, a small rotation and pixel noise drawn at random; strings are
  random words, numbers, prices, dates and invoice-like lines. Calibration and evaluation use different seeds
  AND disjoint halves of the word list: the evaluation lines are held out.
* Recogniser arm (``rec``): ``RapidOCR(rec_model_path=...)`` on single line images, recognition only
  (``use_det=False, use_cls=False``).
  Calibration feeds are made by RapidOCR's own code: its image loader (RGB -> BGR), ``RapidOCR.preprocess``
  and ``TextRecognizer.resize_norm_img`` (height 48, width by aspect ratio, right-padded with zeros,
  ``(x/255 - 0.5)/0.5``, CHW, BGR), at one common width for all calibration lines: ``48 x`` the widest line's
  aspect ratio (at least 320), which is what RapidOCR's batching does for a batch holding that line.
* Detector arm (``det``): full RapidOCR (rewritten detector + original recogniser, no angle classifier) on
  held-out pages of several lines; the recognised boxes in RapidOCR's own reading order (top to bottom, left to
  right) are joined with spaces and compared with the page's lines joined likewise, so a missed, split or
  clipped box shows up as text errors. Calibration feeds: calibration pages through RapidOCR's loader,
  ``preprocess``, letterbox check and ``TextDetector``'s ``DetPreProcess`` (limit_type ``min``: the shorter
  side scaled UP to 736, sides rounded to multiples of 32, ``(x/255 - 0.5)/0.5`` with the wheel's config
  (mean = std = 0.5, not ImageNet's), CHW, BGR); one random window of ``--det-calib-crop`` pixels (offsets
  multiples of 32) of each preprocessed page is kept, to bound the memory the calibration needs.
* CER = Levenshtein distance / reference length, summed over all lines (pages) of a row, after the same
  normalisation for every row: NFKC (the Chinese recogniser writes full-width punctuation such as U+FF0C for
  ',') and whitespace runs -> one space, stripped (RapidOCR at times adds a trailing space). Spaces are scored:
  a rewritten recogniser that merges words is broken. ``exact`` = fraction of lines (pages) recognised exactly
  under that normalisation. ``cer_nospace``/``exact_nospace`` (JSON, a table column): whitespace removed, i.e.
  characters only; the original recogniser drops some spaces between words on the detector's crops of the
  smaller page text (about 1 point of the detector arm's CER), not on the line images.
* Fidelity: ``cer_vs_original`` is the CER of a rewritten model's text against the original model's text on the
  same images: 0 means it reads exactly what the original reads. The CER against the ground truth mixes the
  rewrite's effect with the original's own errors (a rewrite can score below the original by chance).
* Budgets: ``--targets`` are by default fractions of the FLOPs of the convs the rewrite can touch (the
  eligible ones: not 1x1, not depthwise, not transposed), turned into the whole-model ``target_flops`` that
  removes the same FLOPs. PP-OCRv4's eligible convs are few: in the recogniser the 3x3 stem and two 1x3 convs
  of the SVTR neck, 1.7 % of its FLOPs (a whole-model target below ~0.988 is unreachable there); in the
  detector the 3x3 stem and the five 3x3 96->24 convs of the FPN head, 56 % of its FLOPs. Each row records
  the FLOPs kept of the eligible convs (an eligible conv the plan leaves alone counts as kept), of the
  rewritten convs alone, and of the whole model (dsrewrite's report, at the input shapes below).
  ``--target-of model`` passes the targets as whole-model fractions instead.
* FLOPs and latency at input shapes rec 1x3x48x320 (RapidOCR's ``rec_img_shape``), det 1x3x736x1216 (a
  480x800 page, ``--page-size``, after RapidOCR's preprocessing). Latency: the report's onnxruntime timing
  (``measure_time=True``: random inputs, interleaved rounds; ``time_noise`` = half the IQR of the per-round
  ratios). ``--no-time`` skips it: time only on an otherwise idle machine.
* Defaults: 64 calibration lines (rec: 8 feeds of 8 lines; det: 11 pages of 6 lines, one 352x640 window
  each) and 100 held-out lines (det: 17 pages); about 12 minutes with ``--no-time`` on 2 cores shared with
  another job, most of it RapidOCR's detector on the held-out pages and the calibrated rewrites.

Nothing is downloaded. The models come from the installed rapidocr_onnxruntime package, or ``--wheel`` (the
wheel file; its .onnx files are extracted to a temporary folder) or ``--models-dir``. RapidOCR itself must be
installed: ``pip install rapidocr_onnxruntime-1.4.4-py3-none-any.whl`` (a benchmark-only dependency, not in
pyproject.toml).

    python benchmarks/onnx_calibration.py --json benchmarks/onnx_calibration.json \\
        --markdown benchmarks/onnx_calibration.md
    python benchmarks/onnx_calibration.py --no-time --modes plain      # development: no timing, plain only
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import tempfile
import time
import unicodedata
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REC_FILE = "ch_PP-OCRv4_rec_infer.onnx"
DET_FILE = "ch_PP-OCRv4_det_infer.onnx"
CLS_FILE = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
              "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"]
WORDS = sorted(set("""
account address amount apple April August balance bank basket battery before blue board bottle box bridge
cable camera card carbon center chair charge check cherry circle city client coffee color copper cotton
customer delivery desk discount document dollar door driver east energy engine euro evening export factory
field filter flight floor garden glass gold green harbor hello history hotel house import index invoice
iron island item July June kitchen label lamp laptop letter light limit line machine market meter method
metal minute model monday morning motor network north number office orange order paper parcel payment pencil
phone planet plate price print product quality quarter receipt record river road salary sample school screen
service shipping silver simple soft south station steel stock store street subtotal summer supply system table
tax ticket total tower train travel unit value vendor video wall water weight west window winter wood world
yellow zone Berlin London Madrid Paris Tokyo Oslo Vienna Dublin Lisbon Prague
""".split()))
DEFAULT_TARGETS = {"rec": [0.9, 0.7, 0.5, 0.4], "det": [0.7, 0.5, 0.3, 0.2]}
PUNCT_WORDS = ["-", "/", "&", "+", "=", "@", "#", "%", ":", "(ok)", "No.", "e.g.", "etc.", "vs."]


# ------------------------------------------------------------------------------------------ text and images
def fonts() -> List[str]:
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    found = [os.path.join(folder, f) for f in FONT_FILES if os.path.exists(os.path.join(folder, f))]
    if not found:
        raise SystemExit(f"no DejaVu fonts in {folder}")
    return found


def random_text(rng: np.random.Generator, words: Sequence[str], max_chars: int = 40) -> str:
    """One line: words, numbers, prices, dates, codes and punctuation, at most ``max_chars`` characters."""
    def w() -> str:
        s = words[int(rng.integers(len(words)))]
        r = rng.random()
        return s.upper() if r < 0.1 else s.capitalize() if r < 0.45 else s

    def num() -> str:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))

    def price() -> str:
        v = rng.integers(1, 10 ** int(rng.integers(1, 6)))
        cur = ["$", "EUR ", "", "USD "][int(rng.integers(4))]
        return f"{cur}{int(v) // 100:,}.{int(v) % 100:02d}"

    templates = [
        lambda: " ".join(w() for _ in range(int(rng.integers(2, 6)))),
        lambda: f"{w()} {w()} {int(rng.integers(1990, 2031))}",
        lambda: f"Invoice #{int(rng.integers(10000, 999999))}, {w()}: {price()}",
        lambda: f"Qty {int(rng.integers(1, 50))} x {w()}-{chr(65 + int(rng.integers(26)))} @ {price()}",
        lambda: f"Date: {int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2031))}",
        lambda: f"Tel. +{int(rng.integers(1, 99))} {int(rng.integers(100, 999))} {int(rng.integers(1000, 99999))}",
        lambda: f"{w()} {w()}, {w()} {num()}; {w()}.",
        lambda: f"Order {''.join(chr(65 + int(c)) for c in rng.integers(0, 26, 3))}-{num()} {w()} ({w()})",
        lambda: f"{w()} {PUNCT_WORDS[int(rng.integers(len(PUNCT_WORDS)))]} {w()} {num()}%",
        lambda: f"Total {w()}: {price()} ({int(rng.integers(0, 30))}% {w()})",
        lambda: f"{w()}? {w()}! \"{w()}\" {num()}",
    ]
    while True:
        s = templates[int(rng.integers(len(templates)))]()
        if len(s) <= max_chars:
            return s


def _noise(img, rng: np.random.Generator):
    from PIL import Image, ImageFilter

    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    a = np.asarray(img).astype(np.float32)
    a += rng.normal(0.0, float(rng.uniform(0.0, 8.0)), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _colors(rng: np.random.Generator) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    bg = int(rng.integers(185, 256))
    tint = rng.integers(-12, 1, 3)
    ink = int(rng.integers(0, 90))
    return tuple(int(max(0, bg + t)) for t in tint), (ink, ink, int(min(255, ink + rng.integers(0, 40))))


def render_line(text: str, rng: np.random.Generator, font_paths: Sequence[str]):
    """A PIL RGB image of one text line (margins, colours, rotation of at most 2 degrees, noise drawn)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_paths[int(rng.integers(len(font_paths)))], int(rng.integers(24, 44)))
    left, top, right, bottom = font.getbbox(text)
    px, py = int(rng.integers(4, 20)), int(rng.integers(4, 12))
    bg, ink = _colors(rng)
    img = Image.new("RGB", (right - left + 2 * px, bottom - top + 2 * py), bg)
    ImageDraw.Draw(img).text((px - left, py - top), text, font=font, fill=ink)
    if rng.random() < 0.5:
        img = img.rotate(float(rng.uniform(-2.0, 2.0)), resample=Image.BICUBIC, expand=True, fillcolor=bg)
    return _noise(img, rng)


def render_page(rng: np.random.Generator, words: Sequence[str], font_paths: Sequence[str], n_lines: int,
                size: Tuple[int, int]):
    """A PIL RGB page (``size`` = height, width) of ``n_lines`` lines at random indents; returns (image, lines)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = size
    for _ in range(100):
        items = []
        for _ in range(n_lines):
            font = ImageFont.truetype(font_paths[int(rng.integers(len(font_paths)))], int(rng.integers(22, 35)))
            while True:
                text = random_text(rng, words, max_chars=44)
                box = font.getbbox(text)
                if box[2] - box[0] <= width - 24:
                    break
            items.append((text, font, box))
        line_h = sum(b[3] - b[1] for _, _, b in items)
        spare = height - 16 - line_h - 12 * (n_lines - 1)
        if spare >= 0:
            break
    else:
        raise RuntimeError(f"{n_lines} lines do not fit a {height}x{width} page")
    gaps = rng.dirichlet(np.ones(n_lines + 1)) * spare
    bg, ink = _colors(rng)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    y = 8 + gaps[0]
    for (text, font, (left, top, right, bottom)), gap in zip(items, gaps[1:]):
        x = int(rng.integers(12, max(13, width - 12 - (right - left))))
        draw.text((x - left, int(y) - top), text, font=font, fill=ink)
        y += bottom - top + 12 + gap
    return _noise(img, rng), [t for t, _, _ in items]


def make_data(seed: int, half: int, n_lines: int, n_pages: int, lines_per_page: int,
              page_size: Tuple[int, int], font_paths: Sequence[str]):
    """Lines and pages from one half of the word list (0: calibration, 1: evaluation) and their own seed."""
    words = WORDS[half::2]
    rng = np.random.default_rng([seed, half])
    lines = []
    for _ in range(n_lines):
        text = random_text(rng, words)
        lines.append((render_line(text, rng, font_paths), text))
    pages = [render_page(rng, words, font_paths, lines_per_page, page_size) for _ in range(n_pages)]
    return lines, pages


# ------------------------------------------------------------------------------------------ scoring
def normalise(s: str, spaces: bool) -> str:
    """NFKC (full-width punctuation the Chinese recogniser emits, such as U+FF0C, becomes ASCII), then either
    runs of whitespace -> one space, stripped (``spaces``) or no whitespace at all."""
    s = unicodedata.normalize("NFKC", s)
    return re.sub(r"\s+", " ", s).strip() if spaces else re.sub(r"\s+", "", s)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(pairs: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    """CER (summed edits / summed reference length) and exact-match rate of (hypothesis, reference) pairs:
    ``cer``/``exact`` with whitespace normalised, ``cer_nospace``/``exact_nospace`` with it removed."""
    out: Dict[str, Any] = dict(n=len(pairs))
    for spaces, suffix in ((True, ""), (False, "_nospace")):
        edits = chars = exact = 0
        worst: List[Tuple[int, str, str]] = []
        for hyp, ref in pairs:
            h, r = normalise(hyp, spaces), normalise(ref, spaces)
            e = levenshtein(h, r)
            edits, chars, exact = edits + e, chars + len(r), exact + (e == 0)
            if e:
                worst.append((e, r, h))
        worst.sort(key=lambda t: -t[0])
        out.update({f"cer{suffix}": edits / max(1, chars), f"exact{suffix}": exact / max(1, len(pairs)),
                    f"chars{suffix}": chars, f"examples{suffix}": [dict(ref=r, hyp=h) for _, r, h in worst[:3]]})
    return out


# ------------------------------------------------------------------------------------------ RapidOCR
def quiet_rapidocr():
    """RapidOCR logs through its own loggers; keep them to warnings."""
    for name in ("RapidOCR", "OrtInferSession"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_ocr(models: Dict[str, str], rec: Optional[str] = None, det: Optional[str] = None):
    from rapidocr_onnxruntime import RapidOCR

    ocr = RapidOCR(det_model_path=det or models["det"], rec_model_path=rec or models["rec"],
                   cls_model_path=models["cls"])
    quiet_rapidocr()
    return ocr


def ocr_text(result) -> List[str]:
    """The texts of a RapidOCR result, in its own order (rec-only: [[text, score]], full: [[box, text, score]])."""
    if not result:
        return []
    return [r[-2] for r in result]


def eval_rec(ocr, lines) -> Dict[str, Any]:
    pairs = []
    for img, ref in lines:
        res, _ = ocr(img, use_det=False, use_cls=False)
        pairs.append((" ".join(ocr_text(res)), ref))
    return dict(score(pairs), hyps=[h for h, _ in pairs])


def eval_det(ocr, pages) -> Dict[str, Any]:
    pairs = []
    for img, refs in pages:
        res, _ = ocr(img, use_det=True, use_cls=False)
        pairs.append((" ".join(ocr_text(res)), " ".join(refs)))
    return dict(score(pairs), hyps=[h for h, _ in pairs])


def fidelity(hyps: Sequence[str], original: Sequence[str]) -> float:
    """CER of a rewritten model's text against the original model's text on the same images (0: it reads
    exactly what the original reads): how faithful the rewrite is, apart from the original's own errors."""
    return score(list(zip(hyps, original)))["cer"]


def rec_feeds(ocr, lines, batch: int) -> List[Dict[str, np.ndarray]]:
    """Calibration feeds for the recogniser, made by RapidOCR's own preprocessing at one common width."""
    imgs = [ocr.preprocess(ocr.load_img(img))[0] for img, _ in lines]
    _, img_h, img_w = ocr.text_rec.rec_image_shape
    max_ratio = max([img_w / img_h] + [im.shape[1] / im.shape[0] for im in imgs])
    x = np.stack([ocr.text_rec.resize_norm_img(im, max_ratio) for im in imgs]).astype(np.float32)
    return [{"x": x[i:i + batch]} for i in range(0, len(x), batch)]


def page_input_shape(ocr, page_size: Tuple[int, int]) -> Tuple[int, ...]:
    """The detector's input shape for a page of ``page_size`` (RapidOCR's preprocessing of a blank page)."""
    im = ocr.preprocess(np.full((*page_size, 3), 255, np.uint8))[0]
    im, _ = ocr.maybe_add_letterbox(im, {})
    return tuple(ocr.text_det.get_preprocess(max(im.shape[0], im.shape[1]))(im).shape)


def det_feeds(ocr, pages, crop: Tuple[int, int], rng: np.random.Generator) -> List[Dict[str, np.ndarray]]:
    """Calibration feeds for the detector: RapidOCR's page preprocessing, then one window per page (one feed each)."""
    feeds = []
    for img, _ in pages:
        im = ocr.preprocess(ocr.load_img(img))[0]
        im, _ = ocr.maybe_add_letterbox(im, {})
        x = ocr.text_det.get_preprocess(max(im.shape[0], im.shape[1]))(im)
        ch, cw = crop
        if ch and cw:
            if ch > x.shape[2] or cw > x.shape[3]:
                raise SystemExit(f"--det-calib-crop {ch} {cw} exceeds the preprocessed page {x.shape[2]}x{x.shape[3]}")
            y0 = 32 * int(rng.integers(0, (x.shape[2] - ch) // 32 + 1))
            x0 = 32 * int(rng.integers(0, (x.shape[3] - cw) // 32 + 1))
            x = x[:, :, y0:y0 + ch, x0:x0 + cw]
        feeds.append({"x": np.ascontiguousarray(x, dtype=np.float32)})
    if len({f["x"].shape for f in feeds}) > 1:
        raise SystemExit("detector calibration windows differ in shape: give --det-calib-crop")
    return feeds


# ------------------------------------------------------------------------------------------ rewriting
def eligible_flops(model, shape) -> Tuple[Dict[str, int], int]:
    """FLOPs of the convs the rewrite can touch (those rewritten at full rank) and of the whole model."""
    import dsrewrite.onnx as ds_onnx

    _, report = ds_onnx.rewrite(model, None, rank="full", input_shapes={"x": shape}, progress=False,
                                measure_time=False)
    return {l.name: l.flops_before for l in report.rewritten}, report.flops_before


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def rewrite_row(mode: str, shape: Tuple[int, ...], whole_target: float, model, eligible: Dict[str, int],
                out_path: str, feeds, a) -> Dict[str, Any]:
    import dsrewrite.onnx as ds_onnx

    kw: Dict[str, Any] = dict(target_flops=whole_target, input_shapes={"x": shape}, progress=False,
                              measure_time=not a.no_time)
    if mode == "calibrated":
        kw["calibration"] = feeds
        if a.sequential != "auto":
            kw["sequential"] = a.sequential == "on"
    t0 = time.perf_counter()
    _, report = ds_onnx.rewrite(model, out_path, **kw)
    rewrite_s = time.perf_counter() - t0
    layers = {l.name: l for l in report.layers}
    kept = sum((layers[n].flops_after if n in layers and layers[n].rewritten else f) for n, f in eligible.items())
    rw = report.rewritten
    return dict(
        conv_flops_kept=kept / sum(eligible.values()),
        rewritten_flops_kept=(sum(l.flops_after for l in rw) / sum(l.flops_before for l in rw)) if rw else None,
        model_flops=report.flops_ratio, layers_rewritten=len(rw), layers_eligible=len(eligible),
        ranks={l.name: l.rank for l in rw}, weight_error=_mean(l.error for l in rw),
        calib_error_before=_mean(l.calib_error_before for l in rw),
        calib_error_after=_mean(l.calib_error_after for l in rw),
        ms_before=report.time_before_ms, ms_after=report.time_after_ms,
        time_ratio=(report.time_after_ms / report.time_before_ms
                    if report.time_after_ms and report.time_before_ms else None),
        time_noise=report.time_noise, notes=list(report.notes), rewrite_s=round(rewrite_s, 2))


# ------------------------------------------------------------------------------------------ output
def _pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x: Optional[float], fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    out = ["| model | mode | target | conv FLOPs kept | model FLOPs | CER % | exact % | CER % without spaces "
           "| CER % vs the original's text | calib err before / after | ms before / after (ratio +- noise) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            err = r["error"]
            m = re.search(r"smallest reachable is ([0-9.]+)", err)
            err = f"unreachable (smallest: {m.group(1)} of the model's FLOPs)" if m else f"error: {err[:100]}"
            out.append(f"| {r['arm']} | {r['mode']} | {_num(r.get('target'), '.2f')} | {err} "
                       "| | | | | | | |")
            continue
        ms = "-"
        if r.get("ms_before") is not None and r.get("ms_after") is not None:
            ms = f"{r['ms_before']:.1f} / {r['ms_after']:.1f} ({r['time_ratio']:.2f} +- {r['time_noise'] or 0:.2f})"
        cal = ("-" if r.get("calib_error_before") is None else
               f"{r['calib_error_before']:.3f} / {_num(r.get('calib_error_after'))}")
        out.append(f"| {r['arm']} | {r['mode']} | {_num(r.get('target'), '.2f')} | {_num(r['conv_flops_kept'])} "
                   f"| {_num(r['model_flops'])} | {_pct(r['cer'], 2)} | {_pct(r['exact'])} "
                   f"| {_pct(r['cer_nospace'], 2)} | {_pct(r.get('cer_vs_original'), 2)} | {cal} | {ms} |")
    return "\n".join(out)


def verdicts(rows: Sequence[Dict[str, Any]], margin: float = 0.01, at: float = 0.7) -> List[str]:
    """Per arm and mode: the smallest conv-FLOPs fraction whose CER is within ``margin`` of the original's, and
    whether the issue's target (within 1 point at <= 0.7 of the convs' FLOPs) is met. The fraction is of the
    eligible convs (one the plan leaves alone counts as kept): of the rewritten convs alone it flatters a plan
    that rewrites only one conv at a low rank."""
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        orig = next((r for r in rows if r["arm"] == arm and r["mode"] == "original"), None)
        if orig is None:
            continue
        lines.append(f"{arm}: original CER {_pct(orig['cer'], 2)} %")
        for mode in ("plain", "calibrated"):
            ok = [r for r in rows if r["arm"] == arm and r["mode"] == mode and not r.get("error")]
            if not ok:
                continue
            good = [r for r in ok if r["cer"] <= orig["cer"] + margin]
            best = min(good, key=lambda r: r["conv_flops_kept"]) if good else None
            met = any(r["conv_flops_kept"] <= at for r in good)
            lines.append(f"  {mode}: CER within {100 * margin:g} point of the original down to conv FLOPs kept "
                         f"{_num(best['conv_flops_kept']) if best else 'none'}; at <= {at} of the eligible convs' "
                         f"FLOPs: {'yes' if met else 'no'}")
    return lines


# ------------------------------------------------------------------------------------------ main
def find_models(a, tmp: str) -> Dict[str, str]:
    if a.wheel:
        with zipfile.ZipFile(a.wheel) as z:
            for member in z.namelist():
                if member.endswith(".onnx"):
                    z.extract(member, tmp)
        folder = next((os.path.dirname(os.path.join(tmp, m)) for m in zipfile.ZipFile(a.wheel).namelist()
                       if m.endswith(REC_FILE)), None)
    elif a.models_dir:
        folder = a.models_dir
    else:
        import importlib.util

        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "models") if spec else None
    if not folder:
        raise SystemExit("no models: install rapidocr_onnxruntime or give --wheel / --models-dir")
    models = dict(rec=os.path.join(folder, REC_FILE), det=os.path.join(folder, DET_FILE),
                  cls=os.path.join(folder, CLS_FILE))
    for path in models.values():
        if not os.path.exists(path):
            raise SystemExit(f"missing model file {path}")
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--wheel", help="the rapidocr_onnxruntime wheel to take the .onnx files from")
    src.add_argument("--models-dir", help="a folder holding the PP-OCRv4 .onnx files")
    ap.add_argument("--arms", nargs="+", choices=["rec", "det"], default=["rec", "det"])
    ap.add_argument("--modes", nargs="+", choices=["plain", "calibrated"], default=["plain", "calibrated"])
    ap.add_argument("--targets", nargs="+", type=float,
                    help="budgets for both arms (default: rec 0.9 0.7 0.5 0.4, det 0.7 0.5 0.3 0.2; every "
                         "eligible conv at rank 1 keeps ~0.33 (rec) and ~0.15 (det) of their FLOPs)")
    ap.add_argument("--target-of", choices=["convs", "model"], default="convs",
                    help="the targets are fractions of the eligible convs' FLOPs (default) or of the whole model's")
    ap.add_argument("--calib-lines", type=int, default=64, help="rec calibration lines (det: that many lines on pages)")
    ap.add_argument("--eval-lines", type=int, default=100, help="held-out rec lines (det: that many lines on pages)")
    ap.add_argument("--lines-per-page", type=int, default=6)
    ap.add_argument("--page-size", nargs=2, type=int, default=[480, 800], metavar=("H", "W"))
    ap.add_argument("--det-calib-crop", nargs=2, type=int, default=[352, 640], metavar=("H", "W"),
                    help="window of each preprocessed calibration page (0 0: the whole page)")
    ap.add_argument("--calib-batch", type=int, default=8, help="rec calibration lines per feed")
    ap.add_argument("--sequential", choices=["auto", "on", "off"], default="auto",
                    help="passed to rewrite(sequential=...) for the calibrated mode (auto: not passed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-time", action="store_true", help="do not time the models (use on a busy machine)")
    ap.add_argument("--keep-models", help="write the rewritten .onnx files here (default: a temporary folder)")
    ap.add_argument("--save-images", help="write the rendered evaluation images here (inspection)")
    ap.add_argument("--json", help="write rows and meta here")
    ap.add_argument("--markdown", help="write the Markdown table here")
    a = ap.parse_args(argv)

    import onnx

    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        raise SystemExit("rapidocr_onnxruntime is not installed (pip install the 1.4.4 wheel: a benchmark-only "
                         "dependency)") from None
    t_start = time.perf_counter()
    font_paths = fonts()
    page_size = tuple(a.page_size)
    lpp = a.lines_per_page
    calib_lines, calib_pages = make_data(a.seed, 0, a.calib_lines, math.ceil(a.calib_lines / lpp), lpp, page_size,
                                         font_paths)
    eval_lines, eval_pages = make_data(a.seed, 1, a.eval_lines, math.ceil(a.eval_lines / lpp), lpp, page_size,
                                       font_paths)
    calib_texts = {t for _, t in calib_lines} | {t for _, ts in calib_pages for t in ts}
    overlap = sum(t in calib_texts for _, t in eval_lines) + sum(t in calib_texts for _, ts in eval_pages for t in ts)
    if a.save_images:
        os.makedirs(a.save_images, exist_ok=True)
        for i, (img, _) in enumerate(eval_lines):
            img.save(os.path.join(a.save_images, f"line{i:03d}.png"))
        for i, (img, _) in enumerate(eval_pages):
            img.save(os.path.join(a.save_images, f"page{i:03d}.png"))
    print(f"data: {len(calib_lines)} calibration lines + {len(calib_pages)} pages, {len(eval_lines)} held-out "
          f"lines + {len(eval_pages)} pages ({overlap} held-out strings also in calibration), "
          f"{time.perf_counter() - t_start:.1f}s", flush=True)

    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = find_models(a, tmp)
        out_dir = a.keep_models or tmp
        os.makedirs(out_dir, exist_ok=True)
        base = make_ocr(models)
        shapes = {"rec": (1, *base.text_rec.rec_image_shape), "det": page_input_shape(base, page_size)}
        for arm in a.arms:
            shape = shapes[arm]
            evaluate = (lambda o: eval_rec(o, eval_lines)) if arm == "rec" else (lambda o: eval_det(o, eval_pages))
            t0 = time.perf_counter()
            res = evaluate(base)
            original_hyps = res.pop("hyps")
            rows.append(dict(cer_vs_original=0.0, arm=arm, mode="original", target=None, whole_target=None, conv_flops_kept=1.0,
                             rewritten_flops_kept=1.0, model_flops=1.0, **res,
                             eval_s=round(time.perf_counter() - t0, 1)))
            print(f"{arm} original: CER {_pct(res['cer'], 2)} %, exact {_pct(res['exact'])} % (without spaces: CER "
                  f"{_pct(res['cer_nospace'], 2)} %, exact {_pct(res['exact_nospace'])} %), eval "
                  f"{rows[-1]['eval_s']}s", flush=True)
            model = onnx.load(models[arm])
            eligible, total = eligible_flops(model, shape)
            rows[-1].update(layers_eligible=len(eligible), eligible_flops_fraction=sum(eligible.values()) / total,
                            flop_shape=shape)
            feeds = None
            if "calibrated" in a.modes:
                t0 = time.perf_counter()
                feeds = (rec_feeds(base, calib_lines, a.calib_batch) if arm == "rec" else
                         det_feeds(base, calib_pages, tuple(a.det_calib_crop), np.random.default_rng([a.seed, 2])))
                print(f"{arm} calibration feeds: {len(feeds)} x {tuple(feeds[0]['x'].shape)} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
            for target in a.targets or DEFAULT_TARGETS[arm]:
                whole = 1 - (1 - target) * sum(eligible.values()) / total if a.target_of == "convs" else target
                for mode in a.modes:
                    row = dict(arm=arm, mode=mode, target=target, whole_target=whole)
                    out_path = os.path.join(out_dir, f"{arm}_{mode}_{target:g}.onnx")
                    try:
                        row.update(rewrite_row(mode, shape, whole, model, eligible, out_path, feeds, a))
                        t0 = time.perf_counter()
                        ocr = make_ocr(models, **{arm: out_path})
                        res = evaluate(ocr)
                        hyps = res.pop("hyps")
                        row.update(res, cer_vs_original=fidelity(hyps, original_hyps),
                                   eval_s=round(time.perf_counter() - t0, 1))
                    except Exception as e:  # noqa: BLE001 - a failing arm is a row, not an abort
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    rows.append(row)
                    if row.get("error"):
                        print(f"{arm} {mode} {target:g}: {row['error']}", flush=True)
                    else:
                        ms = (f", {row['ms_before']:.1f} -> {row['ms_after']:.1f} ms" if row.get("ms_after") else "")
                        print(f"{arm} {mode} {target:g}: conv FLOPs kept {row['conv_flops_kept']:.3f}, model "
                              f"{row['model_flops']:.3f}, ranks {row['ranks']}, CER {_pct(row['cer'], 2)} %, exact "
                              f"{_pct(row['exact'])} % (no spaces: {_pct(row['cer_nospace'], 2)} %, vs the "
                              f"original's text: {_pct(row['cer_vs_original'], 2)} %){ms} "
                              f"(rewrite {row['rewrite_s']}s, eval {row['eval_s']}s)",
                              flush=True)
    table = markdown(rows)
    summary = verdicts(rows)
    print()
    print(table)
    print()
    print("\n".join(summary))
    total_s = time.perf_counter() - t_start
    print(f"\ntotal {total_s:.0f}s")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n\n" + "\n".join(summary) + "\n")
    if a.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _meta import write_json  # benchmarks/ is the script's folder

        import onnxruntime

        write_json(a.json, "onnx_calibration.py", argv, onnxruntime=onnxruntime.__version__,
                   rapidocr_onnxruntime=_version("rapidocr_onnxruntime"), flop_shapes=shapes,
                   data=dict(seed=a.seed, calib_lines=len(calib_lines), calib_pages=len(calib_pages),
                             eval_lines=len(eval_lines), eval_pages=len(eval_pages), page_size=page_size,
                             det_calib_crop=a.det_calib_crop, overlap=overlap,
                             fonts=[os.path.basename(p) for p in font_paths]),
                   timed=not a.no_time, total_s=round(total_s, 1), rows=rows, table=table, summary=summary)
    return 0


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
