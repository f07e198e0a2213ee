"""The graphs of an ONNX model and the lexical scopes of their values, read straight from the protobuf.

A model is its main graph plus every subgraph held in a node attribute (``If`` branches, ``Loop`` / ``Scan``
bodies, nested to any depth). A subgraph may use any value of the graphs around it, so a name is looked up in
its own graph first, then outwards (:meth:`Scope.lookup`). The frontend reads conv weights through these
scopes, the backend edits only the graphs it rewrites, and the parameter count visits every graph once.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

from ..errors import first_line

__all__ = ["Scope", "Definition", "scopes", "subgraphs", "reads", "value_uses", "taken_names", "constant_value",
           "stored_tensors", "DEFAULT_DOMAINS"]

DEFAULT_DOMAINS = ("", "ai.onnx")


def subgraphs(node: onnx.NodeProto) -> Iterator[Tuple[str, onnx.GraphProto]]:
    """``(attribute name, graph)`` for every graph a node holds; ``name[i]`` for a list of graphs."""
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def reads(node: onnx.NodeProto) -> set:
    """Every value name ``node`` reads: its inputs and, through ``If`` / ``Loop`` / ``Scan`` bodies, the outer
    values those use (a superset: names defined inside the bodies are included and harmless)."""
    names = {i for i in node.input if i}
    for _, g in subgraphs(node):
        for n in g.node:
            names |= reads(n)
        names |= {o.name for o in g.output}
    return names


@dataclass
class Definition:
    """Where a value is defined: ``kind`` is ``initializer``, ``input`` or ``node`` (then ``node`` produced it)."""

    scope: "Scope"
    kind: str
    name: str
    tensor: Optional[onnx.TensorProto] = None
    node: Optional[onnx.NodeProto] = None


@dataclass(eq=False)
class Scope:
    """One graph of the model: ``parent`` is the graph around it (``None`` for the main graph) and ``where`` the
    path of the node attribute that holds it (``"If_0/then_branch"``; ``""`` for the main graph)."""

    graph: onnx.GraphProto
    parent: Optional["Scope"] = None
    where: str = ""
    _defs: Optional[Dict[str, Definition]] = field(default=None, repr=False)  # by name, built on first lookup
    _inputs: Optional[frozenset] = field(default=None, repr=False)

    def definitions(self) -> Dict[str, Definition]:
        """What this graph itself defines, by value name (built on first use: walking the graphs of a model does
        not need it)."""
        if self._defs is None:
            self._defs = _own_definitions(self)
        return self._defs

    @property
    def input_names(self) -> frozenset:
        """The names of this graph's inputs (built once)."""
        if self._inputs is None:
            self._inputs = frozenset(vi.name for vi in self.graph.input)
        return self._inputs

    @property
    def is_main(self) -> bool:
        return self.parent is None

    def lookup(self, name: str) -> Optional[Definition]:
        """The definition ``name`` refers to from this graph (own graph first, then the enclosing ones)."""
        scope: Optional[Scope] = self
        while scope is not None:
            d = scope.definitions().get(name)
            if d is not None:
                return d
            scope = scope.parent
        return None

    def qualified(self, name: str) -> str:
        """A node name as the report shows it: prefixed with where its graph lives (subgraphs only)."""
        return f"{self.where}/{name.lstrip('/')}" if self.where else name


def _own_definitions(scope: Scope) -> Dict[str, Definition]:
    """The initializers, inputs and node outputs of ``scope``'s graph, by name (an initializer wins over an input
    of the same name: IR < 4 lists initializers as inputs)."""
    defs: Dict[str, Definition] = {}
    for t in scope.graph.initializer:
        defs[t.name] = Definition(scope, "initializer", t.name, tensor=t)
    for vi in scope.graph.input:
        defs.setdefault(vi.name, Definition(scope, "input", vi.name))
    for node in scope.graph.node:
        for out in node.output:
            if out:
                defs[out] = Definition(scope, "node", out, node=node)
    return defs


