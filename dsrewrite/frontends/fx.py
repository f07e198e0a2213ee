"""torch.fx frontend: find ``nn.Conv*d`` call_module nodes and ``F.conv*d`` calls in a shape-propagated graph."""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..ir import ConvSite, ConvSpec
from .conv_modules import CONV_MODULE_TYPES, TRANSPOSED_TYPES, describe, is_known_conv_class

__all__ = ["collect_sites", "trace", "FxHandle", "CONV_FUNCTIONS", "CONV_ARGS", "bind_conv_args", "conv_settings",
           "computed_at_run_time", "owner_name", "module_site", "ProbeProp", "first_item", "may_rewrite"]

# functional convs and their spatial dims
CONV_FUNCTIONS = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
}
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")  # their positional order
_SETTING_DEFAULTS = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))


def bind_conv_args(node: fx.Node) -> Dict[str, Any]:
    """The arguments of a functional conv call by name (positional ones named after ``CONV_ARGS``)."""
    bound = dict(zip(CONV_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def conv_settings(bound: Dict[str, Any]) -> Dict[str, Any]:
    """Stride, padding, dilation and groups of a bound functional conv call, ``F.conv*d``'s defaults filled in."""
    return {k: bound.get(k, d) for k, d in _SETTING_DEFAULTS}


def computed_at_run_time(v: Any) -> bool:
    """Whether a conv argument is a graph value (an fx Node, or a list or tuple holding one), not a constant."""
    return isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and any(isinstance(x, fx.Node) for x in v))


def owner_name(path: str) -> str:
    """The module that owns a parameter path (``layer1.conv.weight`` -> ``layer1.conv``): the conv's report name."""
    return path.rsplit(".", 1)[0] if "." in path else path


class _Tracer(fx.Tracer):
    """``symbolic_trace`` that keeps dsrewrite's own separable modules as leaves, so a rewritten model
    traces again without its pairs dissolving into anonymous convs, and the registered conv subclasses
    (timm's ``Conv2dSame``, ``StdConv2d``...), whose dynamic padding does not trace but whose semantics
    :mod:`~dsrewrite.frontends.conv_modules` knows."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from ..modules import SeparableConv1d, SeparableConv2d

        return (isinstance(m, (SeparableConv1d, SeparableConv2d)) or is_known_conv_class(type(m))
                or super().is_leaf_module(m, module_qualified_name))


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
        self.kind = kind  # "module" | "function" | "swap" (a module swapped in place, no graph node)
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
    return _pixels_of(shapes, dims)


def _pixels_of(shapes: List[Tuple[int, ...]], dims: int) -> Tuple[Optional[Tuple[int, ...]], int, Optional[int]]:
    if not shapes:
        return None, 1, None
    batches = [math.prod(s[: len(s) - 1 - dims]) if len(s) > dims + 1 else 1 for s in shapes]
    total = sum(b * math.prod(s[-dims:]) for b, s in zip(batches, shapes))
    return tuple(shapes[0][-dims:]), batches[0], total


def module_site(target: str, mod: nn.Module, nodes: List[fx.Node], *, out_shapes=None) -> ConvSite:
    """The site of one conv module: its effective weight and settings from
    :func:`~dsrewrite.frontends.conv_modules.describe`, or the reason it cannot be rewritten.

    Output shapes come from the nodes' ``tensor_meta`` or, on the module-swap route, from ``out_shapes``.
    """
    dims = len(mod.kernel_size)
    if out_shapes is None:
        out_spatial, batch, total = _pixels(nodes, dims)
    else:
        out_spatial, batch, total = _pixels_of(out_shapes, dims)
    info = describe(mod)
    extra = {}
    if info.unsupported:
        extra["unsupported"] = info.unsupported
    elif out_shapes is not None and not out_shapes:
        extra["unsupported"] = "not called by the example inputs"
    if info.folded:
        extra["folded"] = info.folded
    spec = ConvSpec(
        name=target, in_channels=mod.in_channels, out_channels=mod.out_channels, kernel=tuple(mod.kernel_size),
        groups=mod.groups, stride=tuple(mod.stride), dilation=tuple(mod.dilation), bias=mod.bias is not None,
        out_spatial=out_spatial, batch=batch, calls=len(nodes) if out_shapes is None else len(out_shapes),
        pixels=total, kind="module", transposed=isinstance(mod, TRANSPOSED_TYPES), extra=extra,
    )
    return ConvSite(spec, info.weight, info.bias,
                    FxHandle("module" if out_shapes is None else "swap", target, nodes, module=mod,
                             conv_args=info.conv_args))


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
        bound = bind_conv_args(node)
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
        hyper = conv_settings(bound)
        if any(computed_at_run_time(v) for v in hyper.values()):
            unsupported = unsupported or "stride/padding/dilation/groups computed at run time"
        if any({k: b.get(k, hyper[k]) for k in hyper} != hyper for _, b in calls[1:]):
            unsupported = unsupported or "the same weight is used with different conv settings"
        out_spatial, batch, total = _pixels(nodes, dims)
        name = owner_name(w_target) if w_target else node.name
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


class ProbeProp(ShapeProp):
    """``ShapeProp`` that also keeps, for the first call of each conv, one sample of its input and output
    (the first item of the batch): the per-layer self-check runs the rewritten pair on it."""

    def __init__(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(gm, *args, **kwargs)
        self.probes: Dict[fx.Node, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: set = set()

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        key = None
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), CONV_MODULE_TYPES):
            mod = self.module.get_submodule(n.target)
            if may_rewrite(mod.groups, mod.kernel_size, isinstance(mod, TRANSPOSED_TYPES)):
                key, dims = n.target, len(mod.kernel_size)
        elif n.op == "call_function" and n.target in CONV_FUNCTIONS:
            bound = bind_conv_args(n)
            w, groups = bound.get("weight"), bound.get("groups", 1)
            wv = self.env.get(w) if isinstance(w, fx.Node) else None
            if isinstance(wv, torch.Tensor) and may_rewrite(groups, tuple(wv.shape[2:])):
                key = w.target if w.op == "get_attr" else n
                dims = CONV_FUNCTIONS[n.target]
        if key is not None and key not in self._seen:
            self._seen.add(key)
            src = n.args[0] if n.args else n.kwargs.get("input")
            x = self.env.get(src) if isinstance(src, fx.Node) else None
            if isinstance(x, torch.Tensor) and isinstance(result, torch.Tensor):
                self.probes[n] = (first_item(x, dims), first_item(result, dims))
        return result


def may_rewrite(groups: Any, kernel: Tuple[int, ...], transposed: bool = False) -> bool:
    """A conv the planner may rewrite (1-D/2-D, groups=1, more than one tap, not transposed): only those keep a
    self-check sample, to bound memory."""
    return groups == 1 and len(kernel) in (1, 2) and math.prod(kernel) > 1 and not transposed


def first_item(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A detached copy of the first batch item of a conv input/output (the whole tensor if unbatched)."""
    t = t.detach()
    return (t[:1] if t.dim() == dims + 2 else t).clone()


def collect_sites(gm: fx.GraphModule, probes: Optional[Dict[fx.Node, Tuple[torch.Tensor, torch.Tensor]]] = None
                  ) -> List[ConvSite]:
    """Every convolution in ``gm`` (shape-propagated with ShapeProp), in graph order, each module once.

    ``probes`` (from :class:`ProbeProp`) are attached to the sites for the self-check."""
    from ..modules import SeparableConv1d, SeparableConv2d

    by_target: "OrderedDict[str, List[fx.Node]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   CONV_MODULE_TYPES + (SeparableConv1d, SeparableConv2d)):
            by_target.setdefault(node.target, []).append(node)
    sites = []
    for t, nodes in by_target.items():
        mod = gm.get_submodule(t)
        if isinstance(mod, CONV_MODULE_TYPES):
            sites.append(module_site(t, mod, nodes))
            continue
        # a pair from an earlier rewrite: both halves are reported (same output positions), never rewritten
        for half in ("depthwise", "pointwise"):
            site = module_site(f"{t}.{half}", getattr(mod, half), nodes)
            site.spec.extra["unsupported"] = "part of a separable pair from an earlier rewrite"
            sites.append(site)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    sites = sorted(sites + _function_sites(gm), key=lambda s: order[s.handle.nodes[0]])
    for s in sites:
        s.probe = (probes or {}).get(s.handle.nodes[0])
    return sites
