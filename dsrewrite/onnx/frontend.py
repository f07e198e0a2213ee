"""ONNX frontend: every convolution node and weight layer of a model, subgraphs included, becomes a ConvSite.

``Conv`` nodes whose weight is a constant (an initializer or a ``Constant`` node of the conv's graph or of a
graph around it, or either behind ``Identity`` nodes) carry the weight as a numpy array; everything else the
pass cannot rewrite (``ConvTranspose``, quantised ``QLinearConv``/``ConvInteger``, weights computed at run
time, weights the user can override at run time, odd dtypes) still becomes a site with the reason in
``spec.extra["unsupported"]``, so the report lists it. A conv inside an ``If`` / ``Loop`` / ``Scan`` body is
named with where it lives (``If_0/then_branch/conv``).

Linear layers are ``Gemm`` and ``MatMul`` nodes whose second input (``B``) is a floating-point constant: a site
with no spatial dims (``kernel=()``), weight ``[Cout, Cin]`` (``B`` or ``B.T`` as ``transB`` says; ``alpha`` folded
in, ``beta * C`` as the bias when ``C`` is a constant row), one position per row of the output. A ``Gemm`` with
``transA=1``, a ``B`` that is not 2-D, a constant first input (``W @ x``) stay sites with their reason. A ``MatMul``
of two run-time values (attention's ``Q @ K^T``) is no weight layer and no site. A 1x1 ``Conv`` is planned as the
``pointwise`` kind (``spec.kind``), a low-rank pair like the linear layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import onnx

from ..ir import ConvSite, ConvSpec
from .flops import Shapes, attribute, conv_positions
from .scopes import DEFAULT_DOMAINS, Definition, Scope, constant_value, scopes

__all__ = ["OnnxHandle", "collect_sites", "CONV_OPS", "LINEAR_OPS", "WEIGHT_OPS"]

# op type -> (index of the weight input, index of the bias input or None, why it is not rewritten or None)
CONV_OPS = {
    "Conv": (1, 2, None),
    "ConvTranspose": (1, 2, None),  # ConvSpec.transposed: eligibility gives the reason
    "QLinearConv": (3, 8, "quantised convolution (QLinearConv) is not rewritten"),
    "ConvInteger": (1, None, "quantised convolution (ConvInteger) is not rewritten"),
}
LINEAR_OPS = ("Gemm", "MatMul")  # a weight layer when B is a constant: a low-rank pair (kind "linear")
WEIGHT_OPS = tuple(CONV_OPS) + LINEAR_OPS  # every op a site can come from
_WEIGHT_DTYPES = (np.float32, np.float16, np.float64)


@dataclass(eq=False)
class OnnxHandle:
    """Where a conv lives: its graph, the node, its weight and bias inputs, and where the weight is defined."""

    scope: Scope
    node: onnx.NodeProto
    node_name: str  # the node's own name (``Conv_3`` for an unnamed node): new node names derive from it
    weight: str  # name of the weight input
    bias: Optional[str]  # name of the bias input, if any
    source: Optional[Definition]  # the initializer or Constant node holding the weight (shared: one pair per rank)


def _ints(v, n: int, default: int) -> Tuple[int, ...]:
    if v is None:
        return (default,) * n
    return tuple(int(x) for x in v)


def _overridable(source: Optional[Definition]) -> Optional[str]:
    """Why an initializer that is also an input of its graph cannot be rewritten (``None`` otherwise): the user
    may feed another value at run time (ONNX IR < 4 lists every initializer as an input; later IRs allow it as
    an overridable default), and the factors would bake the default in."""
    if source is None or source.kind != "initializer":
        return None
    if source.name not in source.scope.input_names:
        return None
    where = "a graph input" if source.scope.is_main else f"an input of the subgraph {source.scope.where}"
    return f"weight {source.name!r} is also {where} (overridable at run time)"


def _site(scope: Scope, node: onnx.NodeProto, index: int, shapes: Shapes) -> Optional[ConvSite]:
    w_idx, b_idx, unsupported = CONV_OPS[node.op_type]
    if len(node.input) <= w_idx or not node.input[w_idx] or not node.input[0]:
        return None
    node_name = node.name or f"{node.op_type}_{index}"
    w_name = node.input[w_idx]
    b_name = node.input[b_idx] if b_idx is not None and len(node.input) > b_idx and node.input[b_idx] else None
    weight, why, source = constant_value(scope, w_name)
    w_shape = tuple(weight.shape) if weight is not None else (shapes.get(w_name) or None)
    if weight is None and unsupported is None:
        unsupported = f"weight {why}"
    if unsupported is None:
        unsupported = _overridable(source)
    if w_shape is None:  # runtime weight of unknown shape: kernel from the attribute, channels unknown
        w_shape = (0, 0) + tuple(int(k) for k in attribute(node, "kernel_shape", [1, 1]))
    group = int(attribute(node, "group", 1))
    kernel = tuple(int(k) for k in w_shape[2:])
    dims = len(kernel)
    transposed = node.op_type == "ConvTranspose"
    if transposed:  # weight is [Cin, Cout/group, *k]
        cin, cout = int(w_shape[0]), int(w_shape[1]) * group
    else:
        cin, cout = int(w_shape[1]) * group, int(w_shape[0])
    bias, b_why = (None, None)
    if b_name is not None and unsupported is None:
        bias, b_why, _ = constant_value(scope, b_name)  # a run-time bias is fine: it moves to the pointwise conv
    if weight is not None and unsupported is None and weight.dtype.type not in _WEIGHT_DTYPES:
        unsupported = f"weight dtype {weight.dtype} is not rewritten (float16/32/64 only)"
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if unsupported is None and auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        unsupported = f"unknown auto_pad {auto_pad!r}"
    y = shapes.get(node.output[0]) if node.output else None
    out_spatial = tuple(y[2:]) if y is not None and len(y) == dims + 2 else None
    spec = ConvSpec(
        name=scope.qualified(node_name), in_channels=cin, out_channels=cout, kernel=kernel, groups=group,
        stride=_ints(attribute(node, "strides", None), dims, 1),
        dilation=_ints(attribute(node, "dilations", None), dims, 1),
        bias=b_name is not None, out_spatial=out_spatial, batch=int(y[0]) if out_spatial is not None else 1,
        pixels=conv_positions(node, shapes) if transposed else None,  # its FLOPs count over the input positions
        origin="onnx", transposed=transposed, extra={"unsupported": unsupported} if unsupported else {},
    )
    if b_why is not None:
        spec.extra["bias"] = f"bias {b_why}"
    handle = OnnxHandle(scope, node, node_name, w_name, b_name, source)
    return ConvSite(spec, weight if unsupported is None else None, bias, handle)


def _row_bias(c: np.ndarray, cout: int) -> bool:
    """Whether a ``Gemm``'s ``C`` adds one value per output (``[Cout]``, ``[1, Cout]`` or a scalar), as a bias."""
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
        return False
    return c.ndim == 0 or c.shape[-1] in (1, cout)