def scopes(graph: onnx.GraphProto) -> List[Scope]:
    """The main graph and every subgraph below it, parents before children, in node order."""
    out: List[Scope] = []

    def visit(scope: Scope) -> None:
        out.append(scope)
        for i, node in enumerate(scope.graph.node):
            owner = node.name or f"{node.op_type}_{i}"
            for attr, sub in subgraphs(node):
                visit(Scope(sub, scope, scope.qualified(f"{owner}/{attr}")))

    visit(Scope(graph))
    return out


def stored_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model stores, once each: initializers, sparse initializers' values and ``Constant`` nodes'
    ``value`` / ``sparse_value`` tensors, of the main graph and of every subgraph."""
    for scope in scopes(graph):
        g = scope.graph
        yield from g.initializer
        for t in g.sparse_initializer:
            yield t.values
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                for a in node.attribute:
                    if a.name == "value" and a.type == AttributeProto.TENSOR:
                        yield a.t
                    elif a.name == "sparse_value" and a.type == AttributeProto.SPARSE_TENSOR:
                        yield a.sparse_tensor.values


def value_uses(all_scopes: List[Scope]) -> Counter:
    """How often each value name is read: node inputs and graph outputs of every graph (by name, so a value
    of one branch and a same-named value of a sibling branch count together: never too few)."""
    uses: Counter = Counter()
    for s in all_scopes:
        for node in s.graph.node:
            uses.update(i for i in node.input if i)
        uses.update(o.name for o in s.graph.output)
    return uses


def taken_names(all_scopes: List[Scope]) -> set:
    """Every value and node name used anywhere in the model (new names must avoid all of them)."""
    names = set()
    for s in all_scopes:
        g = s.graph
        names.update(t.name for t in g.initializer)
        names.update(t.values.name for t in g.sparse_initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            if node.name:
                names.add(node.name)
    names.discard("")
    return names


def _array(t: onnx.TensorProto, d: Definition) -> Tuple[Optional[np.ndarray], Optional[str], Optional[Definition]]:
    try:
        return np.require(numpy_helper.to_array(t), requirements="W"), None, d  # writable: torch takes it as is
    except Exception as e:  # noqa: BLE001 - a data type numpy cannot hold, or malformed data
        return None, f"{t.name!r} cannot be read as an array ({first_line(e, 120)})", None


def constant_value(scope: Scope, name: str) -> Tuple[Optional[np.ndarray], Optional[str], Optional[Definition]]:
    """``(values, None, definition)`` when ``name`` (seen from ``scope``) is a constant, else ``(None, why, None)``.

    Follows ``Identity`` chains (the TorchScript exporter shares equal initializers through them) across
    scopes, and reads initializers and ``Constant`` nodes' ``value`` tensors (Paddle keeps its weights there).
    The definition is the initializer or the ``Constant`` node that holds the values.
    """
    for _ in range(64):
        d = scope.lookup(name)
        if d is None:
            return None, f"{name!r} is not defined in the model", None
        if d.kind == "initializer":
            return _array(d.tensor, d)
        if d.kind == "input":
            where = "a graph input" if d.scope.is_main else f"an input of the subgraph {d.scope.where}"
            return None, f"{name!r} is {where}, not a constant", None
        node = d.node
        if node.op_type == "Identity" and node.domain in DEFAULT_DOMAINS and node.input and node.input[0]:
            scope, name = d.scope, node.input[0]
            continue
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            value = next((a for a in node.attribute if a.name == "value" and a.type == AttributeProto.TENSOR), None)
            if value is not None:
                return _array(value.t, d)
            return None, f"Constant node {node.name!r} holds no dense tensor value", None
        return None, f"computed at run time (output of {node.op_type} node {node.name!r})", None
    return None, f"{name!r} is behind more than 64 Identity nodes", None
