"""ONNX backend: write each decided conv as a depthwise ``Conv`` followed by a 1x1 ``Conv``, editing the protobuf.

Only the rewritten convs change: each ``Conv`` node is replaced, in its own graph and at its own position, by
the pair; the weights it no longer needs are removed when nothing else reads them; every other node, value
info, subgraph and model field is left exactly as it was (no import/export round trip that could drop shapes
or copy outer-scope weights into subgraphs). The factors are stored where the original weight was defined
(the main graph's initializers for a subgraph conv reading a main-graph weight), so a weight shared by
several convs, in one graph or across ``If`` branches, gets one depthwise/pointwise pair per rank.

The depthwise conv (``group=Cin``, ``Cin*r`` outputs) keeps the original's ``strides``, ``dilations``,
``pads`` / ``auto_pad`` and ``kernel_shape``, so it does all the padding and the output has the original
spatial size; the pointwise conv has no padding and carries the bias. Names derive from the original:
node ``<name>_depthwise`` / ``<name>_pointwise``, weights ``<weight>.depthwise`` / ``<weight>.pointwise`` (and
``<weight>.pointwise_bias`` for a bias refitted by calibration; calibrated factors belong to their conv alone).
The pointwise conv writes the original output tensor, so consumers and graph outputs are untouched.
Ragged ranks (one filter per ``channel_index`` entry) add a ``Gather`` on the channel axis before a
depthwise conv with ``group`` = filters (node ``<name>_gather``, indices ``<weight>.channel_index``).

A low-rank pair (a 1x1 ``Conv``, a ``Gemm`` or ``MatMul`` with a constant weight) is the same node twice: the
reduction to ``k`` channels (node ``<name>_reduce``, weight ``<weight>.reduce``), then the expansion to the
output (``<name>_expand``, ``<weight>.expand``, with the bias). A 1x1 ``Conv``'s reduction keeps its strides and
pads; a ``Gemm``'s pair uses ``transB=1`` weights ``[k, Cin]`` / ``[Cout, k]`` (``alpha`` is in the factors; the
expansion keeps ``C`` and ``beta``), its reduction a ``MatMul`` before opset 11 (``C`` required there); a
``MatMul``'s pair is two ``MatMul`` nodes with ``[Cin, k]`` and ``[k, Cout]`` weights.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..factorize import Factors
from ..ir import ConvSpec
from ..pipeline import Decision
from .scopes import DEFAULT_DOMAINS, Scope, scopes, taken_names, value_uses

__all__ = ["apply_decisions", "pair_nodes", "lowrank_nodes", "lowrank_arrays", "depthwise_attributes", "opset_of",
           "UniqueNames"]


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


class UniqueNames:
    """Unique tensor and node names: the derived name, or with ``_2``, ``_3`` ... if it is taken."""

    def __init__(self, taken: set) -> None:
        self.taken = taken

    def __call__(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.taken:
            i += 1
            candidate = f"{name}_{i}"
        self.taken.add(candidate)
        return candidate


def _index_of(graph: onnx.GraphProto, output: str) -> Optional[int]:
    """Position of the node that writes ``output`` in ``graph`` (value names are unique within a graph)."""
    return next((i for i, n in enumerate(graph.node) if output in n.output), None)


def _replace(graph: onnx.GraphProto, index: int, nodes: Sequence[onnx.NodeProto]) -> None:
    del graph.node[index]
    for k, n in enumerate(nodes):
        graph.node.insert(index + k, n)


def _add_constant(scope: Scope, name: str, value: np.ndarray, ir_version: int) -> None:
    """Store ``value`` as ``name`` in ``scope``'s graph: an initializer, or before IR 4 (initializers must then
    be graph inputs, and a subgraph's inputs are bound by position) a ``Constant`` node of a subgraph."""
    tensor = numpy_helper.from_array(value, name)
    if ir_version >= 4:
        scope.graph.initializer.append(tensor)
    elif scope.is_main:
        scope.graph.initializer.append(tensor)
        scope.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    else:
        scope.graph.node.insert(0, helper.make_node("Constant", [], [name], value=tensor))


def _remove_dead(scope: Scope, name: str, uses: Counter) -> None:
    """Remove what defined ``name`` (seen from ``scope``) once nothing reads it: initializers, ``Constant``
    nodes and ``Identity`` chains, following the chain while its values fall out of use."""
    while uses[name] <= 0:
        d = scope.lookup(name)
        if d is None or d.kind == "input":
            return
        g = d.scope.graph
        if d.kind == "initializer":
            if d.scope.is_main:
                inputs = [i for i, vi in enumerate(g.input) if vi.name == name]
                for i in reversed(inputs):
                    del g.input[i]
            elif any(vi.name == name for vi in g.input):
                return  # a subgraph input (IR < 4): bound by position, keep it
            i = next((i for i, t in enumerate(g.initializer) if t.name == name), None)
            if i is not None:
                del g.initializer[i]
            nxt = None
        elif d.node.op_type in ("Identity", "Constant") and len(d.node.output) == 1:
            i = _index_of(g, name)
            if i is None:
                return
            nxt = d.node.input[0] if d.node.op_type == "Identity" and d.node.input else None
            del g.node[i]
        else:
            return
        for i in reversed([i for i, vi in enumerate(g.value_info) if vi.name == name]):
            del g.value_info[i]
        if nxt is None:
            return
        uses[nxt] -= 1
        scope, name = d.scope, nxt


