"""ONNX backend: write each decided conv as a depthwise ``Conv`` followed by a 1x1 ``Conv``, editing the protobuf.

Only the rewritten convs change: each ``Conv`` node is replaced, in its own graph and at its own position, by
the pair; the weights it no longer needs are removed when nothing else reads them; every other node, value
info, subgraph and model field is left exactly as it was (no import/export round trip that could drop shapes
or copy outer-scope weights into subgraphs). Each graph's edits are gathered and made once at the end, one
pass per field, so the cost grows linearly with the layers rewritten (issue 23). The factors are stored where
the original weight was defined (the main graph's initializers for a subgraph conv reading a main-graph
weight), so a weight shared by several convs, in one graph or across ``If`` branches, gets one
depthwise/pointwise pair per rank.

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
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..plan.factorize import Factors
from ..ir import ConvSpec
from ..plan.planner import Decision
from .flops import attribute
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


class _GraphEdits:
    """The edits of one graph, gathered while the decisions are written and made at the end in one pass per
    repeated field (:func:`_set_field`): nodes replaced or removed and ``Constant`` nodes put first, found by
    position in a map built once, initializers, inputs and value infos removed by name. Editing the protobuf per
    rewritten layer (a search for the node, a ``del`` and ``insert`` that shift the rest) would cost the whole
    graph per layer."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.replace: Dict[int, List[onnx.NodeProto]] = {}  # position -> the nodes that take its place
        self.drop_nodes: set = set()  # positions
        self.first: List[onnx.NodeProto] = []  # Constant nodes of a subgraph before IR 4, ahead of the rest
        self.drop_names = {"initializer": set(), "input": set(), "value_info": set()}
        self._position: Optional[Dict[str, int]] = None

    def position(self, output: str) -> Optional[int]:
        """Where the node that writes ``output`` stands in the unedited graph (value names are unique in a graph)."""
        if self._position is None:
            self._position = {o: i for i, n in enumerate(self.scope.graph.node) for o in n.output if o}
        return self._position.get(output)

    def commit(self) -> None:
        g = self.scope.graph
        if self.replace or self.drop_nodes or self.first:
            nodes: List[onnx.NodeProto] = list(self.first)
            for i, n in enumerate(g.node):
                if i in self.replace:
                    nodes.extend(self.replace[i])
                elif i not in self.drop_nodes:
                    nodes.append(n)
            _set_field(g.node, nodes)
        for field, names in self.drop_names.items():
            if names:
                _set_field(getattr(g, field), [m for m in getattr(g, field) if m.name not in names])


def _set_field(field, items: List) -> None:
    """Make the repeated message field ``field`` hold ``items``, in that order: messages of the field itself (moved,
    not copied, so the subgraphs and weights they hold are not duplicated) and new ones (copied in). One pass: the
    new messages appended, a sort by wanted position (the runtime reorders its pointers), the unwanted tail cut."""
    current = list(field)  # held, so no object id below is reused while this runs
    own = {id(m) for m in current}
    start = len(current)
    field.extend(m for m in items if id(m) not in own)
    added = iter(field[start:])
    final = [m if id(m) in own else next(added) for m in items]
    rank = {id(m): k for k, m in enumerate(final)}
    field.sort(key=lambda m: rank.get(id(m), len(final)))
    if len(field) < len(final) or any(a is not b for a, b in zip(field, final)):  # a protobuf runtime that
        del field[:]  # hands out new objects: copy them back (subgraphs are edited before the graphs holding them)
        field.extend(final)
    else:
        del field[len(final):]


def _add_constant(scope: Scope, name: str, value: np.ndarray, ir_version: int, edits: "_Edits") -> None:
    """Store ``value`` as ``name`` in ``scope``'s graph: an initializer, or before IR 4 (initializers must then
    be graph inputs, and a subgraph's inputs are bound by position) a ``Constant`` node of a subgraph."""
    tensor = numpy_helper.from_array(value, name)
    if ir_version >= 4:
        scope.graph.initializer.append(tensor)
    elif scope.is_main:
        scope.graph.initializer.append(tensor)
        scope.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    else:
        edits(scope).first.append(helper.make_node("Constant", [], [name], value=tensor))


def _remove_dead(scope: Scope, name: str, uses: Counter, edits: "_Edits") -> None:
    """Remove what defined ``name`` (seen from ``scope``) once nothing reads it: initializers, ``Constant``
    nodes and ``Identity`` chains, following the chain while its values fall out of use."""
    while uses[name] <= 0:
        d = scope.lookup(name)
        if d is None or d.kind == "input":
            return
        e = edits(d.scope)
        if d.kind == "initializer":
            if d.scope.is_main:
                e.drop_names["input"].add(name)
            elif name in d.scope.input_names:
                return  # a subgraph input (IR < 4): bound by position, keep it
            e.drop_names["initializer"].add(name)
            nxt = None
        elif d.node.op_type in ("Identity", "Constant") and len(d.node.output) == 1:
            i = e.position(name)
            if i is None or i in e.drop_nodes:
                return
            nxt = d.node.input[0] if d.node.op_type == "Identity" and d.node.input else None
            e.drop_nodes.add(i)
        else:
            return
        e.drop_names["value_info"].add(name)
        if nxt is None:
            return
        uses[nxt] -= 1
        scope, name = d.scope, nxt


class _Edits(dict):
    """The :class:`_GraphEdits` of every graph touched, by scope: ``edits(scope)``; made children first."""

    def __call__(self, scope: Scope) -> _GraphEdits:
        if scope not in self:
            self[scope] = _GraphEdits(scope)
        return self[scope]

    def commit(self) -> None:
        def depth(s: Scope) -> int:
            return 0 if s.parent is None else 1 + depth(s.parent)

        for e in sorted(self.values(), key=lambda e: -depth(e.scope)):  # a subgraph before the node holding it
            e.commit()


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
    edits = _Edits()
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
            _add_constant(home, a_name, a, model.ir_version, edits)
            _add_constant(home, b_name, b, model.ir_version, edits)
            index = None
            if f.channel_index is not None:
                index = names(f"{h.weight}.channel_index")
                _add_constant(home, index, _numpy(f.channel_index).astype(np.int64), model.ir_version, edits)
            pairs[key] = (a_name, b_name, index, int(f.depthwise.shape[0]))
        dw_name, pw_name, index, filters = pairs[key]
        bias = h.bias
        if d.calibrated and f.bias is not None and h.bias is not None:  # refitted with the pointwise weights
            bias = names(f"{h.weight}.{second}_bias")
            _add_constant(h.source.scope, bias, _numpy(f.bias), model.ir_version, edits)

        node = h.node
        if lowrank:
            new = lowrank_nodes(node, d.site.spec, dw_name, pw_name, bias, names, h.node_name, opset=opset,
                                own_bias=bias == h.bias)
        else:
            new = pair_nodes(node, d.site.spec, dw_name, pw_name, bias, names, h.node_name,
                             channel_index=index, filters=filters)
        e = edits(h.scope)
        e.replace[e.position(node.output[0])] = new
        uses[h.weight] -= 1
        _remove_dead(h.scope, h.weight, uses, edits)
        if bias != h.bias:
            uses[h.bias] -= 1
            _remove_dead(h.scope, h.bias, uses, edits)
    edits.commit()
    return len(todo)
