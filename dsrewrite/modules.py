"""``SeparableConv2d`` / ``SeparableConv1d``: the depthwise + pointwise pair that replaces a dense conv.

The children ``.depthwise`` and ``.pointwise`` are plain ``nn.Conv*d`` modules, so ``state_dict`` keys
read ``layer1.0.conv1.depthwise.weight``. ``backend`` picks how the pair runs: ``"torch"`` (two conv ops),
``"triton"`` (the fused kernel of ``dsrewrite.kernels``), ``"auto"`` (Triton on CUDA tensors when it can
run there, torch ops otherwise).

With ragged ranks (``channel_index`` given, see :mod:`dsrewrite.plan.factorize`) the depthwise conv has one
filter per entry of the index and reads its input through it (an ``index_select`` with torch ops; the
Triton kernels read through the index directly).

A uniform pair can run its depthwise conv in that gathered form too (``gather_input=True``: each input
channel copied ``rank`` times, then one filter per copy). It computes the same thing with the same weights;
PyTorch's CPU kernels run it up to a few times faster or slower depending on the shape, so the latency
planner times both forms and sets the flag per layer. Triton ignores it (its kernels read the input once).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .plan.factorize import Factors, factorize

__all__ = ["SeparableConv1d", "SeparableConv2d", "LowRankLinear", "LowRankConv1d", "LowRankConv2d", "LOWRANK_TYPES",
           "PAIR_TYPES", "BACKENDS", "tf_same_pad", "ComputedWeight"]

BACKENDS = ("auto", "triton", "torch")

# what code around a conv reads of it: a pair answers each as the dense conv it replaces did (read-only)
CONV_INTERFACE = frozenset({
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
    "transposed", "output_padding", "weight", "bias", "_reversed_padding_repeated_twice",
})


class ComputedWeight(torch.Tensor):
    """The dense weight a pair computes (``pair.weight``): it reads, and back-propagates into the factors, like
    the replaced conv's weight; assigning its ``.data`` would change nothing the pair runs, so that raises."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        raise AttributeError("the weight of a SeparableConv is computed from its depthwise and pointwise factors and "
                             "cannot be assigned: load new weights with load_factors() or into .depthwise/.pointwise")


def tf_same_pad(size: Tuple[int, ...], kernel: Tuple[int, ...], stride: Tuple[int, ...],
                dilation: Tuple[int, ...]) -> Tuple[int, ...]:
    """``F.pad`` amounts (last dim first) of TensorFlow's 'SAME' padding for an input of spatial ``size``:
    output ``ceil(size / stride)``, the odd pixel on the bottom/right."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(p for pair in reversed(pads) for p in pair)


class _Pair(nn.Module):
    """What every pair shares: the replaced layer's interface (``_interface``) is read-only, and ``weight`` is the
    dense weight the pair computes."""

    _interface: frozenset = frozenset()

    def __setattr__(self, name: str, value) -> None:
        if name in self._interface:
            raise AttributeError(f"{type(self).__name__}.{name} is read-only: the pair was built for the layer's "
                                 f"settings; rebuild it (from_factors) to change {name}")
        super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the pair computes (differentiable; see :class:`ComputedWeight`)."""
        return self.dense_weight().as_subclass(ComputedWeight)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError


