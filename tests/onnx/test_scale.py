"""The ONNX route's work grows linearly with the number of rewritten layers (issue 23, item 6).

Not wall time (flaky): the Python lines dsrewrite executes during ``dsrewrite.onnx.rewrite`` are counted with
``sys.settrace`` on chains of N layers. Per-layer work is the same for every layer of a chain, so for linear cost
the count is ``a + b * N`` and the increments from N to 2N to 4N double exactly; a search of the graph per layer
(a node looked up by scanning, an initializer found by name in a list) adds a term in N^2 that breaks that. The
whole-graph walks (scopes, use counts, taken names, the backend's one edit per graph) run a fixed number of times,
whatever N. The route's C-level edits cannot be counted as lines: the backend edits each graph once
(``_set_field``), counted among the walks.
"""
from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import dsrewrite.onnx as dx  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

# functions that walk a whole graph (or every graph): called a fixed number of times per rewrite
WALKS = {("onnx/scopes.py", "scopes"), ("onnx/scopes.py", "value_uses"), ("onnx/scopes.py", "taken_names"),
         ("onnx/scopes.py", "_own_definitions"), ("onnx/frontend.py", "collect_sites"), ("onnx/flops.py", "count_flops"),
         ("onnx/flops.py", "count_params"), ("onnx/backend.py", "_set_field"), ("onnx/backend.py", "commit")}


def _chain(n: int, kind: str, seed: int) -> "onnx.ModelProto":
    """``n`` 3x3 convs or ``Gemm`` layers in a row, each with its own weight and bias (fresh random weights, scaled
    by 1/sqrt(fan-in) so the activations stay finite: the self-check compares every layer)."""
    rng = np.random.default_rng(seed)
    shape, c = ([1, 4, 6, 6], 4) if kind == "conv" else ([3, 8], 8)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        w, b, out = f"w{i}", f"b{i}", f"t{i + 1}"
        if kind == "conv":
            inits.append(numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) / 6).astype(np.float32), w))
            nodes.append(helper.make_node("Conv", [prev, w, b], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal((c, c)) / c ** 0.5).astype(np.float32), w))
            nodes.append(helper.make_node("Gemm", [prev, w, b], [out], name=f"gemm{i}", transB=1))
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), b))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _work(n: int, kind: str, seed: int):
    """(lines of dsrewrite code executed, calls by (file, function)) while rewriting a chain of ``n`` layers."""
    model = _chain(n, kind, seed)
    options = dict(rank=2) if kind == "conv" else dict(rank=2, kinds="linear")
    lines, calls = [0], collections.Counter()

    def local(frame, event, arg):
        if event == "line":
            lines[0] += 1
        return local

    def outer(frame, event, arg):
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/dsrewrite/" not in path:
            return None  # torch, onnx, numpy: not traced
        calls[path.rsplit("/dsrewrite/", 1)[1], frame.f_code.co_name] += 1
        return local

    sys.settrace(outer)
    try:
        result = dx.rewrite(model, **options)
    finally:
        sys.settrace(None)
    assert sum(layer.rewritten for layer in result.report.layers) == n
    assert f"{n} rewritten layer(s) reproduce the original exactly" in " ".join(result.report.notes)
    return lines[0], calls


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_work_per_layer_is_constant(kind):
    seed = int(np_rng().integers(1 << 30))
    _work(3, kind, seed)  # first-use imports and caches out of the count
    ns = (16, 32, 64)
    work = {n: _work(n, kind, seed) for n in ns}
    lines = [work[n][0] for n in ns]
    d1, d2 = lines[1] - lines[0], lines[2] - lines[1]
    # linear: d2 == 2 * d1; the code before this change (a node search and an initializer search per layer)
    # gave d2 = 2.11 * d1 on both chains at these sizes
    assert abs(d2 - 2 * d1) <= 0.01 * d2, (kind, lines, d1, d2)
    for walk in sorted(WALKS):
        counts = [work[n][1][walk] for n in ns]
        assert counts[0] == counts[1] == counts[2], (walk, counts)
    assert work[ns[0]][1][("onnx/backend.py", "_set_field")] >= 1  # the backend's edit is among the walks
