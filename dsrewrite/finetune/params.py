"""Which student parameters to train: only the new pairs (separable and low-rank), or everything; optimiser
groups."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..errors import DsrewriteError
from ..modules import LOWRANK_TYPES, PAIR_TYPES
from .common import unwrap

__all__ = ["pair_layers", "separable_layers", "pair_halves", "select_parameters", "param_groups", "TRAIN_CHOICES",
           "ROLES"]

TRAIN_CHOICES = ("separable", "all")
# parameter groups: the halves of separable pairs, the halves of low-rank pairs, everything else
ROLES = ("depthwise", "pointwise", "reduce", "expand", "rest")
_HALVES = {"separable": ("depthwise", "pointwise"), "lowrank": ("reduce", "expand")}


def _is_1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and all(k == 1 for k in m.kernel_size)


def _pair_kind(m: nn.Module) -> Optional[str]:
    """``"separable"`` (a ``.depthwise`` conv with groups = channels, then a 1x1 ``.pointwise``), ``"lowrank"``
    (only children ``.reduce``, without a bias, then ``.expand``: both linear or both 1x1 convs, ``k`` wide
    between) or ``None``."""
    if isinstance(m, PAIR_TYPES):
        return "lowrank" if isinstance(m, LOWRANK_TYPES) else "separable"
    dw, pw = getattr(m, "depthwise", None), getattr(m, "pointwise", None)
    if isinstance(dw, nn.modules.conv._ConvNd) and isinstance(pw, nn.modules.conv._ConvNd):
        return "separable" if dw.groups == dw.in_channels and all(k == 1 for k in pw.kernel_size) else None
    red, exp = getattr(m, "reduce", None), getattr(m, "expand", None)
    if not isinstance(red, nn.Module) or getattr(red, "bias", 0) is not None or \
            {n for n, _ in m.named_children()} != {"reduce", "expand"}:
        return None  # a low-rank pair is its two halves only, the reduction without a bias
    if isinstance(red, nn.Linear) and isinstance(exp, nn.Linear):
        return "lowrank" if red.out_features == exp.in_features else None
    if _is_1x1(red) and _is_1x1(exp):
        return "lowrank" if red.out_channels == exp.in_channels else None
    return None


def pair_halves(m: nn.Module) -> Optional[Tuple[Tuple[str, nn.Module], Tuple[str, nn.Module]]]:
    """The two halves of a pair as ``((role, module), (role, module))``, first factor first (``depthwise`` then
    ``pointwise``, or ``reduce`` then ``expand``); ``None`` if ``m`` is not a pair."""
    kind = _pair_kind(m)
    if kind is None:
        return None
    a, b = _HALVES[kind]
    return (a, getattr(m, a)), (b, getattr(m, b))


def pair_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{qualified name: module}`` of every pair in ``model``: depthwise + pointwise (KxK convs) and reduce +
    expand (low-rank 1x1 convs and linear layers).

    Found by structure, not class, so pairs built by hand or loaded into another module class count too.
    """
    return {name: m for name, m in unwrap(model).named_modules() if _pair_kind(m) is not None}


separable_layers = pair_layers  # the name from before low-rank pairs: every pair, of both forms


def _split(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Parameters by role (:data:`ROLES`): the pairs' halves and ``rest``; shared ones once."""
    model = unwrap(model)
    role: Dict[int, str] = {}
    for m in pair_layers(model).values():
        for name, half in pair_halves(m):
            for p in half.parameters():
                role[id(p)] = name
    groups: Dict[str, List[nn.Parameter]] = {r: [] for r in ROLES}
    for p in model.parameters():
        groups[role.get(id(p), "rest")].append(p)
    return groups


def select_parameters(model: nn.Module, train: str = "separable") -> List[nn.Parameter]:
    """Set ``requires_grad`` for fine-tuning and return the trainable parameters.

    Args:
        model: the rewritten model (or its DDP wrapper: call this *before* wrapping in DDP).
        train: ``"separable"`` (only the new pairs: the depthwise/pointwise and reduce/expand weights and the
            moved biases) or ``"all"`` (every parameter).
    """
    if train not in TRAIN_CHOICES:
        raise DsrewriteError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}")
    groups = _split(model)
    pairs = [p for r in ROLES if r != "rest" for p in groups[r]]
    if train == "separable" and not pairs:
        raise DsrewriteError("train='separable' but the model has no separable or low-rank pair: rewrite it first "
                             "or use train='all'")
    for p in groups["rest"]:
        p.requires_grad_(train == "all")
    for p in pairs:
        p.requires_grad_(True)
    return [p for p in unwrap(model).parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, *, depthwise_lr: Optional[float] = None,
                 pointwise_lr: Optional[float] = None, rest_lr: Optional[float] = None,
                 weight_decay: float = 0.0, reduce_lr: Optional[float] = None,
                 expand_lr: Optional[float] = None) -> List[Dict[str, Any]]:
    """Optimiser groups of the parameters that require grad: ``depthwise``, ``pointwise`` (separable pairs),
    ``reduce``, ``expand`` (low-rank pairs) and ``rest``.

    Each group gets its own learning rate (``lr`` where not given). Empty groups are left out, so the
    result goes straight into ``torch.optim.AdamW(param_groups(...))``.
    """
    lrs = {"depthwise": depthwise_lr, "pointwise": pointwise_lr, "reduce": reduce_lr, "expand": expand_lr,
           "rest": rest_lr}
    out = []
    for name, params in _split(model).items():
        params = [p for p in params if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lrs[name] if lrs[name] is not None else lr,
                        "weight_decay": weight_decay, "name": name})
    if not out:
        raise DsrewriteError("no parameter requires grad: nothing to train")
    return out