def depthwise_attributes(node: onnx.NodeProto, group: int) -> List[onnx.AttributeProto]:
    """The depthwise conv's attributes: the original conv's own (``kernel_shape``, ``strides``, ``dilations``,
    ``pads`` or ``auto_pad``) with ``group`` replaced. The one translation of the original's settings: the
    backend and the self-check (:mod:`.selfcheck`) both go through it."""
    attrs = [a for a in node.attribute if a.name != "group"]
    attrs.append(helper.make_attribute("group", int(group)))
    return attrs


def pair_nodes(node: onnx.NodeProto, spec: ConvSpec, depthwise: str, pointwise: str, bias: Optional[str],
               names: Callable[[str], str], base: str, *, channel_index: Optional[str] = None,
               filters: int = 0) -> List[onnx.NodeProto]:
    """The nodes that replace the conv ``node``: [``Gather``,] depthwise ``Conv``, 1x1 ``Conv``.

    Args:
        node: the original ``Conv``; the pair reads its input and writes its output tensor.
        spec: the conv's spec (its input channels are the depthwise ``group`` without ``channel_index``).
        depthwise / pointwise / bias: names of the factor weights and of the bias (``None``: no bias).
        names: makes a derived tensor or node name unique (``name -> name`` or ``name_2`` ...).
        base: the original node's name, the stem of the new names.
        channel_index: ragged ranks: name of the ``Gather`` indices (one per depthwise filter), ``filters`` of them.
    """
    x, y = node.input[0], node.output[0]
    new: List[onnx.NodeProto] = []
    if channel_index is not None:
        gathered = names(f"{base}_gather_output_0")
        new.append(helper.make_node("Gather", [x, channel_index], [gathered], name=names(f"{base}_gather"), axis=1))
        x = gathered
    mid = names(f"{base}_depthwise_output_0")
    dw = helper.make_node("Conv", [x, depthwise], [mid], name=names(f"{base}_depthwise"), domain=node.domain)
    dw.attribute.extend(depthwise_attributes(node, spec.in_channels if channel_index is None else filters))
    pw = helper.make_node("Conv", [mid, pointwise] + ([bias] if bias is not None else []), [y],
                          name=names(f"{base}_pointwise"), domain=node.domain, kernel_shape=[1] * len(spec.kernel))
    return new + [dw, pw]


