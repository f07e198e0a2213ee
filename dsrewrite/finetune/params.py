"""Which student parameters to train: only the new separable pairs, or everything; optimiser groups."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn

from ..errors import DsrewriteError
from ._util import unwrap

__all__ = ["separable_layers", "select_parameters", "param_groups", "TRAIN_CHOICES"]

TRAIN_CHOICES = ("separable", "all")


def _is_pair(m: nn.Module) -> bool:
    dw, pw = getattr(m, "depthwise", None), getattr(m, "pointwise", None)
    if not isinstance(dw, nn.modules.conv._ConvNd) or not isinstance(pw, nn.modules.conv._ConvNd):
        return False
    return dw.groups == dw.in_channels and all(k == 1 for k in pw.kernel_size)


def separable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{qualified name: module}`` of every depthwise + pointwise pair in ``model``.

    Found by structure, not class, so pairs built by hand or loaded into another module class count too.
    """
    return {name: m for name, m in unwrap(model).named_modules() if _is_pair(m)}


def _split(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Parameters by role: ``depthwise``, ``pointwise`` (separable pairs) and ``rest``; shared ones once."""
    model = unwrap(model)
    role: Dict[int, str] = {}
    for m in separable_layers(model).values():
        for p in m.depthwise.parameters():
            role[id(p)] = "depthwise"
        for p in m.pointwise.parameters():
            role[id(p)] = "pointwise"
    groups: Dict[str, List[nn.Parameter]] = {"depthwise": [], "pointwise": [], "rest": []}
    for p in model.parameters():
        groups[role.get(id(p), "rest")].append(p)
    return groups


def select_parameters(model: nn.Module, train: str = "separable") -> List[nn.Parameter]:
    """Set ``requires_grad`` for fine-tuning and return the trainable parameters.

    Args:
        model: the rewritten model (or its DDP wrapper: call this *before* wrapping in DDP).
        train: ``"separable"`` (only the depthwise/pointwise weights and biases of the new pairs) or
            ``"all"`` (every parameter).
    """
    if train not in TRAIN_CHOICES:
        raise DsrewriteError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}")
    groups = _split(model)
    if train == "separable" and not (groups["depthwise"] or groups["pointwise"]):
        raise DsrewriteError("train='separable' but the model has no separable pair: rewrite it first or use train='all'")
    for p in groups["rest"]:
        p.requires_grad_(train == "all")
    for p in groups["depthwise"] + groups["pointwise"]:
        p.requires_grad_(True)
    return [p for p in unwrap(model).parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, *, depthwise_lr: Optional[float] = None,
                 pointwise_lr: Optional[float] = None, rest_lr: Optional[float] = None,
                 weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """Optimiser groups of the parameters that require grad: depthwise, pointwise and the rest.

    Each group gets its own learning rate (``lr`` where not given). Empty groups are left out, so the
    result goes straight into ``torch.optim.AdamW(param_groups(...))``.
    """
    lrs = {"depthwise": depthwise_lr, "pointwise": pointwise_lr, "rest": rest_lr}
    out = []
    for name, params in _split(model).items():
        params = [p for p in params if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lrs[name] if lrs[name] is not None else lr,
                        "weight_decay": weight_decay, "name": name})
    if not out:
        raise DsrewriteError("no parameter requires grad: nothing to train")
    return out
