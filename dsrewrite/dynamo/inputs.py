"""The captured graph's inputs, and parameter lifting.

Dynamo passes parameters as graph inputs, so a conv module arrives as ``F.conv2d(x, <input>, ...)``. Lifting turns
each such call into a ``call_module`` of an ``nn.Conv*d`` holding that very parameter, named by its module path, so
the shared fx frontend (:func:`~dsrewrite.frontends.fx.collect_sites`) and planner see what ``rewrite()`` sees;
:func:`unlift` puts the convs left dense back as they were captured. Argument binding is the fx frontend's.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx, nn

from ..frontends.fx import CONV_FUNCTIONS, bind_conv_args, computed_at_run_time, conv_settings, owner_name

__all__ = ["NAMESPACE", "GraphInputs", "LiftedConv", "lift_convs", "unlift", "declare_params", "hint", "source_text",
           "source_text_of", "source_path"]

NAMESPACE = "dsrewrite_convs"  # where lifted and rewritten conv modules live inside the captured GraphModule
_STATE_ATTRS = {"_modules", "_parameters", "_buffers"}


# ---------------------------------------------------------------------------------------------- sources
def hint(a: Any) -> Any:
    """A concrete value for a graph input: SymInts become their hint (no guard is added)."""
    if isinstance(a, torch.SymInt):
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


def source_path(text: str) -> Optional[str]:
    """``L['self']._modules['conv1']._parameters['weight']`` -> ``conv1.weight`` (the root local dropped)."""
    parts = [a or b or c for a, b, c in re.findall(r"\['([^']*)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]", text)]
    parts = [p for p in parts[1:] if p not in _STATE_ATTRS]
    return ".".join(parts) or None


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
                params[node] = (i, v, source_path(source_text(node)) or node.name)
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
    """A functional conv on a parameter input, turned into a conv module for planning; ``calls`` restore it."""

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


def _free_path(gm: nn.Module, name: str) -> str:
    path, i = f"{NAMESPACE}.{name}", 1
    while True:
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        i += 1
        path = f"{NAMESPACE}.{name}_{i}"


def lift_convs(gm: fx.GraphModule, inputs: GraphInputs) -> Dict[str, LiftedConv]:
    """Turn ``conv(x, <parameter input>, ...)`` calls into ``call_module`` of a conv holding that parameter.

    A weight used by several calls with the same settings becomes one module called several times (as a shared
    module in ``rewrite()``); anything else (settings computed at run time, a bias that is not a parameter,
    one weight under different settings) is left for the fx frontend to report.
    """
    groups: "OrderedDict[fx.Node, List[Tuple[fx.Node, dict]]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in CONV_FUNCTIONS:
            bound = bind_conv_args(node)
            if bound.get("weight") in inputs.params and "input" in bound:
                groups.setdefault(bound["weight"], []).append((node, bound))
    lifted: Dict[str, LiftedConv] = {}
    for w_node, calls in groups.items():
        node0, b0 = calls[0]
        hyper = conv_settings(b0)
        b_node = b0.get("bias")
        if (any(computed_at_run_time(v) for v in hyper.values())
                or (b_node is not None and b_node not in inputs.params)
                or any({k: b.get(k, hyper[k]) for k in hyper} != hyper or b.get("bias") is not b_node
                       or n.target is not node0.target for n, b in calls[1:])):
            continue
        w_index, weight, fqn = inputs.params[w_node]
        b_index, bias = (inputs.params[b_node][:2]) if b_node is not None else (None, None)
        try:
            module = _conv_module(CONV_FUNCTIONS[node0.target], weight, bias, hyper)
        except (ValueError, TypeError, RuntimeError):
            continue
        name = owner_name(fqn)  # the owner module, as rewrite() names it
        path = _free_path(gm, name)
        gm.add_submodule(path, module)
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
    return lifted


def unlift(gm: fx.GraphModule, lifted: Dict[str, LiftedConv], rewritten: Set[str]) -> None:
    """Convs left dense read their graph inputs again, exactly as Dynamo captured them."""
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
    from torch._dynamo.source import ConstantSource

    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, _ in named:
        if name not in table:
            table[name] = ConstantSource(f"__dsrewrite_{name.replace('.', '_')}")
