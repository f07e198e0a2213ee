"""Which conv *modules* the pass understands, and what each one really computes.

A conv module is rewritten only when its class is known here: the exact ``nn.Conv*d`` classes, the
registered subclasses (timm's dynamic-'same' and weight-standardised convs), and plain convs whose weight
comes from ``torch.nn.utils.parametrize`` or the hook-based ``weight_norm`` / ``spectral_norm``. For each
one :func:`describe` gives the *effective* weight, padding and dilation. Anything else (a subclass with its
own ``forward``, QAT convs, convs with forward hooks) gets a reason naming the class, never a guess.

Weights computed at run time (standardised, parametrized) are folded for inference only: in train mode the
layer is refused, because the pair would freeze what the original recomputes at every step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..modules import tf_same_pad

__all__ = ["ConvModuleInfo", "describe", "deepcopy_module", "register_conv_module", "is_known_conv_class",
           "has_unknown_forward", "weight_states", "tf_same_pad",
           "CONV_MODULE_TYPES", "TRANSPOSED_TYPES", "LINEAR_MODULE_TYPES", "WEIGHT_MODULE_TYPES",
           "register_linear_module", "is_linear_module", "is_weight_module"]

TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_MODULE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_TYPES
LINEAR_MODULE_TYPES = (nn.Linear,)  # subclasses too: described as linear layers when their forward is nn.Linear's
WEIGHT_MODULE_TYPES = CONV_MODULE_TYPES + LINEAR_MODULE_TYPES  # the modules frontends make sites of
_PLAIN = frozenset(CONV_MODULE_TYPES)


@dataclass
class ConvModuleInfo:
    """What a conv module computes: ``F.conv*d(pad(x), weight, bias, stride, padding, dilation, groups)``.

    ``dynamic_same``: the input is first padded TF-style 'same' for its own size (:func:`tf_same_pad`);
    ``folded``: how a run-time weight was folded (``None`` for a stored weight); ``unsupported``: why the
    module cannot be rewritten (then ``weight`` is ``None``).
    """

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    conv_args: Dict[str, object] = field(default_factory=dict)  # stride, padding, dilation, padding_mode, dynamic_same
    folded: Optional[str] = None
    unsupported: Optional[str] = None


@dataclass(frozen=True)
class _Entry:
    weight: Optional[Callable[[nn.Module], torch.Tensor]]  # effective weight; None: the stored one
    dynamic_same: Callable[[nn.Module], bool]
    what: str  # how the weight is computed, for the report ("" for a stored weight)


_REGISTRY: Dict[str, _Entry] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_LINEAR_REGISTRY: Dict[str, Callable[[nn.Module], torch.Tensor]] = {}


def register_linear_module(cls_or_name, *, weight: Callable[[nn.Module], torch.Tensor]) -> None:
    """Declare a module that is not an ``nn.Linear`` but computes ``F.linear(x, weight(m), m.bias)`` over its
    input's last dim (``weight(m)`` is ``[Cout, Cin]``), e.g. transformers' ``Conv1D`` (GPT-2), whose stored
    weight is the transpose. It is then rewritten as a linear layer; the self-check compares every rewritten
    layer with the module itself, so a wrong declaration is caught, not shipped."""
    key = cls_or_name if isinstance(cls_or_name, str) else _key(cls_or_name)
    _LINEAR_REGISTRY[key] = weight


def is_linear_module(mod: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a registered linear module (:func:`register_linear_module`)."""
    return isinstance(mod, LINEAR_MODULE_TYPES) or _key(type(mod)) in _LINEAR_REGISTRY


def is_weight_module(mod: nn.Module) -> bool:
    """A module frontends make a site of: a conv module or a linear one."""
    return isinstance(mod, CONV_MODULE_TYPES) or is_linear_module(mod)


def register_conv_module(cls_or_name, *, weight: Optional[Callable[[nn.Module], torch.Tensor]] = None,
                         dynamic_same: Callable[[nn.Module], bool] = lambda m: False, what: str = "") -> None:
    """Declare a ``nn.Conv*d`` subclass whose forward is ``F.conv*d(pad?(x), weight(m), m.bias, m.stride,
    m.padding, m.dilation, m.groups)``; ``dynamic_same(m)`` says whether it pads TF-style 'same' first.

    ``cls_or_name`` is the class or its ``"module.QualName"``. The per-layer self-check still compares every
    rewritten layer with the module itself, so a wrong declaration is caught, not shipped.
    """
    key = cls_or_name if isinstance(cls_or_name, str) else _key(cls_or_name)
    _REGISTRY[key] = _Entry(weight, dynamic_same, what)