def _linear_site(scope: Scope, node: onnx.NodeProto, index: int, shapes: Shapes) -> Optional[ConvSite]:
    """The site of a ``Gemm`` / ``MatMul`` with a constant weight (``None``: no weight layer). Its weight is
    ``[Cout, Cin]`` as ``x @ W.T`` uses it, ``alpha`` folded in; its bias ``beta * C`` when ``C`` is a constant row."""
    if len(node.input) < 2 or not node.input[0] or not node.input[1]:
        return None
    op, node_name = node.op_type, node.name or f"{node.op_type}_{index}"
    a_name, b_name = node.input[0], node.input[1]
    trans_a = op == "Gemm" and bool(attribute(node, "transA", 0))
    trans_b = op == "Gemm" and bool(attribute(node, "transB", 0))
    weight, _, source = constant_value(scope, b_name)
    unsupported: Optional[str] = None
    w_name = b_name
    if weight is None or weight.dtype.type not in _WEIGHT_DTYPES:
        first, _, source = constant_value(scope, a_name)
        if weight is not None or first is None or first.dtype.type not in _WEIGHT_DTYPES or first.ndim != 2:
            return None  # a product of run-time values (attention) or integer arithmetic: no weight layer
        # W @ x: the weight is the first input; rows of W are outputs (columns with transA)
        rows, cols = (int(d) for d in first.shape)
        cin, cout = (rows, cols) if trans_a else (cols, rows)
        weight, w_name = None, a_name
        unsupported = f"{op} with its weight as the first input (W @ x) is not rewritten"
    elif weight.ndim != 2:
        cin = int(weight.shape[-2]) if weight.ndim >= 2 else int(weight.shape[0])
        cout = int(weight.shape[-1]) if weight.ndim >= 2 else 1
        unsupported = f"weight {b_name!r} is {weight.ndim}-D (2-D weights only)"
        weight = None
    else:
        weight = weight if trans_b else weight.T  # [Cout, Cin]
        cout, cin = (int(d) for d in weight.shape)
    if unsupported is None and trans_a:
        unsupported = "Gemm with transA=1 (its input transposed) is not rewritten"
    a_shape = shapes.get(a_name)
    if unsupported is None and op == "MatMul" and a_shape is not None and len(a_shape) < 2:
        unsupported = "a vector product (1-D input) is not rewritten"
    if unsupported is None:
        unsupported = _overridable(source)
    c_name = node.input[2] if op == "Gemm" and len(node.input) > 2 and node.input[2] else None
    bias, b_why = None, None
    if unsupported is None:
        alpha = float(attribute(node, "alpha", 1.0)) if op == "Gemm" else 1.0
        weight = np.ascontiguousarray(weight * np.asarray(alpha, weight.dtype) if alpha != 1.0 else weight)
        if c_name is not None:
            c, c_why, _ = constant_value(scope, c_name)
            beta = float(attribute(node, "beta", 1.0))
            if c is None:
                b_why = f"bias {c_why}"  # kept as it is on the expansion (with its beta)
            elif not _row_bias(c, cout):
                b_why = f"bias C of shape {tuple(c.shape)} is not one value per output"
            else:
                bias = np.ascontiguousarray(np.broadcast_to(c.reshape(-1) * beta, (cout,)).astype(weight.dtype))
    y = shapes.get(node.output[0]) if node.output else None
    rows = math.prod(y[:-1]) if y is not None and len(y) >= 1 else None
    spec = ConvSpec(
        name=scope.qualified(node_name), in_channels=cin, out_channels=cout, kernel=(), groups=1, stride=(),
        dilation=(), bias=c_name is not None, out_spatial=None, batch=int(y[0]) if y is not None and len(y) >= 2 else 1,
        pixels=rows, origin="onnx", extra={"unsupported": unsupported} if unsupported else {},
    )
    if b_why is not None:
        spec.extra["bias"] = b_why
    handle = OnnxHandle(scope, node, node_name, w_name, c_name, source)
    return ConvSite(spec, weight if unsupported is None else None, bias, handle)


def collect_sites(model: onnx.ModelProto, shapes: Shapes) -> List[ConvSite]:
    """Every convolution node and weight layer (``Gemm`` / ``MatMul`` with a constant weight) of the model (main
    graph first, then each subgraph), with output shapes from ``shapes``. The sites' handles point into
    ``model``: the backend edits that ModelProto."""
    sites = []
    for scope in scopes(model.graph):
        for i, node in enumerate(scope.graph.node):
            if node.domain not in DEFAULT_DOMAINS:
                continue
            if node.op_type in CONV_OPS:
                site = _site(scope, node, i, shapes)
            elif node.op_type in LINEAR_OPS:
                site = _linear_site(scope, node, i, shapes)
            else:
                continue
            if site is not None:
                sites.append(site)
    return sites
