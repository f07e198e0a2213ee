"""torch.fx frontend: find ``nn.Conv*d`` call_module nodes and ``F.conv*d`` calls in a shape-propagated graph."""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..ir import ConvSite, ConvSpec
from ..modules import LOWRANK_TYPES, PAIR_TYPES
from .conv_modules import (CONV_MODULE_TYPES, TRANSPOSED_TYPES, describe, has_unknown_forward, is_known_conv_class,
                           is_linear_module, is_weight_module, tf_same_pad)

__all__ = ["collect_sites", "trace", "FxHandle", "CONV_FUNCTIONS", "CONV_ARGS", "bind_conv_args", "conv_settings",
           "computed_at_run_time", "owner_name", "module_site", "ProbeProp", "first_item", "may_rewrite",
           "Probe", "Window", "bounded_probe", "PROBE_WINDOW", "LINEAR_FUNCTIONS", "linear_site", "linear_probe",
           "PROBE_ROWS", "attention_sites"]

# functional convs and their spatial dims
CONV_FUNCTIONS = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
}
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)  # functional linear layers (a conv with no spatial dims)
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
        return (isinstance(m, PAIR_TYPES) or is_known_conv_class(type(m))
                or (is_linear_module(m) and not has_unknown_forward(m))  # a Linear subclass's own forward: traced
                or super().is_leaf_module(m, module_qualified_name))


def trace(root: nn.Module, n_args: Optional[int] = None, *, tracer: Optional[fx.Tracer] = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(root)`` with ``SeparableConv1d/2d`` kept as leaf modules.

    With ``n_args`` (how many positional inputs the example has), the defaults of ``forward``'s later
    parameters are traced as constants (``mask=None``, ``return_features=False``): branches on them are then
    taken as the example call takes them, instead of on a placeholder. ``tracer``: another tracer (the
    module-swap route traces one module's own forward with its children as leaves).
    """
    tracer = tracer or _Tracer()
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


def module_site(target: str, mod: nn.Module, nodes: List[fx.Node], *, out_shapes=None, in_shapes=None) -> ConvSite:
    """The site of one conv module: its effective weight and settings from
    :func:`~dsrewrite.frontends.conv_modules.describe`, or the reason it cannot be rewritten.

    Output shapes come from the nodes' ``tensor_meta`` or, on the module-swap route, from ``out_shapes``. A
    transposed conv's work is counted over its *input* positions (FlopCounterMode's convention), from the
    nodes' inputs or ``in_shapes``.
    """
    if is_linear_module(mod):
        return linear_site(target, mod, nodes, out_shapes=out_shapes)
    dims = len(mod.kernel_size)
    if out_shapes is None:
        out_spatial, batch, total = _pixels(nodes, dims)
    else:
        out_spatial, batch, total = _pixels_of(out_shapes, dims)
    if isinstance(mod, TRANSPOSED_TYPES):
        if in_shapes is None:
            in_shapes = [_out_shape(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None for n in nodes]
        total = None if not in_shapes or any(s is None for s in in_shapes) else _pixels_of(in_shapes, dims)[2]
    info = describe(mod)
    extra = _module_extra(info, out_shapes)
    spec = ConvSpec(
        name=target, in_channels=mod.in_channels, out_channels=mod.out_channels, kernel=tuple(mod.kernel_size),
        groups=mod.groups, stride=tuple(mod.stride), dilation=tuple(mod.dilation), bias=mod.bias is not None,
        out_spatial=out_spatial, batch=batch, calls=len(nodes) if out_shapes is None else len(out_shapes),
        pixels=total, origin="module", transposed=isinstance(mod, TRANSPOSED_TYPES), extra=extra,
    )
    return ConvSite(spec, info.weight, info.bias,
                    FxHandle("module" if out_shapes is None else "swap", target, nodes, module=mod,
                             conv_args=info.conv_args))


def _module_extra(info: Any, out_shapes: Optional[list]) -> Dict[str, Any]:
    """A module site's frontend notes: why it cannot be rewritten (its class, or never called on the module-swap
    route, which gives ``out_shapes``), and how a run-time weight was folded."""
    extra = {}
    if info.unsupported:
        extra["unsupported"] = info.unsupported
    elif out_shapes is not None and not out_shapes:
        extra["unsupported"] = "not called by the example inputs"
    if info.folded:
        extra["folded"] = info.folded
    return extra


def _rows_of(shapes: Optional[List[Optional[Tuple[int, ...]]]]) -> Tuple[int, Optional[int]]:
    """(batch of the first call, total rows over all calls) of a linear layer's outputs ``[..., Cout]``."""
    if not shapes or any(s is None for s in shapes):
        return 1, None
    return (shapes[0][0] if len(shapes[0]) > 1 else 1), sum(math.prod(s[:-1]) for s in shapes)


