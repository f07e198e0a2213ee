"""Atomic in-place rewrites: what a model was before the pass touched it, and how to put it back.

``rewrite(..., inplace=True)`` either succeeds or leaves the user's model exactly as it was: its module tree
(every module's children, at every path), instance-level ``forward`` overrides, hooks, training flags and the
values of its parameters and buffers. Costs references plus one copy of the parameter and buffer values.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

__all__ = ["ModelSnapshot"]

_MISSING = object()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


class ModelSnapshot:
    """A model's structure and state at one moment; :meth:`restore` brings the model back to it."""

    def __init__(self, model: nn.Module, *, values: bool = True) -> None:
        """``values=False``: the structure only (for a step that changes no tensor of the model)."""
        self.model = model
        self.modules: List[Tuple[nn.Module, Dict[str, Any]]] = []
        for m in model.modules():
            saved = {"_modules": dict(m._modules), "_parameters": dict(m._parameters), "_buffers": dict(m._buffers),
                     "training": m.training, "forward": m.__dict__.get("forward", _MISSING)}
            for name in _HOOK_DICTS:
                hooks = m.__dict__.get(name)
                if hooks is not None:
                    saved[name] = dict(hooks)
            self.modules.append((m, saved))
        with torch.no_grad():
            self.values = [(t, t.detach().clone()) for t in _tensors(model)] if values else []

    def restore(self) -> None:
        """Put every module's children, parameters, buffers, hooks, ``forward`` and training flag back, and the
        values of the tensors they held."""
        for m, saved in self.modules:
            for name in ("_modules", "_parameters", "_buffers") + _HOOK_DICTS:
                if name in saved:
                    current = m.__dict__[name]
                    current.clear()
                    current.update(saved[name])
            m.training = saved["training"]
            if saved["forward"] is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = saved["forward"]
        with torch.no_grad():
            for t, v in self.values:
                if t.shape == v.shape:
                    t.copy_(v)
                else:
                    t.data = v


def _tensors(model: nn.Module) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
