"""How the ONNX route's rewrite time grows with the number of rewritten layers (issue 23, item 6).

Synthetic chains of N layers (nothing downloaded): ``conv``, N 3x3 ``Conv`` nodes (8 channels, 8x8, pads 1, a bias
each) rewritten as separable pairs; ``gemm``, N ``Gemm`` nodes (16 features, ``transB=1``, a bias each, input
[4, 16]) rewritten as low-rank pairs (``kinds="linear"``). Each is ``dsrewrite.onnx.rewrite(model, rank=2)`` with
nothing timed in onnxruntime (``measure_time`` off, no latency target): the time of the whole call and of its
stages, read by wrapping the functions ``dsrewrite/onnx/api.py`` calls (shape inference, site collection, the
planner with its SVDs, the per-layer self-check, the backend's edit of the protobuf, FLOP and parameter counts,
the report, ``onnx.checker``); "other" is the rest. The best of ``--repeats`` runs per N (the model is built
once, outside the clock); the CPU time of the process (all threads) is recorded beside the wall time, as it
moves less when other work shares the machine. The exponent is the least-squares slope of log(time) against log(N): 1 is linear,
2 quadratic.

Each code version runs in its own process: ``--before REV`` and ``--after REV`` are commits (exported with
``git archive``, as ``--code-at`` does in the other benchmarks); ``--after tree`` (the default) is the importable
working tree.

Usage:
  python benchmarks/onnx_scale.py --before 7d5b32d --after HEAD   # both, ~2 min on 2 cores
  python benchmarks/onnx_scale.py --ns 100,200 --kinds conv          # a quick look at the working tree only
  python benchmarks/onnx_scale.py --table benchmarks/onnx_scale.json
Writes benchmarks/onnx_scale.json and benchmarks/onnx_scale.md (``--out``, ``--md``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from _meta import ROOT, code_env, write_json  # benchmarks/_meta.py: this script's folder is sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
# the functions dsrewrite/onnx/api.py calls by these names, one stage each
STAGES = ("infer_shapes", "collect_sites", "plan_sites", "self_check", "apply_decisions", "count_flops",
          "count_params", "build_report", "_check_rewritten")


def chain(n: int, kind: str):
    """A chain of ``n`` 3x3 convs (``kind="conv"``) or ``Gemm`` layers (``"gemm"``) with random weights."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape, c = ([1, 8, 8, 8], 8) if kind == "conv" else ([4, 16], 16)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        w, b, out = f"w{i}", f"b{i}", f"t{i + 1}"
        if kind == "conv":
            inits.append(numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.1).astype(np.float32), w))
            nodes.append(helper.make_node("Conv", [prev, w, b], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal((c, c)) * 0.25).astype(np.float32), w))
            nodes.append(helper.make_node("Gemm", [prev, w, b], [out], name=f"gemm{i}", transB=1))
        inits.append(numpy_helper.from_array(np.zeros(c, np.float32), b))
        prev = out
    graph = helper.make_graph(nodes, f"{kind}_chain_{n}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def child(ns: List[int], kinds: List[str], repeats: int) -> dict:
    """Time the rewrite of every chain with the importable dsrewrite; returns rows by kind."""
    import dsrewrite
    import dsrewrite.onnx.api as api

    spent: Dict[str, float] = {}

    def timed(stage: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t
        return wrapper

    for stage in STAGES:
        setattr(api, stage, timed(stage, getattr(api, stage)))
    api.rewrite(chain(4, "conv"), rank=2)  # imports and onnxruntime's first session outside the clock
    rows: Dict[str, list] = {}
    for kind in kinds:
        options = dict(rank=2, measure_time=False) if kind == "conv" else dict(rank=2, kinds="linear",
                                                                               measure_time=False)
        for n in ns:
            model, best = chain(n, kind), None
            for _ in range(repeats):
                spent.clear()
                t, cpu = time.perf_counter(), time.process_time()
                result = api.rewrite(model, **options)
                total, cpu = time.perf_counter() - t, time.process_time() - cpu
                if best is None or total < best["total_s"]:
                    stages = {k: round(v, 4) for k, v in spent.items()}
                    stages["other"] = round(total - sum(spent.values()), 4)
                    rewritten = sum(1 for layer in result.report.layers if layer.rewritten)
                    best = dict(n=n, rewritten=rewritten, total_s=round(total, 4), cpu_s=round(cpu, 4),
                                stages=stages)
            print(f"  {kind} N={n}: {best['total_s']:.3f} s ({best['rewritten']} rewritten)", file=sys.stderr, flush=True)
            rows.setdefault(kind, []).append(best)
    return dict(dsrewrite=os.path.dirname(dsrewrite.__file__), rows=rows)


def exponent(rows: List[dict], key=lambda r: r["total_s"]) -> Optional[float]:
    """Least-squares slope of log(time) against log(N)."""
    pts = [(math.log(r["n"]), math.log(key(r))) for r in rows if key(r) > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 2)


def run_version(rev: Optional[str], ns: List[int], kinds: List[str], repeats: int) -> dict:
    """One code version in a fresh process: ``rev`` a commit (``git archive``), ``None`` the working tree."""
    env, commit = code_env(rev) if rev else (None, None)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", out, "--ns", ",".join(map(str, ns)),
           "--kinds", ",".join(kinds), "--repeats", str(repeats)]
    subprocess.run(cmd, check=True, env=env, cwd=tempfile.gettempdir())
    with open(out) as f:
        got = json.load(f)
    os.unlink(out)
    if commit is None:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dsrewrite"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        got["code"] = f"working tree at {commit[:7]}" + (" (modified)" if dirty else "")
    else:
        got["code"] = f"git archive of {commit[:7]}" + (f" ({rev})" if not commit.startswith(rev) else "")
    for kind, rows in got["rows"].items():
        got.setdefault("exponent", {})[kind] = exponent(rows)
        got.setdefault("cpu_exponent", {})[kind] = exponent(rows, key=lambda r: r["cpu_s"])
    return got


def markdown(d: dict) -> str:
    lines = []
    versions = [(k, d[k]) for k in ("before", "after") if k in d]
    kinds = list(dict.fromkeys(k for _, v in versions for k in v["rows"]))
    for kind in kinds:
        layer = "3x3 convs (separable pairs)" if kind == "conv" else "Gemm layers (low-rank pairs)"
        lines += [f"**A chain of N {layer}, rank 2**: seconds for the whole `dsrewrite.onnx.rewrite` call", ""]
        head = "| N | " + " | ".join(f"{name} ({v['code']})" for name, v in versions)
        if len(versions) == 2:
            head += " | after / before"
        lines += [head + " |", "|---" * (1 + len(versions) + (len(versions) == 2)) + "|"]
        by_n = {name: {r["n"]: r for r in v["rows"].get(kind, [])} for name, v in versions}
        for n in sorted(set().union(*(set(b) for b in by_n.values()))):
            cells = [f"{by_n[name][n]['total_s']:.3f}" if n in by_n[name] else "-" for name, _ in versions]
            if len(versions) == 2 and all(n in by_n[name] for name, _ in versions):
                cells.append(f"{by_n['after'][n]['total_s'] / by_n['before'][n]['total_s']:.2f}x")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("| exponent (slope of log time vs log N) | "
                     + " | ".join(str(v["exponent"].get(kind)) for _, v in versions)
                     + (" | |" if len(versions) == 2 else " |"))
        lines.append("| exponent of the CPU time (all threads; less moved by other work on the machine) | "
                     + " | ".join(str(v["cpu_exponent"].get(kind)) for _, v in versions)
                     + (" | |" if len(versions) == 2 else " |"))
        lines.append("")
        for name, v in versions:  # the stages, each with its own exponent
            rows = v["rows"].get(kind, [])
            if not rows:
                continue
            stages = [s for s in STAGES + ("other",) if any(s in r["stages"] for r in rows)]
            lines += [f"Stages, {name} ({v['code']}): seconds at each N, and the exponent", "",
                      "| stage | " + " | ".join(f"N={r['n']}" for r in rows) + " | exponent |",
                      "|---" * (len(rows) + 2) + "|"]
            for s in stages:
                e = exponent(rows, key=lambda r, s=s: r["stages"].get(s, 0.0))
                lines.append(f"| {s} | " + " | ".join(f"{r['stages'].get(s, 0.0):.3f}" for r in rows)
                             + f" | {'-' if e is None else e} |")
            lines.append("")
    meta = d.get("meta", {})
    lines.append(f"{meta.get('date', '')}, {meta.get('machine', '')}; `{meta.get('command', '')}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="100,200,400,800,1600", help="chain lengths")
    ap.add_argument("--kinds", default="conv,gemm", help="conv and/or gemm")
    ap.add_argument("--repeats", type=int, default=2, help="runs per N, the best kept")
    ap.add_argument("--before", metavar="REV", help="also time dsrewrite as committed at REV (git archive)")
    ap.add_argument("--after", metavar="REV", default="tree", help="the code to time: a commit, or 'tree' "
                    "(the importable working tree; the default)")
    ap.add_argument("--out", default=os.path.join(HERE, "onnx_scale.json"))
    ap.add_argument("--md", default=os.path.join(HERE, "onnx_scale.md"))
    ap.add_argument("--table", metavar="JSON", help="only print the Markdown of an earlier run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ns, kinds = [int(n) for n in a.ns.split(",")], a.kinds.split(",")
    if a.table:
        with open(a.table) as f:
            print(markdown(json.load(f)))
        return
    if a.child:
        got = child(ns, kinds, a.repeats)
        with open(a.child, "w") as f:
            json.dump(got, f)
        return
    payload = {}
    for name, rev in (("before", a.before), ("after", None if a.after == "tree" else a.after)):
        if name == "before" and rev is None:
            continue
        print(f"{name}: {rev or 'working tree'}", file=sys.stderr, flush=True)
        payload[name] = run_version(rev, ns, kinds, a.repeats)
    import onnx
    import onnxruntime

    write_json(a.out, "onnx_scale.py", None, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, **payload)
    with open(a.out) as f:
        md = markdown(json.load(f))
    with open(a.md, "w") as f:
        f.write("# The ONNX route's rewrite time against the number of rewritten layers (issue 23, item 6)\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
