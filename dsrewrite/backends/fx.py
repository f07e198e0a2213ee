"""torch.fx backend: install the pair modules for the decided layers (``SeparableConv*d`` for KxK convs,
``LowRank*`` for 1x1 convs and linear layers), keeping qualified names."""
from __future__ import annotations

import importlib
import types
from typing import Any, Dict, List, Optional

import torch
from torch import fx, nn

from ..plan.factorize import Factors
from ..modules import (CONV_INTERFACE, LINEAR_INTERFACE, LowRankConv1d, LowRankConv2d, LowRankLinear, SeparableConv1d,
                       SeparableConv2d)
from ..plan.planner import Decision

__all__ = ["apply_decisions", "set_submodule", "pair_for", "GraphForward", "carry_attributes"]


class GraphForward:
    """A module's ``forward`` replaced by a (rewritten) fx graph of it, run with the module itself as ``self``.

    Installed as ``module.forward`` (an instance attribute), so the module keeps its class, attributes,
    properties, methods and hooks; ``self.<child>`` in the graph resolves on the live module tree, so swaps of
    its children apply. Pickles and deep-copies with its module (the code is regenerated from the source).
    """

    def __init__(self, owner: nn.Module, graph: fx.Graph) -> None:
        code = graph.python_code(root_module="self")
        self.owner = owner
        self.src = code.src
        self.globals = dict(code.globals)
        self._compile()

    def _compile(self) -> None:
        scope = dict(self.globals)
        exec(compile(self.src, f"<dsrewrite forward of {type(self.owner).__name__}>", "exec"), scope)  # noqa: S102
        self._fn = scope["forward"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self.owner, *args, **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        # Python modules in the code's globals (``torch``...) travel by name; functions pickle by reference
        names = {k: v.__name__ for k, v in self.globals.items() if isinstance(v, types.ModuleType)}
        rest = {k: v for k, v in self.globals.items() if k not in names}
        return {"owner": self.owner, "src": self.src, "globals": rest, "module_globals": names}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        modules = state.pop("module_globals", {})
        self.__dict__.update(state)
        self.globals.update({k: importlib.import_module(v) for k, v in modules.items()})
        self._compile()

    def __repr__(self) -> str:
        return f"GraphForward({type(self.owner).__name__}, rewritten by dsrewrite)"


def set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Replace (or add) the submodule at ``qualname`` under ``root``, creating no new path components."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def pair_for(decision: Decision, *, backend: str = "auto", factors: Optional[Factors] = None) -> nn.Module:
    """The pair module for a decision, with the layer's settings (``site.handle.conv_args``: stride, padding,
    dilation, padding mode, dynamic 'same' padding): a ``SeparableConv*d`` for a KxK conv, a ``LowRankConv*d``
    for a 1x1 conv, a ``LowRankLinear`` for a linear layer. ``factors`` overrides the decided ones (the
    self-check builds an exact pair this way)."""
    a = decision.site.handle.conv_args
    spec = decision.site.spec
    f = factors if factors is not None else decision.factors
    if spec.lowrank:
        if spec.kind == "linear":
            mod = LowRankLinear.from_factors(f)
        else:  # a 1x1 conv: its padding is static ('same' pads nothing for one tap)
            cls = LowRankConv1d if spec.spatial_dims == 1 else LowRankConv2d
            padding = a.get("padding", 0)
            mod = cls.from_factors(f, stride=a.get("stride", 1), padding=0 if isinstance(padding, str) else padding,
                                   dilation=a.get("dilation", 1), padding_mode=a.get("padding_mode", "zeros"))
    else:
        mod = _separable(decision, f, backend, exact=factors is not None)
    frozen = isinstance(decision.site.weight, torch.Tensor) and not decision.site.weight.requires_grad
    return mod.requires_grad_(False) if frozen else mod  # a frozen layer stays frozen


def _separable(decision: Decision, factors: Factors, backend: str, exact: bool) -> nn.Module:
    a = decision.site.handle.conv_args
    cls = SeparableConv1d if decision.site.spec.spatial_dims == 1 else SeparableConv2d
    return cls.from_factors(factors, stride=a.get("stride", 1), padding=a.get("padding", 0),
                            dilation=a.get("dilation", 1), padding_mode=a.get("padding_mode", "zeros"),
                            dynamic_same=bool(a.get("dynamic_same")), backend=backend,
                            gather_input=decision.gather_input and not exact)


_CONV_OWN = (frozenset(nn.Conv2d(1, 1, 1).__dict__) | frozenset(nn.Conv1d(1, 1, 1).__dict__)
             | frozenset(nn.Linear(1, 1).__dict__))


def carry_attributes(conv: nn.Module, pair: nn.Module) -> nn.Module:
    """Copy the plain attributes user code set on a conv instance (``conv.is_stem = True``) onto its pair, so
    code that reads them still finds them; torch's own conv attributes are answered by the pair itself."""
    for k, v in conv.__dict__.items():
        if (k not in _CONV_OWN and k not in CONV_INTERFACE and k not in LINEAR_INTERFACE and k not in pair.__dict__ and not isinstance(v, nn.Module)):
            object.__setattr__(pair, k, v)
    return pair


def _function_module_name(gm: fx.GraphModule, weight_target: str, namespace: Optional[nn.Module] = None,
                          lowrank: bool = False) -> str:
    owner, _, attr = weight_target.rpartition(".")
    what = "lowrank" if lowrank else "separable"
    base = what if attr == "weight" else f"{attr}_{what}"
    name = f"{owner}.{base}" if owner else base
    i = 1
    candidate = name
    while _exists(gm, candidate) or (namespace is not None and _taken(namespace, candidate)):
        i += 1
        candidate = f"{name}{i}"
    return candidate


def _exists(gm: nn.Module, qualname: str) -> bool:
    try:
        gm.get_submodule(qualname)
        return True
    except AttributeError:
        return False


def _taken(root: nn.Module, qualname: str) -> bool:
    """Whether ``qualname`` already names anything (module, parameter, attribute) under ``root``."""
    parent, _, attr = qualname.rpartition(".")
    try:
        return hasattr(root.get_submodule(parent) if parent else root, attr)
    except AttributeError:
        return False


def _drop_param_if_unused(gm: fx.GraphModule, target: Optional[str]) -> None:
    if target is None:
        return
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target == target:
            if node.users:
                return
            gm.graph.erase_node(node)
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if attr in mod._parameters:
        del mod._parameters[attr]


def apply_decisions(gm: fx.GraphModule, decisions: List[Decision], *, backend: str = "auto",
                    also: Optional[nn.Module] = None, namespace: Optional[nn.Module] = None) -> bool:
    """Write every rewritten decision into ``gm``; returns whether anything changed.

    ``also``: another module tree (the user's model, with ``inplace=True``) that gets the same module swaps.
    ``namespace``: a module whose names new pair modules must not take either (the module ``gm`` was traced
    from, when the graph becomes its forward: :class:`GraphForward`).
    """
    modified = False
    for d in decisions:
        if not d.rewritten:
            continue
        h = d.site.handle
        new = pair_for(d, backend=backend)
        if h.kind == "module":
            carry_attributes(h.module, new)
            set_submodule(gm, h.target, new)
            if also is not None:
                try:
                    set_submodule(also, h.target, new)
                except AttributeError:
                    pass
        else:
            name = _function_module_name(gm, h.weight_target, namespace, d.site.spec.lowrank)
            gm.add_submodule(name, new)
            what = "linear" if d.site.spec.kind == "linear" else "conv"
            d.report.note = (d.report.note + "; " if d.report.note else "") + f"functional {what}, now module {name}"
            for node in h.nodes:
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
                call.meta.update(node.meta)
                node.replace_all_uses_with(call)
                gm.graph.erase_node(node)
            _drop_param_if_unused(gm, h.weight_target)
            _drop_param_if_unused(gm, h.bias_target)
        d.module = new
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return modified