def opset_of(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain."""
    return next((int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def _layout(node: onnx.NodeProto) -> tuple:
    """What decides a low-rank pair's stored weights besides the factors: the op and, for ``Gemm``, ``transB`` and
    ``alpha`` (two nodes sharing one weight share a pair only when these agree)."""
    from .flops import attribute

    if node.op_type == "Gemm":
        return ("Gemm", bool(attribute(node, "transB", 0)), float(attribute(node, "alpha", 1.0)))
    return (node.op_type,)


def lowrank_arrays(node: onnx.NodeProto, factors: Factors, opset: int) -> Tuple[np.ndarray, np.ndarray]:
    """The reduction and expansion weights of a low-rank pair in the layout :func:`lowrank_nodes` reads them:
    ``[k, Cin, 1...]`` / ``[Cout, k, 1...]`` for a 1x1 ``Conv``, ``[k, Cin]`` / ``[Cout, k]`` for a ``Gemm``
    (``transB=1``; ``[Cin, k]`` for its ``MatMul`` reduction before opset 11), ``[Cin, k]`` / ``[k, Cout]`` for a
    ``MatMul``."""
    r, e = _numpy(factors.depthwise), _numpy(factors.pointwise)
    if node.op_type == "MatMul":
        r, e = r.T, e.T
    elif node.op_type == "Gemm" and opset < 11:
        r = r.T
    return np.ascontiguousarray(r), np.ascontiguousarray(e)


def lowrank_nodes(node: onnx.NodeProto, spec: ConvSpec, reduce: str, expand: str, bias: Optional[str],
                  names: Callable[[str], str], base: str, *, opset: int, own_bias: bool = True
                  ) -> List[onnx.NodeProto]:
    """The two nodes that replace a 1x1 ``Conv``, a ``Gemm`` or a ``MatMul``: the reduction, then the expansion.

    Args:
        node: the original node; the pair reads its input and writes its output tensor.
        reduce / expand: names of the weights (:func:`lowrank_arrays`'s layout); ``bias`` of the bias or ``None``.
        own_bias: ``bias`` is the node's own (a ``Gemm``'s ``C``, scaled by its ``beta``); ``False``: a ``[Cout]``
            vector added as it is (a refitted bias).
        opset: the model's default-domain opset (a ``Gemm`` without ``C`` needs 11).
    """
    x, y, op = node.input[0], node.output[0], node.op_type
    mid = names(f"{base}_reduce_output_0")
    red_name, exp_name = names(f"{base}_reduce"), names(f"{base}_expand")
    extra = [bias] if bias is not None else []
    if op == "Conv":
        red = helper.make_node("Conv", [x, reduce], [mid], name=red_name, domain=node.domain)
        red.attribute.extend(depthwise_attributes(node, 1))  # strides, pads / auto_pad, dilations: the original's
        exp = helper.make_node("Conv", [mid, expand] + extra, [y], name=exp_name, domain=node.domain,
                               kernel_shape=[1] * len(spec.kernel))
    elif op == "Gemm":
        if opset >= 11:
            red = helper.make_node("Gemm", [x, reduce], [mid], name=red_name, domain=node.domain, transB=1)
        else:
            red = helper.make_node("MatMul", [x, reduce], [mid], name=red_name, domain=node.domain)
        exp = helper.make_node("Gemm", [mid, expand] + extra, [y], name=exp_name, domain=node.domain, transB=1)
        drop = {"alpha", "transA", "transB"} | ({"beta"} if not (own_bias and bias is not None) else set())
        exp.attribute.extend(a for a in node.attribute if a.name not in drop)  # beta with its own C
    elif op == "MatMul":
        red = helper.make_node("MatMul", [x, reduce], [mid], name=red_name, domain=node.domain)
        exp = helper.make_node("MatMul", [mid, expand], [y], name=exp_name, domain=node.domain)
    else:
        raise ValueError(f"no low-rank pair for a {op} node")
    return [red, exp]


def apply_decisions(model: onnx.ModelProto, decisions: List[Decision]) -> int:
    """Replace every rewritten decision's node in ``model`` (in place); returns how many layers were replaced.

    The sites' handles must point into ``model`` (:func:`dsrewrite.onnx.frontend.collect_sites` on it).
    """
    todo = [d for d in decisions if d.rewritten]
    if not todo:
        return 0
    all_scopes = scopes(model.graph)
    names = UniqueNames(taken_names(all_scopes))
    uses = value_uses(all_scopes)
    opset = opset_of(model)
    pairs: Dict[tuple, Tuple[str, str, Optional[str], int]] = {}  # one pair per shared weight, rank and layout
    for d in todo:
        h, f = d.site.handle, d.factors
        lowrank = f.lowrank
        key = (id(h.source), f.rank, _layout(h.node) if lowrank else None, id(d) if d.calibrated else None)
        first, second = ("reduce", "expand") if lowrank else ("depthwise", "pointwise")
        if key not in pairs:
            home = h.source.scope  # where the original weight is defined: visible from every conv that reads it
            a_name, b_name = names(f"{h.weight}.{first}"), names(f"{h.weight}.{second}")
            a, b = lowrank_arrays(h.node, f, opset) if lowrank else (_numpy(f.depthwise), _numpy(f.pointwise))
            _add_constant(home, a_name, a, model.ir_version)
            _add_constant(home, b_name, b, model.ir_version)
            index = None
            if f.channel_index is not None:
                index = names(f"{h.weight}.channel_index")
                _add_constant(home, index, _numpy(f.channel_index).astype(np.int64), model.ir_version)
            pairs[key] = (a_name, b_name, index, int(f.depthwise.shape[0]))
        dw_name, pw_name, index, filters = pairs[key]
        bias = h.bias
        if d.calibrated and f.bias is not None and h.bias is not None:  # refitted with the pointwise weights
            bias = names(f"{h.weight}.{second}_bias")
            _add_constant(h.source.scope, bias, _numpy(f.bias), model.ir_version)

        node, graph = h.node, h.scope.graph
        if lowrank:
            new = lowrank_nodes(node, d.site.spec, dw_name, pw_name, bias, names, h.node_name, opset=opset,
                                own_bias=bias == h.bias)
        else:
            new = pair_nodes(node, d.site.spec, dw_name, pw_name, bias, names, h.node_name,
                             channel_index=index, filters=filters)
        position = _index_of(graph, node.output[0])
        _replace(graph, position, new)
        uses[h.weight] -= 1
        _remove_dead(h.scope, h.weight, uses)
        if bias != h.bias:
            uses[h.bias] -= 1
            _remove_dead(h.scope, h.bias, uses)
    return len(todo)
