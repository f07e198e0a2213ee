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

# dicts of a module whose contents (not only the dict) are restored: children, tensors, hooks
_CONTAINERS = frozenset({
    "_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_hooks", "_forward_pre_hooks",
    "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks"})


class ModelSnapshot:
    """A model's structure and state at one moment; :meth:`restore` brings the model back to it.

    Every module's instance attributes are kept (a shallow copy of its ``__dict__``: children, parameters,
    buffers and hooks as dicts whose contents are put back in place, plus plain attributes such as caches that
    a traced forward may have set to fx proxies), and, unless ``values=False``, a copy of every tensor's values.
    """

    def __init__(self, model: nn.Module, *, values: bool = True) -> None:
        """``values=False``: the structure only (for a step that changes no tensor of the model)."""
        self.model = model
        self.modules: List[Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]] = []
        for m in model.modules():
            attrs = dict(m.__dict__)
            dicts = {k: type(v)(v) for k, v in attrs.items() if k in _CONTAINERS and isinstance(v, (dict, set))}
            self.modules.append((m, attrs, dicts))
        with torch.no_grad():
            self.values = [(t, t.detach().clone()) for t in _tensors(model)] if values else []

    def restore(self) -> None:
        """Put every module's attributes back (children, parameters, buffers, hooks, ``forward``, training flag,
        plain attributes), and the values of the tensors they held."""
        for m, attrs, dicts in self.modules:
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if k in dicts:
                    v.clear()
                    v.update(dicts[k])
                m.__dict__[k] = v
        with torch.no_grad():
            for t, v in self.values:
                if t.shape == v.shape and t.dtype == v.dtype:
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
