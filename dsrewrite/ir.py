"""Framework-neutral description of one convolution: what every frontend produces and the middle consumes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .errors import DsrewriteError

__all__ = ["ConvSpec", "ConvSite", "full_rank", "KINDS", "KXK", "POINTWISE", "LINEAR", "LOWRANK_KINDS", "check_kinds"]

KXK, POINTWISE, LINEAR = "kxk", "pointwise", "linear"
KINDS = (KXK, POINTWISE, LINEAR)  # the layer kinds the pass rewrites: KxK convs as separable pairs, the rest low rank
LOWRANK_KINDS = frozenset({POINTWISE, LINEAR})


def check_kinds(kinds) -> tuple:
    """``kinds=`` as a tuple of known layer kinds: ``"all"``, one kind, or a sequence of them (one-line error)."""
    if kinds == "all":
        return KINDS
    items = [kinds] if isinstance(kinds, str) else kinds
    try:
        items = list(items)
    except TypeError:
        raise DsrewriteError(f"kinds must be 'all' or a list of {', '.join(KINDS)}, got {kinds!r}") from None
    if "all" in items:
        return KINDS
    bad = [k for k in items if k not in KINDS]
    if bad or not items:
        raise DsrewriteError(f"kinds must be 'all' or a list of {', '.join(KINDS)}, got {kinds!r}")
    return tuple(k for k in KINDS if k in items)


def full_rank(weight_shape) -> int:
    """Rank at which the separable form of a ``[Cout, Cin, *kernel]`` weight is exact: ``min(Cout, prod(kernel))``
    (more depthwise filters per channel than taps or outputs add nothing)."""
    return min(int(weight_shape[0]), int(math.prod(weight_shape[2:])))


@dataclass
class ConvSpec:
    """A convolution (or linear layer) as the middle of the compiler sees it, independent of torch.fx or ONNX.

    A linear layer is a conv with no spatial dims (``kernel=()``, weight ``[Cout, Cin]``), one output position
    per row of its input. Its :attr:`kind` says how the pass rewrites it: a KxK conv becomes a separable pair, a
    1x1 conv or a linear layer a low-rank pair (``k``-wide reduction, then the expansion), which is the separable
    pair of the layer seen as a one-channel conv whose taps are its input channels (:meth:`pair_view`).

    Args:
        name: qualified name (module path, or ONNX node name) used in reports and filters.
        in_channels / out_channels: channel counts of the convolution.
        kernel: kernel size per spatial dim, e.g. ``(3, 3)`` or ``(7,)`` for 1-D.
        groups: convolution groups (only ``1`` is rewritten).
        stride / dilation: per spatial dim.
        bias: whether the conv adds a bias.
        out_spatial: output spatial size per call, e.g. ``(56, 56)``; ``None`` when unknown.
        batch: batch size of the calls the FLOPs are counted for.
        calls: how many times the conv runs in one forward (a shared module counts each call).
        origin: where it came from (``"module"``, ``"function"``, ``"onnx"``).
        transposed: a transposed convolution (never rewritten).
        pixels: total output positions over batch and calls, when calls differ in shape (otherwise computed as
            ``batch * calls * prod(out_spatial)``); for a transposed conv, its input positions (its work's count).
        extra: frontend notes, e.g. ``{"unsupported": reason}`` for a setting the frontend cannot rewrite.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: Tuple[int, ...]
    groups: int = 1
    stride: Tuple[int, ...] = (1, 1)
    dilation: Tuple[int, ...] = (1, 1)
    bias: bool = False
    out_spatial: Optional[Tuple[int, ...]] = None
    batch: int = 1
    calls: int = 1
    origin: str = "module"
    transposed: bool = False
    pixels: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def kernel_area(self) -> int:
        """Number of taps of one filter (K*K for a square 2-D kernel, K for 1-D)."""
        return math.prod(self.kernel)

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel)

    @property
    def kind(self) -> str:
        """``"kxk"`` (a conv with more than one tap), ``"pointwise"`` (a 1x1 conv) or ``"linear"``."""
        if not self.kernel:
            return LINEAR
        return POINTWISE if self.kernel_area == 1 else KXK

    @property
    def lowrank(self) -> bool:
        """Rewritten as a low-rank pair (1x1 convs and linear layers), not a separable one."""
        return self.kind in LOWRANK_KINDS

    def pair_view(self) -> "ConvSpec":
        """The conv whose separable pair is this layer's pair, for the cost model and the factorisation.

        A KxK conv is its own view. A 1x1 conv or linear layer ``[Cout, Cin]`` is seen as a conv with one input
        channel and ``Cin`` taps: its rank-``k`` separable pair (``k`` filters of ``Cin`` taps, then ``Cout x k``)
        is the low-rank pair, with the same parameters, FLOPs, full rank ``min(Cin, Cout)`` and break-even rank.
        """
        if not self.lowrank:
            return self
        return ConvSpec(self.name, 1, self.out_channels, (self.in_channels,), 1, (1,), (1,), self.bias,
                        None, self.batch, self.calls, self.origin, False, self.out_pixels, dict(self.extra))

    @property
    def full_rank(self) -> int:
        """Rank at which the pair is exact: ``min(Cout, K*K)`` for a separable pair, ``min(Cin, Cout)`` low rank."""
        view = self.pair_view()
        return full_rank((view.out_channels, view.in_channels // max(view.groups, 1), *view.kernel))

    @property
    def out_pixels(self) -> int:
        """Output positions of all calls together (batch included); 0 when the shape is unknown."""
        if self.pixels is not None:
            return self.pixels
        if self.out_spatial is None:
            return 0
        return self.batch * self.calls * math.prod(self.out_spatial)


@dataclass
class ConvSite:
    """A conv found by a frontend: its description, its weights, and a frontend-specific handle.

    ``weight`` is ``[Cout, Cin/groups, *kernel]`` (torch tensor or numpy array): the weight the conv really
    uses (a run-time weight folded, see ``spec.extra["folded"]``); ``bias`` ``[Cout]`` or ``None``.
    ``handle`` is whatever the frontend's backend needs to write the result back. ``probe``: a bounded sample of
    an input the conv saw in the example forward and its output there (``frontends.fx.Probe``), for the
    per-layer self-check (``None``: unknown).
    """

    spec: ConvSpec
    weight: Any = None
    bias: Any = None
    handle: Any = None
    probe: Any = None
