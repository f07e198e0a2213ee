"""The ONNX route's per-layer self-check: a rewritten conv ships only if its pair, made exact, reproduces it.

As on the torch routes (:mod:`dsrewrite.plan.selfcheck`): the original model runs once in onnxruntime (CPU) on random
inputs (fixed seed; the shapes of the report, as :mod:`.measure` makes them), on a copy whose graph outputs also
give each rewritten main-graph conv's input ``X`` and output ``Y`` (first batch item only). Each pair is then
emitted by the backend's own :func:`~.backend.pair_nodes` (so with the same attribute translation) from the
*exact* factors (:func:`dsrewrite.plan.factorize.exact_factors`: one-hot depthwise filters, the weight as the pointwise
conv; for a low-rank pair, :func:`~.backend.lowrank_nodes` from the identity then the weight), run alone in
onnxruntime on ``X`` in float32 and compared with ``Y`` (a ``Gemm``'s whole input: its rows are the batch). A
mismatch turns the decision into a skip with the reason. Cheap: one run of the original, one tiny run per
rewritten layer.

Convs inside ``If`` / ``Loop`` / ``Scan`` bodies are not checked (their values cannot be graph outputs), nor is
anything when the model cannot run (symbolic input dims, an op onnxruntime lacks): the note says why, the
rewrite goes on.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import first_line
from ..plan.factorize import exact_factors
from ..plan.planner import Decision
from ..plan.selfcheck import Tally, tolerance
from . import measure as onnx_measure  # called through the module: tests patch session
from .backend import UniqueNames, lowrank_arrays, lowrank_nodes, opset_of, pair_nodes
from .model_io import LARGE, model_nbytes
from .scopes import scopes, taken_names

__all__ = ["self_check"]

_SEED = 0
_Probe = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # X, Y, run-time bias (first batch item)


def self_check(model: onnx.ModelProto, decisions: List[Decision], inputs: Mapping[str, Tuple[int, ...]]) -> str:
    """Check every rewritten decision's pair against the original conv of ``model`` (not changed); failing
    decisions become skips. ``inputs``: static shapes by input name (``Shapes.inputs``; 0 marks a symbolic dim).
    Returns the report note ("" when nothing was rewritten). Never raises for a model it cannot run."""
    todo = [d for d in decisions if d.rewritten]
    if not todo:
        return ""
    main = [d for d in todo if d.site.handle.scope.is_main]
    inner = len(todo) - len(main)
    probes: Dict[int, _Probe] = {}
    why_not = _why_not_runnable(model, inputs) if main else None
    if main and why_not is None:
        probes, why_not = _run_original(model, main, inputs)
    tally, odd = Tally(), 0
    for d in main if why_not is None else []:
        probe = probes[id(d)]
        if not all(np.isfinite(a).all() for a in probe if a is not None):
            odd += 1  # NaN/inf on the random inputs (a Log, a division upstream): nothing to compare
            continue
        err, why = _compare(model, d, probe)
        tol = tolerance(torch.from_numpy(np.ascontiguousarray(probe[1].ravel()[:1])))
        tally.judge(d, err, why, tol)
    unchecked = [(odd, "non-finite values on the random inputs"), (inner, "inside a subgraph")]
    if why_not is not None:
        return "; ".join([f"self-check: not run ({why_not}): {len(main)} rewritten layer(s) not checked"]
                         + [f"{n} not checked ({w})" for n, w in unchecked if n])
    return tally.note(unchecked)


def _why_not_runnable(model: onnx.ModelProto, inputs: Mapping[str, Tuple[int, ...]]) -> Optional[str]:
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        shape = inputs.get(vi.name)
        if shape is None:
            return f"input {vi.name!r} is not a tensor of known rank"
        if 0 in shape:
            return f"input {vi.name!r} has symbolic dims: give input_shapes (--input-shape)"
    if model_nbytes(model) >= LARGE:
        return "the model is over the 2 GB protobuf limit"
    return None


def _run_original(model: onnx.ModelProto, decisions: List[Decision],
                  inputs: Mapping[str, Tuple[int, ...]]) -> Tuple[Dict[int, _Probe], Optional[str]]:
    """Run a copy of ``model`` exposing each conv's X, Y (and run-time bias) as extra outputs, first batch item.

    The copy is the serialised model followed by a serialised ``ModelProto`` holding only the extra nodes and
    outputs: parsing concatenated messages merges them (repeated fields append), so the weights are not copied
    once more in memory."""
    extra = onnx.ModelProto()
    g = extra.graph
    names = UniqueNames(taken_names(scopes(model.graph)))
    first = names("selfcheck_first_item")
    g.node.append(helper.make_node("Constant", [], [first], name=names("selfcheck_first_item_node"),
                                   value=numpy_helper.from_array(np.zeros(1, np.int64))))
    exposed: Dict[Tuple[str, bool], str] = {}  # (tensor, first item only) -> graph output giving it

    def expose(tensor: str, dtype, batched: bool) -> str:
        if (tensor, batched) not in exposed:
            out = names(f"{tensor}_selfcheck")
            if batched:  # only the first item of the batch: the conv is per item, and it keeps memory small
                g.node.append(helper.make_node("Gather", [tensor, first], [out], name=names(f"{out}_gather"), axis=0))
            else:
                g.node.append(helper.make_node("Identity", [tensor], [out], name=names(f"{out}_identity")))
            g.output.append(helper.make_tensor_value_info(out, helper.np_dtype_to_tensor_dtype(dtype), None))
            exposed[tensor, batched] = out
        return exposed[tensor, batched]

    wanted = []
    for d in decisions:
        node, dtype = d.site.handle.node, np.asarray(d.site.weight).dtype
        bias = d.site.handle.bias if d.site.handle.bias is not None and d.site.bias is None else None
        per_item = node.op_type != "Gemm"  # a Gemm's rows are its batch, and its run-time C may be [M, N]
        wanted.append((d, expose(node.input[0], dtype, per_item), expose(node.output[0], dtype, per_item),
                       None if bias is None else expose(bias, dtype, False)))
    outputs = list(exposed.values())
    try:
        sess = onnx_measure.session(model.SerializeToString() + extra.SerializeToString(), once=True)
    except Exception as e:  # noqa: BLE001 - an op onnxruntime lacks, a model it refuses: say why, go on
        return {}, f"onnxruntime cannot load the model ({first_line(e, 120)})"
    feeds = onnx_measure.random_feeds(model, inputs, np.random.default_rng(_SEED))
    try:
        values = dict(zip(outputs, sess.run(outputs, feeds)))
    except Exception as e:  # noqa: BLE001
        return {}, f"onnxruntime failed to run the model on random inputs ({first_line(e, 200)})"
    return {id(d): (values[x], values[y], None if b is None else values[b]) for d, x, y, b in wanted}, None


def _compare(model: onnx.ModelProto, d: Decision, probe: _Probe) -> Tuple[Optional[float], str]:
    """(relative error, "") of the exact pair on the probe, or (None, why it could not be compared)."""
    x, y, run_bias = probe
    h, spec = d.site.handle, d.site.spec
    exact = exact_factors(np.asarray(d.site.weight, np.float32),
                          None if d.site.bias is None else np.asarray(d.site.bias, np.float32), lowrank=spec.lowrank)
    node = h.node
    x_name, y_name = node.input[0], node.output[0]
    names = UniqueNames({x_name, y_name})
    dw, pw = names("depthwise"), names("pointwise")
    bias = names("bias") if h.bias is not None else None
    opset = opset_of(model)
    first, second = (lowrank_arrays(node, exact, opset) if spec.lowrank
                     else (exact.depthwise.numpy(), exact.pointwise.numpy()))
    init = [numpy_helper.from_array(first, dw), numpy_helper.from_array(second, pw)]
    graph_inputs = [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, list(x.shape))]
    feeds = {x_name: x.astype(np.float32)}
    if bias is not None and exact.bias is not None:
        init.append(numpy_helper.from_array(exact.bias.numpy(), bias))
    elif bias is not None:
        graph_inputs.append(helper.make_tensor_value_info(bias, onnx.TensorProto.FLOAT, list(run_bias.shape)))
        feeds[bias] = run_bias.astype(np.float32)
    if spec.lowrank:  # a constant bias is the site's (beta * C as one row); a run-time one keeps its beta
        nodes = lowrank_nodes(node, spec, dw, pw, bias, names, h.node_name, opset=opset, own_bias=exact.bias is None)
    else:
        nodes = pair_nodes(node, spec, dw, pw, bias, names, h.node_name)
    graph = helper.make_graph(nodes, "selfcheck", graph_inputs,
                              [helper.make_tensor_value_info(y_name, onnx.TensorProto.FLOAT, None)], init)
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import))
    tiny.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs
    try:
        out = onnx_measure.session(tiny, threads=1, once=True).run([y_name], feeds)[0]
    except Exception as e:  # noqa: BLE001 - a pair that does not run on the layer's input is a failure too
        return None, f"the pair does not run on the layer's input ({first_line(e, 120)})"
    if out.shape != y.shape:
        return None, f"output shape {tuple(out.shape)} instead of {tuple(y.shape)}"
    ref = y.astype(np.float64)
    scale = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(out.astype(np.float64) - ref))
    return (diff / scale if scale > 0 else diff), ""
