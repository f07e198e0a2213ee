"""The captured graph's inputs, and parameter lifting.

Dynamo passes parameters as graph inputs, so a conv module arrives as ``F.conv2d(x, <input>, ...)`` and an
``nn.Linear`` (or ``F.linear`` on a parameter) as ``torch._C._nn.linear(x, <input>, <input>)``. Lifting turns each
such call into a ``call_module`` of an ``nn.Conv*d`` / ``nn.Linear`` holding that very parameter, named by its
module path, so the shared fx frontend (:func:`~dsrewrite.frontends.fx.collect_sites`) and planner see what
``rewrite()`` sees; :func:`unlift` puts the layers left dense back as they were captured. Argument binding is the
fx frontend's.

A parameter's module path is read from its Dynamo source, walked link by link (attribute, item, module wrapper):
``L['self'].__dict__['_modules']['conv_in']._parameters['weight']`` (a module class with its own ``__getattr__``,
e.g. diffusers' ``ModelMixin``) is ``conv_in.weight``, as is ``L['self'].conv_in.weight``. A source of another
shape names the conv after its graph input instead. A conv lifting cannot map is left as captured, with the reason.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx, nn

from ..errors import first_line
from ..frontends.fx import (CONV_FUNCTIONS, LINEAR_FUNCTIONS, bind_conv_args, computed_at_run_time, conv_settings,
                            owner_name)

__all__ = ["NAMESPACE", "GraphInputs", "LiftedConv", "lift_convs", "unlift", "declare_params", "hint", "source_text",
           "source_text_of", "source_path", "param_path", "conv_module_path", "Unlifted"]

NAMESPACE = "dsrewrite_convs"  # where lifted and rewritten conv (and linear) modules live inside the captured graph
_STATE_ATTRS = {"_modules", "_parameters", "_buffers", "__dict__"}  # links of a source that are no name


# ---------------------------------------------------------------------------------------------- sources
def hint(a: Any) -> Any:
    """A concrete value for a graph input: SymInts become their hint (no guard is added)."""
    if isinstance(a, torch.SymInt):
        # heavy: Dynamo's modules load with torch.compile, not with import dsrewrite
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return optimization_hint(a)
    return a


def source_text_of(src: Any) -> str:
    """A Dynamo source as text, e.g. ``L['self']._modules['conv1']._parameters['weight']``."""
    name = src.name
    return name() if callable(name) else str(name)  # a method in older torch, a property in newer


def source_text(node: fx.Node) -> str:
    """The Dynamo source of a placeholder as text, ``""`` when it has none."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    return "" if src is None else source_text_of(src)


def source_path(src: Any) -> Optional[str]:
    """The module path a Dynamo source names, the root local or global dropped, or ``None`` for a source of another
    shape: ``L['self']._modules['conv1']._parameters['weight']``, ``L['self'].conv1.weight`` and
    ``L['self'].__dict__['_modules']['conv1']._parameters['weight']`` are all ``conv1.weight``."""
    parts: List[str] = []
    while True:
        if src is None or len(parts) > 256:
            return None
        if hasattr(src, "local_name") or hasattr(src, "global_name"):  # the root: L['self'], G['model']
            break
        base = getattr(src, "base", None)
        member = getattr(src, "member", None)
        index = getattr(src, "index", None)
        if base is None:
            return None
        if isinstance(member, str):  # obj.member (AttrSource and its kinds)
            parts.append(member)
        elif index is not None and not getattr(src, "index_is_slice", False) and isinstance(index, (str, int)) \
                and not isinstance(index, bool):  # obj[key] (item of a dict, list, ModuleList...)
            parts.append(str(index))
        elif not _is_module_wrapper(src):
            return None
        src = base
    parts = [p for p in reversed(parts) if p not in _STATE_ATTRS]
    if not parts or any(not p or "." in p for p in parts):
        return None
    return ".".join(parts)


def conv_module_path(node: fx.Node) -> Optional[str]:
    """The path of the conv (or linear) module whose forward made this functional call (Dynamo's
    ``nn_module_stack``: ``L['self'].encoder.pos_conv_embed.conv`` -> ``encoder.pos_conv_embed.conv``, the name
    ``rewrite()`` gives a conv module), or ``None`` when the innermost module is neither or its path does not read
    as one."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    text, cls = list(stack.values())[-1]
    if not (isinstance(cls, type) and issubclass(cls, (nn.modules.conv._ConvNd, nn.Linear))) \
            or not isinstance(text, str):
        return None
    m = re.fullmatch(r"(?:L|G)\['[^']*'\]((?:\.[A-Za-z_]\w*|\['[^']*'\]|\[\d+\])*)", text)
    if m is None:
        return None
    parts = [a or b or c for a, b, c in re.findall(r"\.([A-Za-z_]\w*)|\['([^']*)'\]|\[(\d+)\]", m.group(1))]
    parts = [p for p in parts if p not in _STATE_ATTRS]
    return ".".join(parts) if parts and all(parts) else None


def _is_module_wrapper(src: Any) -> bool:
    """Dynamo's ``NNModuleSource`` kinds: the same object as their base, marked as a module."""
    try:
        from torch._dynamo.source import NNModuleSource  # heavy: loads with torch.compile, not import dsrewrite
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(src, NNModuleSource)