def linear_site(target: str, mod: nn.Module, nodes: List[fx.Node], *, out_shapes=None) -> ConvSite:
    """The site of one ``nn.Linear`` module: a conv with no spatial dims (``kernel=()``), one output position per
    row of its input; output shapes from the nodes or, on the module-swap route, ``out_shapes``."""
    batch, total = _rows_of([_out_shape(n) for n in nodes] if out_shapes is None else out_shapes)
    info = describe(mod)
    extra = _module_extra(info, out_shapes)
    cin = getattr(mod, "in_features", 0) if info.weight is None else int(info.weight.shape[1])
    cout = getattr(mod, "out_features", 0) if info.weight is None else int(info.weight.shape[0])
    spec = ConvSpec(name=target, in_channels=cin, out_channels=cout, kernel=(), groups=1, stride=(),
                    dilation=(), bias=mod.bias is not None, out_spatial=None, batch=batch,
                    calls=len(nodes) if out_shapes is None else len(out_shapes), pixels=total, origin="module",
                    extra=extra)
    return ConvSite(spec, info.weight, info.bias,
                    FxHandle("module" if out_shapes is None else "swap", target, nodes, module=mod, conv_args={}))


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
        if node.op != "call_function" or (node.target not in CONV_FUNCTIONS and node.target not in LINEAR_FUNCTIONS):
            continue
        bound = bind_conv_args(node)
        key = bound["weight"].target if isinstance(bound.get("weight"), fx.Node) and bound["weight"].op == "get_attr" else node
        groups.setdefault(key, []).append((node, bound))

    sites = []
    for key, calls in groups.items():
        node, bound = calls[0]
        nodes = [n for n, _ in calls]
        if node.target in LINEAR_FUNCTIONS:
            sites.append(_linear_function_site(gm, node, bound, nodes))
            continue
        dims = CONV_FUNCTIONS[node.target]
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
            origin="function", extra={"unsupported": unsupported} if unsupported else {},
        )
        handle = FxHandle("function", name, nodes, weight_target=w_target, bias_target=b_target,
                          conv_args=hyper)
        sites.append(ConvSite(spec, weight if unsupported is None else None, bias, handle))
    return sites


def _linear_function_site(gm: fx.GraphModule, node: fx.Node, bound: Dict[str, Any], nodes: List[fx.Node]
                          ) -> ConvSite:
    """The site of ``F.linear(x, weight, bias)`` calls sharing one weight (a parameter, else not rewritten)."""
    w_target, weight = _get_param(gm, bound.get("weight"))
    b_node = bound.get("bias")
    b_target, bias = _get_param(gm, b_node)
    unsupported = None
    if weight is None or weight.dim() != 2:
        unsupported = "weight is computed at run time (not a parameter)"
    elif b_node is not None and bias is None:
        unsupported = "bias is computed at run time (not a parameter)"
    batch, total = _rows_of([_out_shape(n) for n in nodes])
    name = owner_name(w_target) if w_target else node.name
    if weight is not None and weight.dim() == 2:
        cout, cin = weight.shape
    else:
        meta_w = bound["weight"].meta.get("tensor_meta") if isinstance(bound.get("weight"), fx.Node) else None
        shape = tuple(meta_w.shape) if meta_w is not None and len(meta_w.shape) == 2 else (0, 0)
        cout, cin = shape
    spec = ConvSpec(name=name, in_channels=int(cin), out_channels=int(cout), kernel=(), groups=1, stride=(),
                    dilation=(), bias=b_node is not None, batch=batch, calls=len(nodes), pixels=total,
                    origin="function", extra={"unsupported": unsupported} if unsupported else {})
    handle = FxHandle("function", name, nodes, weight_target=w_target, bias_target=b_target, conv_args={})
    return ConvSite(spec, weight if unsupported is None else None, bias, handle)


