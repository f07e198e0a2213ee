"""Whole-graph shapes, FLOPs and parameter counts of an ONNX model, with the torch report's conventions.

FLOPs are 2 x multiply-adds counted as ``torch.utils.flop_counter.FlopCounterMode`` does: only
convolutions and matrix products (``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``), bias adds and
elementwise ops not counted. Shapes come from ``onnx.shape_inference`` on a copy of the graph whose large
initializers are replaced by typed inputs (so models over 2 GB infer too) and whose inputs have static
shapes; a symbolic batch dimension is set to 1 and the FLOPs are then per sample. Every graph counts, the
subgraphs of ``If`` / ``Loop`` / ``Scan`` nodes included (each node once), and parameters are the floating-point
constants wherever they are defined: initializers and ``Constant`` nodes alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import onnx
from onnx import TensorProto

from ..errors import DsrewriteError, first_line
from . import measure as onnx_measure  # called through the module: tests patch session
from .calib_data import with_outputs
from .model_io import LARGE, model_nbytes
from .scopes import DEFAULT_DOMAINS, scopes, stored_tensors

__all__ = ["Shapes", "infer_shapes", "count_flops", "count_params", "node_flops", "conv_positions", "attribute",
           "subgraph_note", "partial_flops", "FLOAT_TYPES"]

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_SMALL = 1024  # initializers with at most this many elements stay in the shape-inference copy (shape inputs)

Shape = Tuple[int, ...]


@dataclass
class Shapes:
    """Static shapes known after inference. ``per_sample``: a symbolic batch was set to 1; ``symbolic_inputs``:
    inputs left with symbolic dims (static input shapes would make their convs' FLOPs known)."""

    shapes: Dict[str, Shape] = field(default_factory=dict)
    inputs: Dict[str, Shape] = field(default_factory=dict)
    per_sample: bool = False
    notes: List[str] = field(default_factory=list)
    symbolic_inputs: List[str] = field(default_factory=list)

    def get(self, name: str) -> Optional[Shape]:
        return self.shapes.get(name)


def _static(tp: onnx.TypeProto) -> Optional[Shape]:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _fix_inputs(graph: onnx.GraphProto, initializers: set, given: Mapping[str, Sequence[int]],
                out: Shapes) -> bool:
    """Make every real graph input static in place; returns False when some dim stays unknown."""
    real = [i for i in graph.input if i.name not in initializers]
    unknown_names = set(given) - {i.name for i in real}
    if unknown_names:
        names = ", ".join(i.name for i in real) or "none"
        raise DsrewriteError(f"input_shapes names unknown inputs {sorted(unknown_names)} (model inputs: {names})")
    ok = True
    for vi in real:
        if not vi.type.HasField("tensor_type"):
            ok = False
            out.notes.append(f"input {vi.name!r} is not a tensor: FLOPs are not counted")
            continue
        shape = vi.type.tensor_type.shape
        if vi.name in given:
            dims = [int(d) for d in given[vi.name]]
            if len(dims) != len(shape.dim) and len(shape.dim):
                raise DsrewriteError(f"input {vi.name!r} has rank {len(shape.dim)}, input shape {tuple(dims)} "
                                     f"has rank {len(dims)}")
            if any(d <= 0 for d in dims):
                raise DsrewriteError(f"input shape for {vi.name!r} must be positive ints, got {tuple(dims)}")
            fixed = [(i, d.dim_value) for i, d in enumerate(shape.dim) if d.HasField("dim_value") and d.dim_value > 0]
            clash = [(i, v) for i, v in fixed if dims[i] != v]
            if clash:
                i, v = clash[0]
                raise DsrewriteError(f"input {vi.name!r} has static size {v} in dim {i}, the given input shape "
                                     f"{tuple(dims)} disagrees (only symbolic dims can be set)")
            del shape.dim[:]
            for d in dims:
                shape.dim.add().dim_value = d
        else:
            missing = []
            for i, d in enumerate(shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    continue
                if i == 0:
                    d.Clear()
                    d.dim_value = 1
                    out.per_sample = True
                else:
                    missing.append(d.dim_param or f"dim {i}")
            if missing:
                ok = False
                out.symbolic_inputs.append(vi.name)
                out.notes.append(f"input {vi.name!r} has symbolic dims {missing}: FLOPs of the convs that depend "
                                 f"on it are not counted (give static input shapes)")
        out.inputs[vi.name] = tuple(int(d.dim_value) for d in shape.dim)
    return ok


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the data of its large initializers (they become typed graph inputs)."""
    src = model.graph
    g = onnx.GraphProto(name=src.name)
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    g.input.extend(src.input)
    for t in src.initializer:
        if math.prod(t.dims) <= _SMALL and t.data_location != TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    g.sparse_initializer.extend(src.sparse_initializer)
    sk = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    sk.graph.CopyFrom(g)
    return sk


def infer_shapes(model: onnx.ModelProto, input_shapes: Optional[Mapping[str, Sequence[int]]] = None, *,
                 run: bool = True) -> Shapes:
    """Static shapes of every tensor ``onnx.shape_inference`` can resolve (initializers included); ``run``: those
    it cannot around the main graph's convs and matrix products, with static inputs, from one onnxruntime run."""
    out = Shapes()
    initializers = {t.name for t in model.graph.initializer}
    sk = _skeleton(model)
    _fix_inputs(sk.graph, initializers, dict(input_shapes or {}), out)
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference errors on odd custom graphs: report, do not fail the rewrite
        out.notes.append(f"shape inference failed ({first_line(e, 160)}): FLOPs are not counted")
        inferred = sk
    ambiguous: set = set()

    def put(name: str, shape: Optional[Shape]) -> None:
        """Record a shape; a name two sibling subgraphs give different shapes is dropped (unknown, not wrong)."""
        if shape is None or name in ambiguous:
            return
        if out.shapes.setdefault(name, shape) != shape:
            del out.shapes[name]
            ambiguous.add(name)

    for scope in scopes(inferred.graph):
        g = scope.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            put(vi.name, _static(vi.type))
    for scope in scopes(model.graph):  # constants carry their shapes: initializers and Constant nodes' values
        for t in scope.graph.initializer:
            put(t.name, tuple(int(d) for d in t.dims))
        for node in scope.graph.node:
            value = _constant_tensor(node)
            if value is not None:
                put(node.output[0], tuple(int(d) for d in value.dims))
    floats = all(vi.type.tensor_type.elem_type in FLOAT_TYPES for vi in model.graph.input
                 if vi.name not in initializers)
    if run and floats and not out.symbolic_inputs and out.inputs:
        _runtime_shapes(model, out)
    return out


_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _runtime_shapes(model: onnx.ModelProto, out: Shapes) -> None:
    """Shapes static inference left unknown around the main graph's counted nodes (a ``Reshape`` of a computed
    shape, a custom op upstream), read from one onnxruntime run on random inputs of the static input shapes.
    Only for models whose inputs are all floating point: an integer input may be a shape or an index, and random
    values of it would give shapes real inputs do not."""
    names = [t for node in model.graph.node if node.op_type in _COUNTED and node.domain in DEFAULT_DOMAINS
             and node_flops(node, out) is None for t in list(node.input[:2]) + list(node.output[:1])
             if t and t not in out.shapes]
    if not names:
        return
    if model_nbytes(model) >= LARGE:
        return
    names = list(dict.fromkeys(names))
    try:
        values = onnx_measure.session(with_outputs(model, names, only=True), once=True).run(
            names, onnx_measure.random_feeds(model, out.inputs))
    except Exception as e:  # noqa: BLE001 - an op onnxruntime lacks: the shapes stay unknown, say why
        out.notes.append(f"{len(names)} tensor shapes unknown to shape inference and not read from onnxruntime "
                         f"({first_line(e, 120)})")
        return
    for n, v in zip(names, values):
        out.shapes[n] = tuple(int(d) for d in v.shape)
    out.notes.append(f"{len(names)} tensor shapes that shape inference could not resolve were read from one "
                     "onnxruntime run at the static input shapes")


def attribute(node: onnx.NodeProto, name: str, default):
    """The value of a node attribute (strings decoded), or ``default`` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def conv_positions(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    """The positions a ``Conv`` / ``ConvTranspose`` node's FLOPs are counted over (``FlopCounterMode``'s
    convention, the whole-model total's): ``N * prod(output spatial)`` for ``Conv``, ``N * prod(input spatial)``
    for ``ConvTranspose`` (each input position scatters one kernel-sized patch: a stride-2 transposed conv has
    4x fewer of them than outputs in 2-D); ``None`` when its input or output shape is unknown."""
    x = shapes.get(node.input[0]) if node.input else None
    y = shapes.get(node.output[0]) if node.output else None
    if x is None or y is None:
        return None
    counted = x if node.op_type == "ConvTranspose" else y
    return counted[0] * math.prod(counted[2:])


def node_flops(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    """FLOPs of one node (``FlopCounterMode`` rules); 0 for uncounted ops, ``None`` when a shape is unknown."""
    if node.domain not in ("", "ai.onnx"):
        return 0
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        # torch: 2 * positions * prod(w), w = [Cout, Cin/g, *k] (Conv) or [Cin, Cout/g, *k] (ConvTranspose)
        w, positions = shapes.get(node.input[1]), conv_positions(node, shapes)
        return None if w is None or positions is None else 2 * positions * math.prod(w)
    if op == "Gemm":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if attribute(node, "transA", 0) else a
        n = b[0] if attribute(node, "transB", 0) else b[1]
        return 2 * m * n * k
    if op == "MatMul":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        y = shapes.get(node.output[0])
        if a is None or b is None or y is None:
            return None
        if len(a) < 2 or len(b) < 2:
            return 0  # vector products go to mv/dot in torch, which FlopCounterMode does not count
        return 2 * math.prod(y) * a[-1]
    return 0


def count_flops(model: onnx.ModelProto, shapes: Shapes) -> Tuple[int, List[str]]:
    """Whole-model FLOPs and the names of counted nodes whose shapes are unknown.

    Nodes inside subgraphs count once each, as if every ``If`` branch ran and every ``Loop`` / ``Scan`` body
    ran once (:func:`subgraph_note` says so in the report); their names say where they live.
    """
    total, unknown = 0, []
    for scope in scopes(model.graph):
        for i, node in enumerate(scope.graph.node):
            f = node_flops(node, shapes)
            if f is None:
                unknown.append(scope.qualified(node.name or f"{node.op_type}_{i}"))
            else:
                total += f
    return total, unknown


def partial_flops(model: onnx.ModelProto, shapes: Shapes, unknown: Sequence[str]) -> Optional[str]:
    """What a FLOPs total from :func:`count_flops` leaves out, for the report's FLOPs line (``None``: nothing):
    ``"7 of 9 convs counted, 2 MatMul/Gemm nodes not; give input_shapes / --input-shape"`` (that advice when the
    model has symbolic input dims)."""
    if not unknown:
        return None
    convs = [scope.qualified(node.name or f"{node.op_type}_{i}") for scope in scopes(model.graph)
             for i, node in enumerate(scope.graph.node)
             if node.op_type in ("Conv", "ConvTranspose") and node.domain in DEFAULT_DOMAINS]
    blind = len(set(unknown) & set(convs))
    others = len(set(unknown)) - blind
    text = f"{len(convs) - blind} of {len(convs)} convs counted"
    if others:
        text += f", {others} MatMul/Gemm node{'s' if others > 1 else ''} not"
    advice = ("give input_shapes / --input-shape" if shapes.symbolic_inputs
              else "the rest have shapes shape inference could not resolve")
    return f"{text}; {advice}"


def subgraph_note(model: onnx.ModelProto, shapes: Shapes) -> Optional[str]:
    """The report note for a model whose subgraphs hold counted nodes (convs, matrix products), else ``None``."""
    inner = [node for scope in scopes(model.graph)[1:] for node in scope.graph.node if node_flops(node, shapes) != 0]
    if not inner:
        return None
    return (f"{len(inner)} convolution/matmul nodes sit inside If/Loop/Scan subgraphs: their FLOPs count once each "
            "(every If branch, one loop iteration)")


def _constant_tensor(node: onnx.NodeProto) -> Optional[onnx.TensorProto]:
    """The dense ``value`` tensor of a ``Constant`` node, else ``None``."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point constants (the weights), as the torch report counts parameters.

    Every graph is visited (subgraphs too) and every tensor counted once where it is defined: initializers,
    sparse initializers (their stored values) and ``Constant`` nodes' tensors (Paddle keeps its weights there),
    however many nodes or subgraphs read it. Scalars (0-d tensors) are not counted: exporters write the
    literals of the code there (``Clip`` bounds, ``Pow`` exponents), which torch does not count.
    """
    return sum(math.prod(t.dims) for t in stored_tensors(model.graph) if t.data_type in FLOAT_TYPES and len(t.dims))
