"""The ONNX route on real ONNX files shipped inside Python wheels (issue 11): exact at full rank, honest counts?

Models we did not export ourselves (Paddle-, PyTorch- and quantised exports with ``If`` branches, ``LSTM``,
``ConvTranspose``, ``ConvInteger``, fp16 weights) go through ``dsrewrite.onnx.rewrite`` at ``rank="full"`` and
``rank=2``. Per model and rank it records: convs found / rewritten / skipped (skip reasons counted), parameters
before/after from the report AND from an independent count made here with the ``onnx`` package (elements of the
float initializers and float ``Constant`` tensors of ndim >= 1, main graph and every subgraph), file bytes
before/after on disk, whether ``onnx.checker.check_model(full_check=True)`` passes on the input and on the output,
and the relative output error of the rewritten vs the original model in onnxruntime (CPU) on standard-normal inputs
(seed 0): max over graph outputs of ||after - before||_2 / ||before||_2. A graph output made by a ``Sigmoid``
(PP-OCRv4 det: saturated on random input) is compared before the sigmoid: its input tensor is added as a graph
output on both models, and that replaces the sigmoid output in the comparison. Models with an ``sr`` input
(silero) are run at sr=16000 and sr=8000 (both ``If`` branches) with silero's chunk of 512 and 256 samples
(silero_vad.onnx rejects 512 samples at 8 kHz in its own LSTM); the row's error is the max over both.
"exact" = rel. error <= 1e-4 at full rank. A crash is a row, not an abort.

Nothing is downloaded: the models come from wheel files (``--wheel``, ``--wheel-dir``; get them with
``pip download --no-deps -d /tmp/wheels rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 ddddocr==1.6.1``) or,
with neither given, from those packages when installed. Benchmark-only dependencies: onnx, onnxruntime.

Usage: python benchmarks/real_onnx.py --wheel-dir /tmp/wheels [--out benchmarks/real_onnx.json]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

PACKAGES = ("rapidocr_onnxruntime", "silero_vad", "ddddocr")
# input shapes by model-file stem (a prefix), where the model's own shape is symbolic or too large
SHAPES: List[Tuple[str, Dict[str, Tuple[int, ...]]]] = [
    ("ch_PP-OCRv4_det", {"x": (1, 3, 96, 128)}), ("ch_PP-OCRv4_rec", {"x": (1, 3, 48, 160)}),
    ("ch_ppocr_mobile_v2.0_cls", {"x": (1, 3, 48, 192)}),
    ("silero_vad_16k_sequence", {"input": (4, 576), "h": (1, 1, 128), "c": (1, 1, 128)}),
    ("silero_vad_openvino_16k", {"input": (1, 576), "state": (2, 1, 128)}),
    ("silero_vad", {"input": (1, 512), "state": (2, 1, 128)}),
    ("common_det", {"images": (1, 3, 416, 416)}), ("common", {"input1": (1, 1, 64, 256)}),
]
SAMPLE_RATES = (16000, 8000)  # the ``input`` length scales with the rate: 512 samples at 16 kHz, 256 at 8 kHz
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
EXACT = 1e-4


def extract_models(wheels: Sequence[str], out_dir: str) -> List[str]:
    """Extract every ``.onnx`` file of the given wheels into ``out_dir``; returns their paths."""
    paths = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if member.endswith(".onnx"):
                    paths.append(z.extract(member, out_dir))
    return sorted(paths)


def installed_models() -> List[str]:
    """The ``.onnx`` files of the installed packages in PACKAGES (located without importing them)."""
    paths = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        for root in (spec.submodule_search_locations or []) if spec else []:
            paths += glob.glob(os.path.join(root, "**", "*.onnx"), recursive=True)
    return sorted(paths)


def independent_params(model: onnx.ModelProto) -> int:
    """Elements of float initializers and float ``Constant`` tensors of ndim >= 1, in every graph."""
    def graphs(g: onnx.GraphProto):
        yield g
        for node in g.node:
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    yield from graphs(sub)

    total = 0
    for g in graphs(model.graph):
        tensors = list(g.initializer)
        for node in g.node:
            if node.op_type == "Constant":
                tensors += [a.t for a in node.attribute if a.name == "value"]
                total += sum(len(a.floats) for a in node.attribute if a.name == "value_floats")
        total += sum(math.prod(t.dims) for t in tensors if t.data_type in FLOAT_TYPES and len(t.dims) >= 1)
    return total


def make_feeds(model: onnx.ModelProto, path: str) -> List[Dict[str, np.ndarray]]:
    """Standard-normal inputs (seed 0) by the model's input names and dtypes; one feed per sample rate if ``sr``."""
    given = next((sh for prefix, sh in SHAPES if os.path.basename(path).startswith(prefix)), {})
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in inputs}
    rates = list(SAMPLE_RATES) if "sr" in dtypes else [None]
    feeds = []
    for r in rates:
        rng, feed = np.random.default_rng(0), {}
        for inp in inputs:
            if inp.name == "sr":
                feed["sr"] = np.array(r, dtype=dtypes["sr"])
                continue
            shape = given.get(inp.name) or tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
            if any(d <= 0 for d in shape):
                raise ValueError(f"no static shape for input {inp.name!r}")
            if r is not None and inp.name == "input":
                shape = shape[:-1] + (shape[-1] * r // SAMPLE_RATES[0],)
            feed[inp.name] = rng.standard_normal(shape).astype(dtypes[inp.name])
        feeds.append(feed)
    return feeds


def compared_outputs(model: onnx.ModelProto) -> List[str]:
    """Graph outputs to compare; one made by a ``Sigmoid`` is replaced by the sigmoid's input (logits)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for out in model.graph.output:
        node = producers.get(out.name)
        names.append(node.input[0] if node is not None and node.op_type == "Sigmoid" else out.name)
    return names


def run_outputs(model: onnx.ModelProto, names: List[str], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """The values of ``names`` in onnxruntime (CPU); a name that is no graph output is added as one."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # no warnings about the unused initializers some exporters leave
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def rel_error(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Max over outputs of ||b - a||_2 / ||a||_2 (float64)."""
    errs = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(float(np.linalg.norm(y - x) / max(np.linalg.norm(x), 1e-30)))
    return max(errs)


def _err(e: BaseException) -> str:
    """One line: the innermost onnxruntime status message, else the first line."""
    text = str(e).strip().split("Status Message: ")[-1]
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def _check(path: str) -> str:
    try:
        onnx.checker.check_model(path, full_check=True)
        return "pass"
    except Exception as e:  # noqa: BLE001
        return "fail: " + _err(e)


def run_model(path: str, rank, work: str) -> dict:
    """One model at one rank: a row of the table (``error`` set when something crashed)."""
    from dsrewrite.onnx import rewrite

    row = {"model": os.path.basename(path), "rank": rank, "bytes_before": os.path.getsize(path)}
    try:
        model = onnx.load(path)
        row["checker_before"] = _check(path)
        feeds = make_feeds(model, path)
        shapes = {k: v.shape for k, v in feeds[0].items() if v.ndim}
        dst = os.path.join(work, f"{row['model'][:-5]}.rank-{rank}.onnx")
        new, rep = rewrite(path, dst, rank=rank, input_shapes=shapes)
    except Exception as e:  # noqa: BLE001
        row["error"] = "rewrite: " + _err(e)
        return row
    row.update(convs=len(rep.layers), rewritten=len(rep.rewritten), skipped=len(rep.skipped),
               skip_reasons=dict(collections.Counter(L.reason for L in rep.skipped)),
               params_before=rep.params_before, params_after=rep.params_after,
               indep_params_before=independent_params(model), indep_params_after=independent_params(new),
               bytes_after=os.path.getsize(dst), checker_after=_check(dst), notes=rep.notes)
    names = compared_outputs(model)
    row["outputs"], row["compared"] = [o.name for o in model.graph.output], names
    errs = {}
    for f in feeds:
        tag = f"sr={int(f['sr'])}" if "sr" in f else "-"
        try:
            before = run_outputs(model, names, f)
        except Exception as e:  # noqa: BLE001 - then the input, not the rewrite, is at fault
            errs[tag] = "the original fails in onnxruntime: " + _err(e)
            continue
        try:
            errs[tag] = rel_error(before, run_outputs(new, names, f))
        except Exception as e:  # noqa: BLE001
            errs[tag] = "the rewritten model fails in onnxruntime: " + _err(e)
    row["rel_error"] = errs
    nums = [v for v in errs.values() if isinstance(v, float)]
    row["max_rel_error"] = max(nums) if len(nums) == len(errs) else None
    if rank == "full":
        row["exact"] = row["max_rel_error"] is not None and row["max_rel_error"] <= EXACT
    return row


def markdown(rows: List[dict]) -> str:
    """The results as a Markdown table."""
    head = ("| model | rank | convs: found / rewritten / skipped | params before -> after (report) | "
            "independent count agrees | file bytes before -> after | full_check in / out | rel. error | exact |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r and "convs" not in r:
            lines.append(f"| {r['model']} | {r['rank']} | crash: {r['error']} | | | | | | |")
            continue
        agree = (r["indep_params_before"], r["indep_params_after"]) == (r["params_before"], r["params_after"])
        agree_s = "yes" if agree else f"no ({r['indep_params_before']:,} -> {r['indep_params_after']:,})"
        reasons: collections.Counter = collections.Counter()
        for k, n in r["skip_reasons"].items():  # "already depthwise (groups=16)" etc. counted together
            reasons[re.sub(r" \(groups=\d+\)", "", k)] += n
        skips = "; ".join(f"{n}x {k}" for k, n in reasons.items())
        err = ", ".join(f"{k}: {v:.1e}" if isinstance(v, float) else f"{k}: {v}" for k, v in r["rel_error"].items())
        err = err.replace("-: ", "") + (" (pre-sigmoid logits)" if r["compared"] != r["outputs"] else "")
        ck = ["pass" if r[k] == "pass" else "FAIL" for k in ("checker_before", "checker_after")]
        lines.append(f"| {r['model']} | {r['rank']} | {r['convs']} / {r['rewritten']} / {r['skipped']}"
                     f"{' (' + skips + ')' if skips else ''} | {r['params_before']:,} -> {r['params_after']:,} | "
                     f"{agree_s} | {r['bytes_before']:,} -> {r['bytes_after']:,} | "
                     f"{ck[0]} / {ck[1]} | {err} | "
                     f"{({True: 'yes', False: 'no'}).get(r.get('exact'), '')} |")
    return "\n".join(lines)


def _meta(argv: List[str], wheels: List[str]) -> dict:
    import onnxruntime

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "dsrewrite")
    commit = git("rev-parse", "HEAD") + (" (dsrewrite/ has uncommitted changes)" if dirty else "")
    return {"date": datetime.date.today().isoformat(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "dsrewrite_commit": commit,
            "command": "python benchmarks/real_onnx.py " + " ".join(argv), "exact_threshold": EXACT,
            "seed": 0, "sample_rates": list(SAMPLE_RATES), "wheels": [os.path.basename(w) for w in wheels]}


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", action="append", default=[], help="a wheel holding .onnx files (repeatable)")
    ap.add_argument("--wheel-dir", help="every *.whl in this folder")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_onnx.json"))
    args = ap.parse_args(argv)
    wheels = list(args.wheel) + (sorted(glob.glob(os.path.join(args.wheel_dir, "*.whl"))) if args.wheel_dir else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = extract_models(wheels, os.path.join(tmp, "src")) if wheels else installed_models()
        if not paths:
            sys.exit("no .onnx files found: pass --wheel / --wheel-dir or install " + ", ".join(PACKAGES))
        os.makedirs(os.path.join(tmp, "out"))
        for path in paths:
            for rank in ("full", 2):
                print(f"{os.path.basename(path)} rank={rank} ...", file=sys.stderr, flush=True)
                rows.append(run_model(path, rank, os.path.join(tmp, "out")))
    with open(args.out, "w") as f:
        json.dump({"meta": _meta(argv, wheels), "rows": rows}, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