class ProbeProp(ShapeProp):
    """``ShapeProp`` that also keeps, for the first call of each conv the planner may rewrite, a bounded sample
    of its input and output (:func:`bounded_probe` of the first batch item): the per-layer self-check runs the
    rewritten pair on it. Functional convs whose settings are graph values keep none (they are not rewritten)."""

    def __init__(self, gm: fx.GraphModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(gm, *args, **kwargs)
        self.probes: Dict[fx.Node, Probe] = {}
        self._seen: set = set()

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        key = kernel = conv_args = None
        if n.op == "call_module" and is_linear_module(self.module.get_submodule(n.target)):
            key, kernel = n.target, ()
        elif n.op == "call_function" and n.target in LINEAR_FUNCTIONS:
            w = bind_conv_args(n).get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                key, kernel = w.target, ()
        elif n.op == "call_module" and isinstance(self.module.get_submodule(n.target), CONV_MODULE_TYPES):
            mod = self.module.get_submodule(n.target)
            if may_rewrite(mod.groups, mod.kernel_size, isinstance(mod, TRANSPOSED_TYPES)):
                key, kernel, conv_args = n.target, tuple(mod.kernel_size), describe(mod).conv_args
        elif n.op == "call_function" and n.target in CONV_FUNCTIONS:
            bound = bind_conv_args(n)
            w, groups = bound.get("weight"), bound.get("groups", 1)
            wv = self.env.get(w) if isinstance(w, fx.Node) else None
            settings = conv_settings(bound)
            if (isinstance(wv, torch.Tensor) and may_rewrite(groups, tuple(wv.shape[2:]))
                    and not any(computed_at_run_time(v) for v in settings.values())):
                key, kernel, conv_args = (w.target if w.op == "get_attr" else n), tuple(wv.shape[2:]), settings
        if key is not None and key not in self._seen:
            self._seen.add(key)
            src = n.args[0] if n.args else n.kwargs.get("input")
            x = self.env.get(src) if isinstance(src, fx.Node) else None
            if isinstance(x, torch.Tensor) and isinstance(result, torch.Tensor):
                self.probes[n] = (linear_probe(x, result) if kernel == () else
                                  bounded_probe(x, result, kernel, conv_args))
        return result


def may_rewrite(groups: Any, kernel: Tuple[int, ...], transposed: bool = False) -> bool:
    """A conv the planner may rewrite (1-D/2-D, groups=1, not transposed; 1x1 convs as low-rank pairs): only
    those keep a self-check sample, to bound memory."""
    return groups == 1 and len(kernel) in (1, 2) and not transposed


PROBE_ROWS = 64  # rows of a linear layer's input kept for its self-check


def linear_probe(x: torch.Tensor, y: torch.Tensor, rows: int = PROBE_ROWS) -> Probe:
    """The self-check's sample of one linear call: its first ``rows`` input rows and their outputs (copies), and
    the whole input and output shapes (the pair's output shape is checked on them, on the ``meta`` device)."""
    x, y = x.detach(), y.detach()
    xs = x.reshape(-1, x.shape[-1])[:rows].clone() if x.dim() else x.clone()
    ys = y.reshape(-1, y.shape[-1])[:rows].clone() if y.dim() else y.clone()
    return Probe((Window(xs, ys, ()),), tuple(x.shape), tuple(y.shape))


def first_item(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A detached copy of the first batch item of a conv input/output (the whole tensor if unbatched)."""
    t = t.detach()
    return (t[:1] if t.dim() == dims + 2 else t).clone()


# ---------------------------------------------------------------------------------------------- bounded probes
PROBE_WINDOW = 16  # output positions per spatial dim compared in each window of a bounded probe


class Window(NamedTuple):
    """One crop of a conv's sample: ``x`` (input crop), ``y`` (the original's output at the compared
    positions) and ``start``: where those positions begin, per spatial dim, in the output of the same conv run
    on ``x`` (the compared block is ``out[..., start[0]:start[0]+y.shape[-dims], ...]``; ``()``: all of it);
    ``at``: where they begin in the layer's whole output (for reports and tests)."""

    x: torch.Tensor
    y: torch.Tensor
    start: Tuple[int, ...]
    at: Tuple[int, ...] = ()


@dataclass
class Probe:
    """What the self-check keeps of one conv call (first batch item): a few bounded windows (:class:`Window`),
    and the full input and output shapes, so the pair's output *shape* on the whole input is still checked (on
    the ``meta`` device, without the data)."""

    windows: Tuple[Window, ...]
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]

    @classmethod
    def whole(cls, x: torch.Tensor, y: torch.Tensor) -> "Probe":
        """A probe of one window holding the whole sample as given (no copy): also how a plain ``(x, y)`` tuple
        probe of another route is read."""
        return cls((Window(x, y, (), ()),), tuple(x.shape), tuple(y.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by the windows' tensors."""
        return sum(t.numel() * t.element_size() for w in self.windows for t in (w.x, w.y))


class _Cut(NamedTuple):
    """One spatial dim of a window: the input positions kept (ranges, concatenated in order), the first compared
    position in the output of the conv on the crop (``start``) and in the full output (``first``), and how many."""

    index: Tuple[range, ...]
    start: int
    first: int
    count: int


def _pads(padding: Any, kernel: Tuple[int, ...], dilation: Tuple[int, ...]) -> Optional[List[Tuple[int, int]]]:
    """(left, right) zero-or-mode padding per spatial dim of a conv's static ``padding``; None if unreadable."""
    dims = len(kernel)
    if padding == "valid":
        return [(0, 0)] * dims
    if padding == "same":  # as nn.Conv*d / F.conv*d: the odd pixel on the right
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    if isinstance(padding, (int, list, tuple)) and not isinstance(padding, bool):
        if isinstance(padding, (list, tuple)) and len(padding) not in (1, dims):
            return None
        return [(p, p) for p in _tup(padding, dims)]
    return None


def _cuts(n: int, L: int, k: int, s: int, d: int, pl: int, pr: int, mode: str, dynamic: bool,
          window: int) -> Tuple[_Cut, Optional[_Cut], Optional[_Cut]]:
    """(top/left corner, middle, bottom/right end) cuts of one spatial dim (None where the dim has none).

    Output ``o`` reads input ``o*s - pl + j*d`` (``j < k``), zero/mode padding outside ``[0, n)``. A crop keeps
    input ``[a, a+c)`` (``a`` a multiple of ``s``) so output ``o'`` of the conv on the crop, which pads the crop
    itself, is full output ``o' + a/s`` wherever ``o'`` reads only crop data, or reads padding where the full
    conv reads the same padding: at the true left border (``a = 0``) and, for crops that end at ``n``, the true
    right border. Circular padding wraps the other end in: a crop from 0 carries the last ``pl`` inputs after
    it, a crop to ``n`` the first ``pr`` before it. Dynamic 'same' padding depends on the size only modulo
    ``s``: crops keep ``c = n (mod s)`` so it pads them as it pads the whole. Reflect/replicate/circular need a
    crop longer than the padding. A corner whose crop is the whole input compares every output position; the
    middle window is centred on the data, or starts at the first output that reads any input when the corner
    reads only padding (a padding wider than the window), so some compared position always reads the data."""
    span = d * (k - 1) + 1
    low = max(pl, pr) + 1 if mode != "zeros" else 1
    m = min(L, window)
    j0 = -(-pl // s)  # from here on, an output of a crop not at the left border reads no padding

    def fit(c: int) -> int:  # the shortest crop length >= c the padding allows
        c = max(c, low)
        return c + (n - c) % s if dynamic else c

    def from_start(o: int) -> Optional[_Cut]:  # outputs o..o+m-1 from a crop short of the right end, if any
        j = min(o, j0)
        a, c = (o - j) * s, fit((j + m - 1) * s - pl + span)
        if a + c >= n or (a == 0 and mode == "circular" and pl and c + pl > n):
            return None
        wrap = (range(n - pl, n),) if a == 0 and mode == "circular" and pl else ()
        return _Cut((range(a, a + c),) + wrap, j, o, m)

    def to_end(o: int) -> _Cut:  # outputs o..o+m-1 from a crop that ends where the input ends
        pre = pr if mode == "circular" else 0
        lo = o * s - pl  # the first input they read
        a = lo - (lo - pre) % s  # a = pre (mod s): the crop starts on a stride step
        if pre + n - a < low:
            a -= -(-(low - pre - n + a) // s) * s
        if a <= 0:
            return _Cut((range(n),), o, o, m)
        q = (a - pre) // s
        return _Cut(((range(pre), range(a, n)) if pre else (range(a, n),)), o - q, o, m)

    corner = from_start(0)
    if corner is None:  # the crop would be the whole input: compare all of it
        return _Cut((range(n),), 0, 0, L), None, None
    if m == L:
        return corner, None, None
    reads = [max(0, -(-(pl - j * d) // s)) for j in range(k)]  # per tap, the first output it reads input at
    reads = [o for j, o in zip(range(k), reads) if o < L and o * s - pl + j * d < n]
    if reads and min(reads) >= m:
        mid = min(min(reads), L - m)
    else:
        mid = min(max(((n - 1) // 2 + pl - (span - 1) // 2) // s - m // 2, 0), L - m)
    middle = (from_start(mid) or to_end(mid)) if 0 < mid < L - m else None
    return corner, middle, to_end(L - m)


def _crop(t: torch.Tensor, index: Sequence[Tuple[range, ...]]) -> torch.Tensor:
    """A contiguous copy of ``t`` at the given positions of each of its last ``len(index)`` dims."""
    dims = len(index)
    for i, ranges in enumerate(index):
        axis = t.dim() - dims + i
        parts = [t.narrow(axis, r.start, len(r)) for r in ranges if len(r)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, axis)
    return t.clone(memory_format=torch.contiguous_format)


def bounded_probe(x: torch.Tensor, y: torch.Tensor, kernel: Tuple[int, ...], conv_args: Dict[str, Any],
                  window: int = PROBE_WINDOW) -> Probe:
    """The self-check's sample of one conv call, of bounded size: its first batch item, cropped.

    ``x``/``y``: the conv's input (as called, before its own padding) and output, batched or not; ``kernel``:
    its spatial kernel (1-D or 2-D); ``conv_args``: ``stride``, ``padding`` (int, tuple, ``'same'``,
    ``'valid'``), ``dilation``, ``padding_mode``, ``dynamic_same`` as :func:`describe` and :func:`conv_settings`
    give them (missing keys: ``nn.Conv*d``'s defaults). Keeps up to three windows of at most ``window`` output
    positions per dim: the top-left corner (the left/top padding, as the layer pads), the bottom-right end (the
    right/bottom padding) and the middle (the data), each with the input crop that the same conv maps exactly
    onto them (see :func:`_cuts`: exact for every padding mode, stride, dilation and dynamic 'same' padding).
    Settings it cannot read, and items smaller than the windows, keep the whole item (:meth:`Probe.whole`);
    settings that do not give the output's shape (a misread layer, which the self-check's shape check then
    refuses) keep the corner. Every tensor kept is a copy, so the conv's activations are not held.
    """
    dims = len(kernel)
    x, y = x.detach(), y.detach()
    if x.dim() == dims + 2:
        x, y = x[:1], y[:1]
    in_shape, out_shape = tuple(x.shape), tuple(y.shape)
    stride = _tup(conv_args.get("stride", 1), dims)
    dilation = _tup(conv_args.get("dilation", 1), dims)
    dynamic = bool(conv_args.get("dynamic_same", False))
    mode = "zeros" if dynamic else conv_args.get("padding_mode", "zeros")
    n_in, n_out = in_shape[-dims:], out_shape[-dims:]
    if dynamic:
        flat = tf_same_pad(n_in, kernel, stride, dilation)  # last dim first
        pads = [(flat[2 * i], flat[2 * i + 1]) for i in reversed(range(dims))]
    else:
        pads = _pads(conv_args.get("padding", 0), kernel, dilation)
    if pads is None or mode not in ("zeros", "reflect", "replicate", "circular") or x.dim() != y.dim():
        return Probe.whole(x.clone(), y.clone())
    cuts, fits = [], True
    for n, L, k, s, d, (pl, pr) in zip(n_in, n_out, kernel, stride, dilation, pads):
        expected = -(-n // s) if dynamic else (n + pl + pr - d * (k - 1) - 1) // s + 1
        fits = fits and expected == L
        cuts.append(_cuts(n, min(L, max(expected, 1)), k, s, d, pl, pr, mode, dynamic, window))
    picks = [tuple(c[0] for c in cuts)]
    if fits:
        for which in (2, 1):  # the end, then the middle; a dim without one uses its corner
            pick = tuple(c[which] or c[0] for c in cuts)
            if pick not in picks:
                picks.append(pick)
    per_in, per_out = x.numel() // max(math.prod(n_in), 1), y.numel() // max(math.prod(n_out), 1)
    kept = sum(math.prod(sum(map(len, c.index)) for c in pick) * per_in + math.prod(c.count for c in pick) * per_out
               for pick in picks)
    if kept >= x.numel() + y.numel():  # small inputs: overlapping windows would hold more than the item
        return Probe.whole(x.clone(), y.clone())
    windows = tuple(
        Window(_crop(x, [c.index for c in pick]),
               _crop(y, [(range(c.first, c.first + c.count),) for c in pick]),
               tuple(c.start for c in pick), tuple(c.first for c in pick))
        for pick in picks)
    return Probe(windows, in_shape, out_shape)


def attention_sites(target: str, mod: nn.Module, nodes: List[fx.Node], *,
                    in_shapes: Optional[List[Optional[Tuple[int, ...]]]] = None) -> List[ConvSite]:
    """``nn.MultiheadAttention``'s two weight layers, reported and left dense with the reason: its forward computes
    them inside ``F.multi_head_attention_forward`` (packed or per-projection weights, no module to swap). Rows come
    from the query's shape (``in_shapes`` on the module-swap route)."""
    if in_shapes is None:
        in_shapes = [_out_shape(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None for n in nodes]
    batch, rows = _rows_of(in_shapes)
    why = ("nn.MultiheadAttention computes its projections inside F.multi_head_attention_forward (no layer "
           "module to replace): not rewritten")
    e = mod.embed_dim
    sites = []
    for name, cin, cout, bias in ((f"{target}.in_proj", e, 3 * e, mod.in_proj_bias is not None),
                                  (f"{target}.out_proj", e, e, mod.out_proj.bias is not None)):
        spec = ConvSpec(name=name, in_channels=cin, out_channels=cout, kernel=(), groups=1, stride=(), dilation=(),
                        bias=bias, batch=batch, calls=max(len(in_shapes), 1), pixels=rows, origin="module",
                        extra={"unsupported": why})
        sites.append(ConvSite(spec, None, None, FxHandle("module", name, nodes, module=mod)))
    return sites


def collect_sites(gm: fx.GraphModule, probes: Optional[Dict[fx.Node, Probe]] = None) -> List[ConvSite]:
    """Every convolution and linear layer in ``gm`` (shape-propagated with ShapeProp), in graph order, each
    module once.

    ``probes`` (from :class:`ProbeProp`) are attached to the sites for the self-check."""
    by_target: "OrderedDict[str, List[fx.Node]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_module" and (is_weight_module(gm.get_submodule(node.target))
                                         or isinstance(gm.get_submodule(node.target), PAIR_TYPES + (nn.MultiheadAttention,))):
            by_target.setdefault(node.target, []).append(node)
    sites = []
    for t, nodes in by_target.items():
        mod = gm.get_submodule(t)
        if is_weight_module(mod):
            sites.append(module_site(t, mod, nodes))
            continue
        if isinstance(mod, nn.MultiheadAttention):
            sites.extend(attention_sites(t, mod, nodes))
            continue
        # a pair from an earlier rewrite: both halves are reported (same output positions), never rewritten
        for half in (("reduce", "expand") if isinstance(mod, LOWRANK_TYPES) else ("depthwise", "pointwise")):
            site = module_site(f"{t}.{half}", getattr(mod, half), nodes)
            site.spec.extra["unsupported"] = "part of a pair from an earlier rewrite"
            sites.append(site)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    sites = sorted(sites + _function_sites(gm), key=lambda s: order[s.handle.nodes[0]])
    for s in sites:
        s.probe = (probes or {}).get(s.handle.nodes[0])
    return sites
