"""torch.fx frontend: find ``nn.Conv*d`` call_module nodes and ``F.conv*d`` calls in a shape-propagated graph."""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ir import ConvSite, ConvSpec

__all__ = ["collect_sites", "trace", "FxHandle", "CONV_FUNCTIONS"]

# functional convs and their spatial dims
CONV_FUNCTIONS = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _Tracer(fx.Tracer):
    """``symbolic_trace`` that keeps dsrewrite's own separable modules as leaves, so a rewritten model
    traces again without its pairs dissolving into anonymous convs."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from ..modules import SeparableConv1d, SeparableConv2d

        return isinstance(m, (SeparableConv1d, SeparableConv2d)) or super().is_leaf_module(m, module_qualified_name)


def trace(root: nn.Module, n_args: Optional[int] = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(root)`` with ``SeparableConv1d/2d`` kept as leaf modules.

    With ``n_args`` (how many positional inputs the example has), the defaults of ``forward``'s later
    parameters are traced as constants (``mask=None``, ``return_features=False``): branches on them are then
    taken as the example call takes them, instead of on a placeholder.
    """
    tracer = _Tracer()
    concrete = None
    if n_args is not None:
        try:
            params = list(inspect.signature(root.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                 inspect.Parameter.KEYWORD_ONLY)
        concrete = {p.name: p.default for p in params[n_args:]
                    if p.kind in kinds and p.default is not inspect.Parameter.empty} or None
    graph = tracer.trace(root, concrete_args=concrete)
    return fx.GraphModule(tracer.root, graph, root.__class__.__name__)


class FxHandle:
    """Where a conv lives in the graph: its call nodes and, for functional calls, the parameter targets."""

    def __init__(self, kind: str, target: str, nodes: List[fx.Node], module: Optional[nn.Module] = None,
                 weight_target: Optional[str] = None, bias_target: Optional[str] = None,
                 conv_args: Optional[Dict[str, Any]] = None) -> None:
        self.kind = kind  # "module" | "function"
        self.target = target
        self.nodes = nodes
        self.module = module
        self.weight_target = weight_target
        self.bias_target = bias_target
        self.conv_args = conv_args or {}


def _tup(v, n: int) -> Tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return (int(v),) * n


def _out_shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _pixels(nodes: List[fx.Node], dims: int) -> Tuple[Optional[Tuple[int, ...]], int, Optional[int]]:
    """(out_spatial of the first call, batch of the first call, total output positions over all calls)."""
    shapes = [_out_shape(n) for n in nodes]
    if not shapes or any(s is None for s in shapes):
        return None, 1, None
    total = 0
    for s in shapes:
        batch = math.prod(s[: len(s) - 1 - dims]) if len(s) > dims + 1 else 1
        total += batch * math.prod(s[-dims:])
    first = shapes[0]
    batch = math.prod(first[: len(first) - 1 - dims]) if len(first) > dims + 1 else 1
    return tuple(first[-dims:]), batch, total


def _module_site(target: str, mod: nn.Module, nodes: List[fx.Node]) -> ConvSite:
    dims = len(mod.kernel_size)
    out_spatial, batch, total = _pixels(nodes, dims)
    transposed = isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    if transposed:
        cin, cout = mod.in_channels, mod.out_channels
    else:
        cin, cout = mod.in_channels, mod.out_channels
    spec = ConvSpec(
        name=target, in_channels=cin, out_channels=cout, kernel=tuple(mod.kernel_size), groups=mod.groups,
        stride=tuple(mod.stride), dilation=tuple(mod.dilation), bias=mod.bias is not None,
        out_spatial=out_spatial, batch=batch, calls=len(nodes), pixels=total, kind="module",
        transposed=transposed,
    )
    weight = None if transposed else mod.weight
    return ConvSite(spec, weight, mod.bias, FxHandle("module", target, nodes, module=mod))


def _get_param(gm: fx.GraphModule, node) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            return node.target, None
        return node.target, value
    return None, None


def _function_sites(gm: fx.GraphModule) -> List[ConvSite]:
    groups: "OrderedDict[Any, List[Tuple[fx.Node, Dict[str, Any]]]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
            continue
        bound = dict(zip(_CONV_ARGS, node.args))
        bound.update(node.kwargs)
        key = bound["weight"].target if isinstance(bound.get("weight"), fx.Node) and bound["weight"].op == "get_attr" else node
        groups.setdefault(key, []).append((node, bound))

    sites = []
    for key, calls in groups.items():
        node, bound = calls[0]
        dims = CONV_FUNCTIONS[node.target]
        nodes = [n for n, _ in calls]
        unsupported = None
        w_target, weight = _get_param(gm, bound.get("weight"))
        b_node = bound.get("bias")
        b_target, bias = _get_param(gm, b_node)
        if weight is None:
            unsupported = "weight is computed at run time (not a parameter)"
        elif b_node is not None and bias is None:
            unsupported = "bias is computed at run time (not a parameter)"
        hyper = {k: bound.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}
        if any(isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and any(isinstance(x, fx.Node) for x in v))
               for v in hyper.values()):
            unsupported = unsupported or "stride/padding/dilation/groups computed at run time"
        if any({k: b.get(k, hyper[k]) for k in hyper} != hyper for _, b in calls[1:]):
            unsupported = unsupported or "the same weight is used with different conv settings"
        out_spatial, batch, total = _pixels(nodes, dims)
        name = w_target.rsplit(".", 1)[0] if w_target and "." in w_target else (w_target or node.name)
        if weight is not None:
            cout, cin_g = weight.shape[:2]
            kernel = tuple(weight.shape[2:])
        else:
            meta_w = bound["weight"].meta.get("tensor_meta") if isinstance(bound.get("weight"), fx.Node) else None
            shape = tuple(meta_w.shape) if meta_w is not None else (0, 0) + (1,) * dims
            cout, cin_g, kernel = shape[0], shape[1], tuple(shape[2:])
        groups_v = hyper["groups"] if isinstance(hyper["groups"], int) else 1
        spec = ConvSpec(
            name=name, in_channels=int(cin_g) * groups_v, out_channels=int(cout), kernel=kernel,
            groups=groups_v, stride=_tup(hyper["stride"], dims) if unsupported is None else (1,) * dims,
            dilation=_tup(hyper["dilation"], dims) if unsupported is None else (1,) * dims,
            bias=b_node is not None, out_spatial=out_spatial, batch=batch, calls=len(nodes), pixels=total,
            kind="function", extra={"unsupported": unsupported} if unsupported else {},
        )
        handle = FxHandle("function", name, nodes, weight_target=w_target, bias_target=b_target,
                          conv_args=hyper)
        sites.append(ConvSite(spec, weight if unsupported is None else None, bias, handle))
    return sites


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def collect_sites(gm: fx.GraphModule) -> List[ConvSite]:
    """Every convolution in ``gm`` (shape-propagated with ShapeProp), in graph order, each module once."""
    from ..modules import SeparableConv1d, SeparableConv2d

    by_target: "OrderedDict[str, List[fx.Node]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   _CONV_MODULES + (SeparableConv1d, SeparableConv2d)):
            by_target.setdefault(node.target, []).append(node)
    sites = []
    for t, nodes in by_target.items():
        mod = gm.get_submodule(t)
        if isinstance(mod, _CONV_MODULES):
            sites.append(_module_site(t, mod, nodes))
            continue
        # a pair from an earlier rewrite: both halves are reported (same output positions), never rewritten
        for half in ("depthwise", "pointwise"):
            site = _module_site(f"{t}.{half}", getattr(mod, half), nodes)
            site.spec.extra["unsupported"] = "part of a separable pair from an earlier rewrite"
            sites.append(site)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(sites + _function_sites(gm), key=lambda s: order[s.handle.nodes[0]])