def param_path(node: fx.Node) -> Optional[str]:
    """The module path of the parameter a placeholder stands for (see :func:`source_path`), or ``None``."""
    return source_path(getattr(node.meta.get("grapharg"), "source", None))


@dataclass
class GraphInputs:
    """The captured graph's inputs: which are parameters (with their module path), which are data."""

    placeholders: List[fx.Node]
    values: List[Any]
    params: Dict[fx.Node, Tuple[int, nn.Parameter, str]]  # placeholder -> (index, parameter, module path)
    data: List[int]  # tensor inputs that are neither parameters nor buffers

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> "GraphInputs":
        """Classify ``gm``'s placeholders by the example inputs Dynamo passed and their sources."""
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = [hint(a) for a in example_inputs]
        params, data = {}, []
        for i, (node, v) in enumerate(zip(ph, values)):
            if isinstance(v, nn.Parameter):
                params[node] = (i, v, param_path(node) or node.name)
            elif isinstance(v, torch.Tensor) and "._buffers[" not in source_text(node):
                data.append(i)
        return cls(ph, values, params, data)

    def data_shapes(self) -> List[List[int]]:
        """Shapes of the data inputs (the report's input shapes)."""
        return [[int(hint(s)) for s in self.values[i].shape] for i in self.data]

    def param_count(self) -> int:
        """Elements of the distinct parameters passed as inputs."""
        return sum(p.numel() for p in {id(v[1]): v[1] for v in self.params.values()}.values())


# ---------------------------------------------------------------------------------------------- lifting
@dataclass
class LiftedConv:
    """A functional conv (or linear) on a parameter input, turned into a conv (``nn.Linear``) module for planning;
    ``calls`` restore it."""

    path: str  # module path inside the GraphModule
    name: str  # the name rewrite() gives it (report, include/exclude)
    weight_index: int
    bias_index: Optional[int]
    calls: Dict[fx.Node, Tuple[Any, tuple, dict]] = field(default_factory=dict)  # call_module -> original call


def _conv_module(dims: int, weight: nn.Parameter, bias: Optional[nn.Parameter], hyper: dict) -> nn.Module:
    """An ``nn.Conv*d`` holding ``weight``/``bias`` themselves (built on the meta device: nothing is copied)."""
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    cout, cin_g = weight.shape[:2]
    g = int(hyper["groups"])
    conv = cls(cin_g * g, cout, tuple(weight.shape[2:]), stride=hyper["stride"], padding=hyper["padding"],
               dilation=hyper["dilation"], groups=g, bias=False, device="meta")
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    return conv


