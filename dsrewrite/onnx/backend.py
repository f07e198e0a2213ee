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
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir import ConvSpec
from ..pipeline import Decision
from .scopes import Scope, scopes, taken_names, value_uses

__all__ = ["apply_decisions", "pair_nodes", "depthwise_attributes", "UniqueNames"]


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


def apply_decisions(model: onnx.ModelProto, decisions: List[Decision]) -> int:
    """Replace every rewritten decision's node in ``model`` (in place); returns how many convs were replaced.

    The sites' handles must point into ``model`` (:func:`dsrewrite.onnx.frontend.collect_sites` on it).
    """
    todo = [d for d in decisions if d.rewritten]
    if not todo:
        return 0
    all_scopes = scopes(model.graph)
    names = UniqueNames(taken_names(all_scopes))
    uses = value_uses(all_scopes)
    pairs: Dict[Tuple[int, int], Tuple[str, str, Optional[str], int]] = {}  # one pair per shared weight and rank
    for d in todo:
        h, f = d.site.handle, d.factors
        key = (id(h.source), f.rank, id(d) if d.calibrated else None)
        if key not in pairs:
            home = h.source.scope  # where the original weight is defined: visible from every conv that reads it
            dw_name, pw_name = names(f"{h.weight}.depthwise"), names(f"{h.weight}.pointwise")
            _add_constant(home, dw_name, _numpy(f.depthwise), model.ir_version)
            _add_constant(home, pw_name, _numpy(f.pointwise), model.ir_version)
            index = None
            if f.channel_index is not None:
                index = names(f"{h.weight}.channel_index")
                _add_constant(home, index, _numpy(f.channel_index).astype(np.int64), model.ir_version)
            pairs[key] = (dw_name, pw_name, index, int(f.depthwise.shape[0]))
        dw_name, pw_name, index, filters = pairs[key]
        bias = h.bias
        if d.calibrated and f.bias is not None and h.bias is not None:  # refitted with the pointwise weights
            bias = names(f"{h.weight}.pointwise_bias")
            _add_constant(h.source.scope, bias, _numpy(f.bias), model.ir_version)

        node, graph = h.node, h.scope.graph
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