class _SeparableConvNd(_Pair):
    _conv_cls: type = nn.Conv2d
    _dims: int = 2
    _interface = CONV_INTERFACE

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding: Union[str, int, tuple] = 0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        backend: str = "auto",
        device=None,
        dtype=None,
        channel_index: Optional[torch.Tensor] = None,
        gather_input: bool = False,
        dynamic_same: bool = False,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.backend = backend
        self._in_channels = int(in_channels)
        self.gather_input = bool(gather_input)  # torch ops only: run the depthwise conv on a gathered copy
        # pad TF-style 'same' for each input's own size first (timm's Conv2dSame); padding is then 0
        self.dynamic_same = bool(dynamic_same)
        filters = in_channels * rank
        if channel_index is not None:
            channel_index = torch.as_tensor(channel_index, dtype=torch.int64, device=device).reshape(-1)
            bad = channel_index.numel() != filters or (
                filters and (int(channel_index.min()) < 0 or int(channel_index.max()) >= in_channels))
            if bad:
                raise ValueError(f"channel_index must hold {filters} input channels in [0, {in_channels}), "
                                 f"got {channel_index.numel()} values")
        # ragged: one filter per index entry, on the gathered input; uniform: `rank` filters per input channel
        self.register_buffer("channel_index", channel_index)
        self.depthwise = self._conv_cls(
            filters if channel_index is not None else in_channels, filters, kernel_size, stride=stride,
            padding=padding, dilation=dilation, groups=filters if channel_index is not None else in_channels,
            bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self.pointwise = self._conv_cls(
            in_channels * rank, out_channels, 1, bias=bias, device=device, dtype=dtype
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, *, backend: str = "auto",
                  factors: Optional[Factors] = None) -> "_SeparableConvNd":
        """Build the pair from a dense ``nn.Conv*d`` (groups=1), initialised by per-channel SVD.

        Keeps stride, padding (incl. ``'same'`` and ``padding_mode``), dilation, dtype and device.
        """
        if not isinstance(conv, cls._conv_cls):
            raise TypeError(f"{cls.__name__}.from_conv expects {cls._conv_cls.__name__}, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"from_conv needs groups=1, got groups={conv.groups}")
        if factors is None:
            factors = factorize(conv.weight, rank, conv.bias)
        mod = cls.from_factors(
            factors, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            padding_mode=conv.padding_mode, backend=backend,
        )
        return mod.requires_grad_(conv.weight.requires_grad)  # a frozen conv stays frozen

    @classmethod
    def from_factors(cls, factors: Factors, *, stride=1, padding=0, dilation=1, padding_mode: str = "zeros",
                     backend: str = "auto", gather_input: bool = False,
                     dynamic_same: bool = False) -> "_SeparableConvNd":
        """Build the pair from precomputed :class:`~dsrewrite.plan.factorize.Factors`."""
        dw, pw = factors.depthwise, factors.pointwise
        cin = dw.shape[0] // factors.rank
        mod = cls(
            cin, pw.shape[0], tuple(dw.shape[2:]), factors.rank, stride=stride, padding=padding,
            dilation=dilation, bias=factors.bias is not None, padding_mode=padding_mode,
            backend=backend, device=dw.device, dtype=dw.dtype, channel_index=factors.channel_index,
            gather_input=gather_input, dynamic_same=dynamic_same,
        )
        return mod.load_factors(factors)

    def load_factors(self, factors: Factors) -> "_SeparableConvNd":
        """Copy ``factors`` (same rank and shapes, and ragged if this pair is) into this pair, in place."""
        if (factors.channel_index is None) != (self.channel_index is None):
            raise ValueError("load_factors: ragged factors need a ragged pair and uniform ones a uniform pair")
        with torch.no_grad():
            if self.channel_index is not None:
                self.channel_index.copy_(factors.channel_index)
            self.depthwise.weight.copy_(factors.depthwise)
            self.pointwise.weight.copy_(factors.pointwise)
            if factors.bias is not None and self.pointwise.bias is not None:
                self.pointwise.bias.copy_(factors.bias)
        return self

    def factors(self, error: float = 0.0, *, clone: bool = False) -> Factors:
        """This pair's weights as :class:`Factors` (the inverse of :meth:`load_factors`): detached views of
        the module's tensors, or copies with ``clone=True``; ``error`` is recorded as given."""
        take = (lambda t: t.detach().clone()) if clone else (lambda t: t.detach())
        bias = self.pointwise.bias
        return Factors(take(self.depthwise.weight), take(self.pointwise.weight), None if bias is None else take(bias),
                       self.rank, error, None if self.channel_index is None else take(self.channel_index))

    # ------------------------------------------------------------------ the replaced conv's interface
    # Code around a conv reads its settings (``conv.stride``, ``conv.kernel_size[0]``, ``conv.weight.dtype``): the
    # pair answers as the dense conv it computes. They are read-only (``_Pair``): a pair cannot honour a new stride.
    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return self.depthwise.kernel_size

    @property
    def stride(self) -> Tuple[int, ...]:
        return self.depthwise.stride

    @property
    def padding(self):
        return self.depthwise.padding

    @property
    def dilation(self) -> Tuple[int, ...]:
        return self.depthwise.dilation

    @property
    def padding_mode(self) -> str:
        return self.depthwise.padding_mode

    @property
    def _reversed_padding_repeated_twice(self):
        return self.depthwise._reversed_padding_repeated_twice

    @property
    def groups(self) -> int:
        return 1

    @property
    def transposed(self) -> bool:
        return False

    @property
    def output_padding(self) -> Tuple[int, ...]:
        return (0,) * self._dims

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The replaced conv's bias (carried by the pointwise conv)."""
        return self.pointwise.bias

    # ------------------------------------------------------------------ running

    @property
    def ragged(self) -> bool:
        return self.channel_index is not None

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[Cout, Cin, *kernel]`` weight this pair computes (for checks and distillation)."""
        dw = self.depthwise.weight  # [Cin*r, 1, *k]
        pw = self.pointwise.weight  # [Cout, Cin*r, 1...]
        cin, r, cout = self.in_channels, self.rank, pw.shape[0]
        k = dw.shape[2:]
        if self.channel_index is not None:
            terms = pw.reshape(cout, -1, 1) * dw.reshape(1, dw.shape[0], -1)  # [Cout, Cin*r, K]
            dense = terms.new_zeros(cout, cin, terms.shape[2]).index_add(1, self.channel_index, terms)
            return dense.reshape(cout, cin, *k)
        dw = dw.reshape(cin, r, -1)
        pw = pw.reshape(cout, cin, r)
        return torch.einsum("ocr,crk->ock", pw, dw).reshape(cout, cin, *k)

    def _use_triton(self, x: torch.Tensor) -> bool:
        ok, why = backends.triton_supports(self, x)
        if self.backend == "triton" and not ok:
            raise RuntimeError(f"backend='triton' cannot run this SeparableConv2d: {why}")
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same:
            dw = self.depthwise
            x = F.pad(x, tf_same_pad(tuple(x.shape[-self._dims:]), dw.kernel_size, dw.stride, dw.dilation))
        if self.backend != "torch" and self._use_triton(x):
            return backends.triton_forward(self, x)
        if self.channel_index is not None:
            x = x.index_select(1, self.channel_index)
        elif self.gather_input and self.rank > 1:
            return self.pointwise(self._gathered_depthwise(x))
        return self.pointwise(self.depthwise(x))

    def _gathered_depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """The uniform depthwise conv on ``rank`` copies of each input channel, one filter per copy."""
        dw = self.depthwise
        x = x.repeat_interleave(self.rank, dim=1)
        padding = dw.padding
        if dw.padding_mode != "zeros":  # as nn.Conv*d does it
            x = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
            padding = 0
        conv = F.conv1d if self._dims == 1 else F.conv2d
        return conv(x, dw.weight, None, dw.stride, padding, dw.dilation, x.shape[1])

    def extra_repr(self) -> str:
        form = ", ragged" if self.ragged else ", gather_input=True" if self.gather_input else ""
        same = ", dynamic_same=True" if self.dynamic_same else ""
        return f"rank={self.rank}{form}{same}, backend={self.backend!r}"


class SeparableConv2d(_SeparableConvNd):
    """Depthwise KxK conv with ``rank`` filters per input channel, then a 1x1 conv (carrying the bias)."""

    _conv_cls = nn.Conv2d
    _dims = 2


class SeparableConv1d(_SeparableConvNd):
    """1-D version of :class:`SeparableConv2d` (depthwise length-K conv, then a pointwise conv)."""

    _conv_cls = nn.Conv1d
    _dims = 1


# ---------------------------------------------------------------------------------------------- low-rank pairs
LINEAR_INTERFACE = frozenset({"in_features", "out_features", "weight", "bias"})


class _LowRankPair(_Pair):
    """A 1x1 conv or linear layer ``[Cout, Cin]`` as a low-rank pair: ``.reduce`` (``Cin -> k``, no bias), then
    ``.expand`` (``k -> Cout``, the bias), so ``state_dict`` keys read ``blocks.0.mlp.fc1.reduce.weight``. Answers
    the replaced layer's interface read-only (``weight`` is the dense product, a :class:`ComputedWeight`). Runs as
    two GEMMs (cuBLAS on CUDA; why there is no fused kernel: docs/kernels.md)."""

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The replaced layer's bias (carried by ``.expand``)."""
        return self.expand.bias

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``expand @ reduce``, in the replaced layer's shape."""
        e, r = self.expand.weight, self.reduce.weight
        w = e.reshape(e.shape[0], -1) @ r.reshape(r.shape[0], -1)
        return w.reshape(e.shape[0], r.shape[1], *r.shape[2:])

    def load_factors(self, factors: Factors) -> "_LowRankPair":
        """Copy low-rank ``factors`` (same rank and shapes) into this pair, in place."""
        if not factors.lowrank:
            raise ValueError("load_factors: a low-rank pair needs low-rank factors")
        with torch.no_grad():
            self.reduce.weight.copy_(factors.depthwise.reshape(self.reduce.weight.shape))
            self.expand.weight.copy_(factors.pointwise.reshape(self.expand.weight.shape))
            if factors.bias is not None and self.expand.bias is not None:
                self.expand.bias.copy_(factors.bias)
        return self

    def factors(self, error: float = 0.0, *, clone: bool = False) -> Factors:
        """This pair's weights as low-rank :class:`Factors` (views, or copies with ``clone=True``)."""
        take = (lambda t: t.detach().clone()) if clone else (lambda t: t.detach())
        bias = self.expand.bias
        return Factors(take(self.reduce.weight), take(self.expand.weight), None if bias is None else take(bias),
                       self.rank, error, None, lowrank=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class LowRankLinear(_LowRankPair):
    """``nn.Linear(Cin, Cout)`` as ``Linear(Cin, k, bias=False)`` then ``Linear(k, Cout)``."""

    _interface = LINEAR_INTERFACE

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        object.__setattr__(self, "_rank", int(rank))
        self.reduce = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.expand = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factors: Factors) -> "LowRankLinear":
        """Build the pair from low-rank :class:`~dsrewrite.plan.factorize.Factors`."""
        k, cin = factors.depthwise.shape[:2]
        mod = cls(cin, factors.pointwise.shape[0], k, bias=factors.bias is not None,
                  device=factors.depthwise.device, dtype=factors.depthwise.dtype)
        return mod.load_factors(factors)

    @property
    def in_features(self) -> int:
        return self.reduce.in_features

    @property
    def out_features(self) -> int:
        return self.expand.out_features


class _LowRankConvNd(_LowRankPair):
    _conv_cls: type = nn.Conv2d
    _dims: int = 2
    _interface = CONV_INTERFACE

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride=1, padding: Union[str, int, tuple] = 0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        object.__setattr__(self, "_rank", int(rank))
        # the reduction carries the 1x1 conv's stride and padding (a padded position reduces to 0, so the
        # expansion gives the bias there, as the original does)
        self.reduce = self._conv_cls(in_channels, rank, 1, stride=stride, padding=padding, dilation=dilation,
                                     bias=False, padding_mode=padding_mode, device=device, dtype=dtype)
        self.expand = self._conv_cls(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factors: Factors, *, stride=1, padding=0, dilation=1,
                     padding_mode: str = "zeros") -> "_LowRankConvNd":
        """Build the pair from low-rank :class:`~dsrewrite.plan.factorize.Factors` and the 1x1 conv's settings."""
        k, cin = factors.depthwise.shape[:2]
        mod = cls(cin, factors.pointwise.shape[0], k, stride=stride, padding=padding, dilation=dilation,
                  bias=factors.bias is not None, padding_mode=padding_mode, device=factors.depthwise.device,
                  dtype=factors.depthwise.dtype)
        return mod.load_factors(factors)

    in_channels = property(lambda self: self.reduce.in_channels)
    out_channels = property(lambda self: self.expand.out_channels)
    kernel_size = property(lambda self: self.reduce.kernel_size)
    stride = property(lambda self: self.reduce.stride)
    padding = property(lambda self: self.reduce.padding)
    dilation = property(lambda self: self.reduce.dilation)
    padding_mode = property(lambda self: self.reduce.padding_mode)
    _reversed_padding_repeated_twice = property(lambda self: self.reduce._reversed_padding_repeated_twice)
    groups = property(lambda self: 1)
    transposed = property(lambda self: False)
    output_padding = property(lambda self: (0,) * self._dims)


class LowRankConv2d(_LowRankConvNd):
    """A 1x1 ``nn.Conv2d`` as a ``k``-channel 1x1 conv (its stride and padding), then a 1x1 conv to ``Cout``."""

    _conv_cls = nn.Conv2d
    _dims = 2


class LowRankConv1d(_LowRankConvNd):
    """1-D version of :class:`LowRankConv2d`."""

    _conv_cls = nn.Conv1d
    _dims = 1


LOWRANK_TYPES = (LowRankLinear, LowRankConv1d, LowRankConv2d)
PAIR_TYPES = (SeparableConv1d, SeparableConv2d) + LOWRANK_TYPES  # every pair the pass installs
