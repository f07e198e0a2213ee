"""ONNX frontend: every convolution node of an onnx-graphsurgeon graph becomes a framework-neutral ConvSite.

``Conv`` nodes whose weight is a constant (an initializer, a ``Constant`` node, or either behind
``Identity`` nodes) carry the weight as a numpy array; everything else the pass cannot rewrite
(``ConvTranspose``, quantised ``QLinearConv``/``ConvInteger``, weights computed at run time, odd
dtypes) still becomes a site with the reason in ``spec.extra["unsupported"]``, so the report lists it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import ConvSite, ConvSpec
from .flops import Shapes

__all__ = ["OnnxHandle", "collect_sites", "constant_value", "subgraph_convs", "CONV_OPS"]

# op type -> (index of the weight input, index of the bias input or None, why it is not rewritten or None)
CONV_OPS = {
    "Conv": (1, 2, None),
    "ConvTranspose": (1, 2, None),  # ConvSpec.transposed: eligibility gives the reason
    "QLinearConv": (3, 8, "quantised convolution (QLinearConv) is not rewritten"),
    "ConvInteger": (1, None, "quantised convolution (ConvInteger) is not rewritten"),
}
_WEIGHT_DTYPES = (np.float32, np.float16, np.float64)


@dataclass
class OnnxHandle:
    """Where a conv lives: the node, the tensor feeding its weight and the one feeding its bias (if any)."""

    node: gs.Node
    weight: gs.Tensor
    bias: Optional[gs.Tensor]
    weight_key: str  # name of the constant holding the weight (shared weights rewrite once per rank)


def constant_value(tensor: gs.Tensor) -> Tuple[Optional[np.ndarray], Optional[str], str]:
    """``(values, None, constant name)`` for a constant tensor, else ``(None, why not, tensor name)``.

    Follows ``Identity`` chains (the TorchScript exporter shares equal initializers through them) and reads
    ``Constant`` nodes' ``value`` attribute.
    """
    seen = 0
    while True:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values), None, tensor.name
        producers = tensor.inputs
        if not producers:
            return None, f"{tensor.name!r} is a graph input, not a constant", tensor.name
        node = producers[0]
        if node.op == "Identity" and node.inputs and seen < 64:
            tensor, seen = node.inputs[0], seen + 1
            continue
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            return np.asarray(node.attrs["value"].values), None, node.attrs["value"].name or tensor.name
        return None, f"computed at run time (output of {node.op} node {node.name!r})", tensor.name


def _ints(v, n: int, default: int) -> Tuple[int, ...]:
    if v is None:
        return (default,) * n
    return tuple(int(x) for x in v)


def _site(node: gs.Node, index: int, shapes: Shapes) -> Optional[ConvSite]:
    w_idx, b_idx, unsupported = CONV_OPS[node.op]
    name = node.name or f"{node.op}_{index}"
    if len(node.inputs) <= w_idx:
        return None
    w_tensor = node.inputs[w_idx]
    b_tensor = node.inputs[b_idx] if b_idx is not None and len(node.inputs) > b_idx else None
    if b_tensor is not None and b_tensor.is_empty():
        b_tensor = None
    weight, why, key = constant_value(w_tensor)
    w_shape = tuple(weight.shape) if weight is not None else (shapes.get(w_tensor.name) or None)
    if weight is None and unsupported is None:
        unsupported = f"weight {why}"
    if w_shape is None:  # runtime weight of unknown shape: kernel from the attribute, channels unknown
        ks = node.attrs.get("kernel_shape") or [1, 1]
        w_shape = (0, 0) + tuple(int(k) for k in ks)
    group = int(node.attrs.get("group", 1))
    kernel = tuple(int(k) for k in w_shape[2:])
    dims = len(kernel)
    transposed = node.op == "ConvTranspose"
    if transposed:  # weight is [Cin, Cout/group, *k]
        cin, cout = int(w_shape[0]), int(w_shape[1]) * group
    else:
        cin, cout = int(w_shape[1]) * group, int(w_shape[0])
    bias, b_why = (None, None)
    if b_tensor is not None and unsupported is None:
        bias, b_why, _ = constant_value(b_tensor)  # a run-time bias is fine: it moves to the pointwise conv
    if weight is not None and unsupported is None and weight.dtype.type not in _WEIGHT_DTYPES:
        unsupported = f"weight dtype {weight.dtype} is not rewritten (float16/32/64 only)"
    if unsupported is None and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        unsupported = f"unknown auto_pad {node.attrs['auto_pad']!r}"
    y = shapes.get(node.outputs[0].name) if node.outputs else None
    out_spatial = tuple(y[2:]) if y is not None and len(y) == dims + 2 else None
    spec = ConvSpec(
        name=name, in_channels=cin, out_channels=cout, kernel=kernel, groups=group,
        stride=_ints(node.attrs.get("strides"), dims, 1), dilation=_ints(node.attrs.get("dilations"), dims, 1),
        bias=b_tensor is not None, out_spatial=out_spatial, batch=int(y[0]) if out_spatial is not None else 1,
        kind="onnx", transposed=transposed, extra={"unsupported": unsupported} if unsupported else {},
    )
    if b_why is not None:
        spec.extra["bias"] = f"bias {b_why}"
    handle = OnnxHandle(node, w_tensor, b_tensor, key)
    return ConvSite(spec, weight if unsupported is None else None, bias, handle)


def collect_sites(graph: gs.Graph, shapes: Shapes) -> List[ConvSite]:
    """Every convolution node of the top-level graph, in graph order, with output shapes from ``shapes``."""
    sites = []
    for i, node in enumerate(graph.nodes):
        if node.op in CONV_OPS and node.domain in (None, "", "ai.onnx"):
            site = _site(node, i, shapes)
            if site is not None:
                sites.append(site)
    return sites


def subgraph_convs(graph: gs.Graph) -> List[str]:
    """Names of convolution nodes inside subgraphs (If/Loop/Scan bodies): reported, not rewritten."""
    names = []
    for sub in graph.subgraphs(recursive=True):
        for node in sub.nodes:
            if node.op in CONV_OPS:
                names.append(node.name or node.op)
    return names