def _standardised(m: nn.Module, gain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's weight standardisation (``StdConv2d``/``ScaledStdConv2d``): per output channel, zero mean and
    unit variance over the fan-in, as their ``forward`` computes it."""
    w = m.weight
    return F.batch_norm(w.reshape(1, m.out_channels, -1), None, None, weight=gain, training=True, momentum=0.0,
                        eps=m.eps).reshape_as(w)


def _scaled_standardised(m: nn.Module) -> torch.Tensor:
    return _standardised(m, (m.gain * m.scale).reshape(-1))


for _mod in ("timm.layers.conv2d_same", "timm.models.layers.conv2d_same"):
    register_conv_module(f"{_mod}.Conv2dSame", dynamic_same=lambda m: True)
for _mod in ("timm.layers.std_conv", "timm.models.layers.std_conv"):
    _same = lambda m: bool(getattr(m, "same_pad", False))  # noqa: E731
    register_conv_module(f"{_mod}.StdConv2d", weight=_standardised, what="weight standardised (timm StdConv2d)")
    register_conv_module(f"{_mod}.StdConv2dSame", weight=_standardised, dynamic_same=_same,
                         what="weight standardised (timm StdConv2dSame)")
    register_conv_module(f"{_mod}.ScaledStdConv2d", weight=_scaled_standardised,
                         what="weight standardised and scaled (timm ScaledStdConv2d)")
    register_conv_module(f"{_mod}.ScaledStdConv2dSame", weight=_scaled_standardised, dynamic_same=_same,
                         what="weight standardised and scaled (timm ScaledStdConv2dSame)")
# transformers' BiT / ViT-hybrid: timm's StdConv2d(Same) under another name (its DynamicPad2d pads TF 'same')
register_conv_module("transformers.models.bit.modeling_bit.WeightStandardizedConv2d", weight=_standardised,
                     dynamic_same=lambda m: getattr(m, "pad", None) is not None,
                     what="weight standardised (transformers WeightStandardizedConv2d)")


def weight_states(model: nn.Module) -> Dict[nn.Module, Tuple[int, int, int]]:
    """Each conv module's stored weight as (object, storage, version): compared across a forward, it tells which
    weights the model's own code assigns or changes in place (re-parametrised blocks do, at every call)."""
    states = {}
    for m in model.modules():
        w = m._parameters.get("weight") if is_weight_module(m) else None
        if w is not None:
            states[m] = (id(w), w.data_ptr(), w._version)
    return states


def has_unknown_forward(mod: nn.Module) -> bool:
    """A conv subclass with its own, unregistered ``forward`` (e.g. one padding through a child module first): the
    module-swap route then treats it as any module calling a conv function (traced alone), not as a conv."""
    cls = type(mod)
    base = cls.__bases__[0] if parametrize.is_parametrized(mod) else cls
    if is_linear_module(mod):
        return isinstance(mod, LINEAR_MODULE_TYPES) and base.forward is not nn.Linear.forward
    return isinstance(mod, CONV_MODULE_TYPES) and base not in _PLAIN and _key(base) not in _REGISTRY


def is_known_conv_class(cls: type) -> bool:
    """A registered conv subclass (kept whole as a leaf when tracing, described by :func:`describe`)."""
    return _key(cls) in _REGISTRY


def _hooks(mod: nn.Module) -> Tuple[list, list]:
    """(weight hooks we can fold: old-style weight_norm / spectral_norm, every other forward hook)."""
    foldable, other = [], []
    for h in mod._forward_pre_hooks.values():
        (foldable if isinstance(h, (WeightNorm, SpectralNorm)) and h.name == "weight" else other).append(h)
    other.extend(mod._forward_hooks.values())
    return foldable, other


def _effective(fn: Callable[[], torch.Tensor], trainable: bool) -> torch.Tensor:
    """A run-time weight evaluated once, detached; trainable when the weights it came from were."""
    with torch.no_grad():
        w = fn().detach().clone()
    return w.requires_grad_(trainable)


def deepcopy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for models with hook-based ``weight_norm`` / ``spectral_norm`` after a
    forward with gradients (their cached weight is then not a graph leaf, which deepcopy refuses): the caches
    are detached for the copy and restored; the hooks recompute them at the next forward anyway."""
    stash = []
    for m in model.modules():
        for h in _hooks(m)[0]:
            w = getattr(m, h.name, None)
            if isinstance(w, torch.Tensor) and not w.is_leaf:
                stash.append((m, h.name, w))
                setattr(m, h.name, w.detach())
    try:
        return copy.deepcopy(model)
    finally:
        for m, name, w in stash:
            setattr(m, name, w)


def describe(mod: nn.Module) -> ConvModuleInfo:
    """What ``mod`` (an ``nn.Conv*d`` or ``nn.Linear`` instance or subclass) computes, or why the pass must leave
    it alone."""
    cls = type(mod)
    base = cls
    param_names: Tuple[str, ...] = ()
    if parametrize.is_parametrized(mod):  # class ParametrizedConv2d(Conv2d), made by parametrize
        base = cls.__bases__[0]
        param_names = tuple(mod.parametrizations.keys())
    entry = _REGISTRY.get(_key(base))
    linear = is_linear_module(mod)
    if linear and _key(base) in _LINEAR_REGISTRY:  # its weight is stored another way (transposed): read it as [Cout, Cin]
        if _hooks(mod)[1] or param_names:
            return ConvModuleInfo(None, None, {}, unsupported=f"{cls.__name__} with hooks or parametrizations")
        return ConvModuleInfo(_LINEAR_REGISTRY[_key(base)](mod), mod.bias, {})
    args = {} if linear else {"stride": tuple(mod.stride), "padding": mod.padding, "dilation": tuple(mod.dilation),
                              "padding_mode": getattr(mod, "padding_mode", "zeros"), "dynamic_same": False}

    def refuse(reason: str) -> ConvModuleInfo:
        return ConvModuleInfo(None, None, args, unsupported=reason)

    if linear:
        if base.forward is not nn.Linear.forward:
            return refuse(f"linear subclass {_key(cls)} has its own forward: its semantics are unknown")
        if isinstance(mod.weight, nn.parameter.UninitializedParameter):
            return refuse("lazy linear layer not initialised")
    elif base not in _PLAIN and entry is None:
        return refuse(f"conv subclass {_key(cls)} has its own forward: its semantics are unknown "
                      "(dsrewrite.frontends.conv_modules.register_conv_module declares one)")
    foldable, other = _hooks(mod)
    if other:
        return refuse(f"{cls.__name__} has forward hooks ({', '.join(type(h).__name__ for h in other)}) "
                      "that the rewritten pair would not run")
    if set(param_names) - {"weight"}:
        return refuse(f"{', '.join(sorted(set(param_names) - {'weight'}))} computed by torch.nn.utils.parametrize "
                      "is not folded (only the weight is)")
    if not linear and base in TRANSPOSED_TYPES:
        return ConvModuleInfo(None, mod.bias, args)
    weight_fn: Optional[Callable[[], torch.Tensor]] = None
    what = []
    if entry is not None:
        args["dynamic_same"] = bool(entry.dynamic_same(mod))
        if args["dynamic_same"] and (isinstance(mod.padding, str) or any(mod.padding)):
            return refuse(f"{cls.__name__} pads dynamically and also has padding={mod.padding!r}")
        if entry.weight is not None:
            weight_fn, what = (lambda: entry.weight(mod)), [entry.what]
    if param_names:
        if weight_fn is not None:
            return refuse(f"{cls.__name__}: a parametrized weight that is also recomputed in forward")
        kinds = ", ".join(type(p).__name__ for p in mod.parametrizations.weight)
        weight_fn, what = (lambda: mod.weight), [f"weight from torch.nn.utils.parametrize ({kinds})"]
    if foldable:
        if weight_fn is not None:
            return refuse(f"{cls.__name__}: a weight hook on a weight that is also recomputed")
        hook = foldable[0]
        if type(hook).__name__ == "SpectralNorm":
            weight_fn = lambda: hook.compute_weight(mod, do_power_iteration=False)  # noqa: E731
        else:
            weight_fn = lambda: hook.compute_weight(mod)  # noqa: E731
        what = [f"weight from the {type(hook).__name__} hook"]
    if weight_fn is None:
        return ConvModuleInfo(mod.weight, mod.bias, args)
    if mod.training:
        return refuse(f"{what[0]}, recomputed at every step in train mode: rewrite the model in eval mode "
                      "to fold it (inference only)")
    weight = _effective(weight_fn, trainable=any(p.requires_grad for p in mod.parameters(recurse=True)))
    return ConvModuleInfo(weight, mod.bias, args, folded=f"{what[0]}: weight folded (inference only)")


register_linear_module("transformers.pytorch_utils.Conv1D", weight=lambda m: m.weight.t())  # GPT-2's layers