def _linear_module(weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
    """An ``nn.Linear`` holding ``weight``/``bias`` themselves (built on the meta device: nothing is copied)."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight must be 2-D, got shape {list(weight.shape)}")
    cout, cin = weight.shape
    linear = nn.Linear(int(cin), int(cout), bias=False, device="meta")
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def _layer_module(target: Any, weight: nn.Parameter, bias: Optional[nn.Parameter], bound: dict) -> nn.Module:
    """The module a functional conv or linear call on parameter inputs stands for."""
    if target in LINEAR_FUNCTIONS:
        return _linear_module(weight, bias)
    return _conv_module(CONV_FUNCTIONS[target], weight, bias, conv_settings(bound))


@dataclass
class Unlifted:
    """A conv on a parameter input that lifting left as captured: its name and why (the report's reason)."""

    name: str
    reason: str


_RESERVED = frozenset(dir(nn.Module()))  # names a submodule may not take (methods, `training`, ...)


def _free_path(gm: nn.Module, name: str) -> str:
    """A new, flat path under :data:`NAMESPACE` for the conv named ``name``: one attribute name made of word
    characters, not a name ``nn.Module`` already uses (module paths hold any characters; attributes may not)."""
    base = re.sub(r"\W", "_", name.replace(".", "__")) or "conv"
    if base in _RESERVED or base.startswith("__"):
        base = f"m_{base}"
    ns = getattr(gm, NAMESPACE, None)
    taken = set(ns._modules) if isinstance(ns, nn.Module) else set()
    key, i = base, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return f"{NAMESPACE}.{key}"


def _why_not_liftable(calls: List[Tuple[fx.Node, dict]], inputs: GraphInputs) -> Optional[str]:
    """Why the calls on one weight cannot become one conv (or linear) module (``None``: they can)."""
    node0, b0 = calls[0]
    b_node = b0.get("bias")
    if node0.target in LINEAR_FUNCTIONS:
        if b_node is not None and b_node not in inputs.params:
            return "bias is computed at run time (not a parameter)"
        if any(b.get("bias") is not b_node or n.target not in LINEAR_FUNCTIONS for n, b in calls[1:]):
            return "the same weight is used by calls with different biases or layer kinds"
        return None
    hyper = conv_settings(b0)
    if any(computed_at_run_time(v) for v in hyper.values()):
        return "stride/padding/dilation/groups computed at run time"
    if b_node is not None and b_node not in inputs.params:
        return "bias is computed at run time (not a parameter)"
    for n, b in calls[1:]:
        if {k: b.get(k, hyper[k]) for k in hyper} != hyper:
            return "the same weight is used with different conv settings"
        if b.get("bias") is not b_node or n.target is not node0.target:
            return "the same weight is used by conv calls with different biases or dimensions"
    return None


def lift_convs(gm: fx.GraphModule, inputs: GraphInputs) -> Tuple[Dict[str, LiftedConv], Dict[fx.Node, Unlifted]]:
    """Turn ``conv(x, <parameter input>, ...)`` and ``linear(x, <parameter input>, ...)`` calls into
    ``call_module`` of a conv / ``nn.Linear`` holding that parameter.

    A weight used by several calls with the same settings becomes one module called several times (as a shared
    module in ``rewrite()``). Returns the lifted layers by module path, and those left as captured by their
    weight's placeholder, with the reason (settings computed at run time, a bias that is not a parameter, one
    weight under different settings, a module that cannot be built from the call): they stay dense.
    """
    groups: "OrderedDict[fx.Node, List[Tuple[fx.Node, dict]]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in LINEAR_FUNCTIONS):
            bound = bind_conv_args(node)
            if bound.get("weight") in inputs.params and "input" in bound:
                groups.setdefault(bound["weight"], []).append((node, bound))
    lifted: Dict[str, LiftedConv] = {}
    unlifted: Dict[fx.Node, Unlifted] = {}
    for w_node, calls in groups.items():
        w_index, weight, fqn = inputs.params[w_node]
        name = owner_name(fqn)  # the owner module, as rewrite() names it
        try:
            reason = _why_not_liftable(calls, inputs)
            if reason is None:
                node0, b0 = calls[0]
                b_node = b0.get("bias")
                b_index, bias = (inputs.params[b_node][:2]) if b_node is not None else (None, None)
                module = _layer_module(node0.target, weight, bias, b0)
                path = _free_path(gm, name)
                if not gm.add_submodule(path, module) or gm.get_submodule(path) is not module:
                    reason = f"no room for its conv module at {path!r} in the captured graph"
        except Exception as e:  # noqa: BLE001 - a layer lifting cannot map stays as captured, with the reason
            what = "a linear" if calls[0][0].target in LINEAR_FUNCTIONS else "a conv"
            reason = f"its call cannot be read as {what} module ({first_line(e, 160, typed=True)})"
        if reason is not None:
            unlifted[w_node] = Unlifted(name, f"not lifted from the torch.compile graph: {reason}")
            continue
        item = LiftedConv(path, name, w_index, b_index)
        for node, _ in calls:  # node.args now, not `bound`: earlier lifts replaced some inputs
            x = node.args[0] if node.args else node.kwargs["input"]
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(path, (x,))
            call.meta.update(node.meta)
            item.calls[call] = (node.target, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        lifted[path] = item
    return lifted, unlifted


def unlift(gm: fx.GraphModule, lifted: Dict[str, LiftedConv], rewritten: Set[str]) -> None:
    """Convs and linear layers left dense read their graph inputs again, exactly as Dynamo captured them."""
    for path, item in lifted.items():
        if path in rewritten:
            continue
        for call, (target, args, kwargs) in item.calls.items():
            x = call.args[0]  # the input as it is now (a later lift may have replaced the captured one)
            args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input": x})
            with gm.graph.inserting_before(call):
                node = gm.graph.call_function(target, args, kwargs)
            node.meta.update(call.meta)
            call.replace_all_uses_with(node)
            gm.graph.erase_node(call)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def declare_params(gm: fx.GraphModule) -> None:
    """Give the factors (and ragged pairs' channel index buffers) a Dynamo source. AOT autograd (under Inductor)
    looks up the source of every parameter and buffer of a Dynamo graph module (guards, cudagraph static
    inputs); the factors have none in user code."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource  # heavy: Dynamo loads with torch.compile, not with import dsrewrite

    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, _ in named:
        if name not in table:
            table[name] = ConstantSource(f"__dsrewrite_{name.replace('.', '_')}")
