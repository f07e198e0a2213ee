"""Guards on the weights the factors were computed from, and refactorisation when one changes.

Parameters being graph inputs, Dynamo does not recompile when a weight changes in place (an optimiser step,
``load_state_dict``). So every call of a compiled graph compares the rewritten convs' weights with snapshots taken
at factorisation (identity, data pointer, version counter: a few attribute reads) and refactorises a changed one
at the same rank, in place, since the compiled code reads the pair's tensors (a separable pair, or a 1x1 conv's or
linear layer's low-rank pair).
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import DsrewriteError
from ..plan.factorize import factorize_layer
from ..ir import ConvSite
from ..modules import LOWRANK_TYPES
from .inputs import LiftedConv

__all__ = ["Snap", "WeightGuard", "Watch", "Guarded", "weight_getter"]

WeightGetter = Callable[[tuple], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: the data pointer still guards
        return -1


class Snap:
    """Identity, storage and version of a tensor when it was factorised."""

    __slots__ = ("ref", "ptr", "version")

    def __init__(self, t: Optional[torch.Tensor]) -> None:
        self.ref = None if t is None else weakref.ref(t)
        self.ptr = None if t is None else t.data_ptr()
        self.version = None if t is None else _version(t)

    def same(self, t: Optional[torch.Tensor]) -> bool:
        """Whether ``t`` is the snapshot's tensor, with the same storage and unchanged since."""
        if t is None or self.ref is None:
            return t is None and self.ref is None
        return self.ref() is t and t.data_ptr() == self.ptr and _version(t) == self.version


@dataclass
class WeightGuard:
    """Per site of a plan: snapshots of the weight and bias its factors came from, and the pair module (separable
    or low-rank) holding those factors (``None`` for a site left dense or rewritten afresh at each compile)."""

    snaps: List[Tuple[Snap, Snap]]
    modules: List[Optional[nn.Module]]
    calibrated: bool  # calibrated factors cannot be refitted from the weight alone
    warned: bool = False

    @classmethod
    def of(cls, sites: Sequence[ConvSite], modules: List[Optional[nn.Module]], calibrated: bool) -> "WeightGuard":
        """Snapshots of the sites' weights and biases now."""
        return cls([(Snap(s.weight), Snap(s.bias)) for s in sites], modules, calibrated)

    def unchanged(self, sites: Sequence[ConvSite]) -> bool:
        """Whether every site's weight and bias are those the factors were computed from."""
        return all(w.same(s.weight) and b.same(s.bias) for (w, b), s in zip(self.snaps, sites))

    def refresh(self, i: int, weight: torch.Tensor, bias: Optional[torch.Tensor], name: str, frozen: bool) -> None:
        """Refactorise site ``i`` from its new weight at the same rank, in place (the compiled code reads it)."""
        if self.calibrated:
            raise DsrewriteError(f"the weight of layer {name!r} changed after compile and its factors were calibrated "
                                 "on data: call torch._dynamo.reset() and run again to recompile and recalibrate")
        if frozen:
            raise DsrewriteError(f"the weight of layer {name!r} changed after compile, but Inductor froze the factors "
                                 "(torch._inductor.config.freezing): call torch._dynamo.reset() and run again")
        pair = self.modules[i]
        lowrank = isinstance(pair, LOWRANK_TYPES)
        pair.load_factors(factorize_layer(weight, pair.rank, bias, lowrank=lowrank,
                                          ragged=not lowrank and pair.ragged))
        self.snaps[i] = (Snap(weight), Snap(bias))
        if not self.warned:
            self.warned = True
            warnings.warn(f"dsrewrite: layer weights changed since compile (first: {name!r}); their factors were "
                          "recomputed at the compiled ranks", stacklevel=3)


@dataclass
class Watch:
    """A rewritten conv: where its weight and bias come from on each call, and its site in the plan."""

    site: int
    name: str
    get: WeightGetter


class Guarded:
    """The compiled graph, preceded by the check that the rewritten weights are those that were factorised."""

    def __init__(self, inner: Callable, weights: WeightGuard, watches: List[Watch], frozen: bool) -> None:
        self.inner, self.weights, self.watches, self.frozen = inner, weights, watches, frozen

    def __call__(self, *args: Any) -> Any:
        snaps = self.weights.snaps  # inline: this runs on every call of the compiled graph
        for w in self.watches:
            weight, bias = w.get(args)
            ws, bs = snaps[w.site]
            if not (ws.same(weight) and bs.same(bias)):
                self.weights.refresh(w.site, weight, bias, w.name, self.frozen)
        return self.inner(*args)


def weight_getter(site: ConvSite, lifted: Dict[str, LiftedConv]) -> WeightGetter:
    """How a call of the compiled graph finds a site's current weight and bias."""
    item = lifted.get(site.handle.target)
    if item is not None:  # the weight is a graph input: read what this call passes
        wi, bi = item.weight_index, item.bias_index
        return lambda args: (args[wi], None if bi is None else args[bi])
    conv = site.handle.module  # a conv module or parameter attribute of the graph itself
    if conv is not None:
        return lambda args: (conv.weight, conv.bias)
    w, b = site.weight, site.bias
    return lambda args: (w, b)
