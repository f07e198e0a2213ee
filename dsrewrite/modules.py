"""``SeparableConv2d`` / ``SeparableConv1d``: the depthwise + pointwise pair that replaces a dense conv.

The children ``.depthwise`` and ``.pointwise`` are plain ``nn.Conv*d`` modules, so ``state_dict`` keys
read ``layer1.0.conv1.depthwise.weight``. ``backend`` picks how the pair runs: ``"torch"`` (two conv ops),
``"triton"`` (the fused kernel of ``dsrewrite.kernels``), ``"auto"`` (Triton on CUDA tensors when it can
run there, torch ops otherwise).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .factorize import Factors, factorize

__all__ = ["SeparableConv1d", "SeparableConv2d", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")


class _SeparableConvNd(nn.Module):
    _conv_cls: type = nn.Conv2d
    _dims: int = 2

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
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.backend = backend
        self.depthwise = self._conv_cls(
            in_channels, in_channels * rank, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=in_channels, bias=False, padding_mode=padding_mode,
            device=device, dtype=dtype,
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
    def from_factors(cls, factors: Factors, *, stride=1, padding=0, dilation=1,
                     padding_mode: str = "zeros", backend: str = "auto") -> "_SeparableConvNd":
        """Build the pair from precomputed :class:`~dsrewrite.factorize.Factors`."""
        dw, pw = factors.depthwise, factors.pointwise
        cin = dw.shape[0] // factors.rank
        mod = cls(
            cin, pw.shape[0], tuple(dw.shape[2:]), factors.rank, stride=stride, padding=padding,
            dilation=dilation, bias=factors.bias is not None, padding_mode=padding_mode,
            backend=backend, device=dw.device, dtype=dw.dtype,
        )
        return mod.load_factors(factors)

    def load_factors(self, factors: Factors) -> "_SeparableConvNd":
        """Copy ``factors`` (same rank and shapes) into this pair's weights, in place; returns ``self``."""
        with torch.no_grad():
            self.depthwise.weight.copy_(factors.depthwise)
            self.pointwise.weight.copy_(factors.pointwise)
            if factors.bias is not None and self.pointwise.bias is not None:
                self.pointwise.bias.copy_(factors.bias)
        return self

    # ------------------------------------------------------------------ running
    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[Cout, Cin, *kernel]`` weight this pair computes (for checks and distillation)."""
        dw = self.depthwise.weight  # [Cin*r, 1, *k]
        pw = self.pointwise.weight  # [Cout, Cin*r, 1...]
        cin, r = self.in_channels, self.rank
        k = dw.shape[2:]
        dw = dw.reshape(cin, r, -1)
        pw = pw.reshape(pw.shape[0], cin, r)
        return torch.einsum("ocr,crk->ock", pw, dw).reshape(pw.shape[0], cin, *k)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or self._dims != 2:
            return False
        from . import backends

        ok, why = backends.triton_supports(self, x)
        if self.backend == "triton" and not ok:
            raise RuntimeError(f"backend='triton' cannot run this SeparableConv2d: {why}")
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch" and self._use_triton(x):
            from .backends import triton_forward

            return triton_forward(self, x)
        return self.pointwise(self.depthwise(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, backend={self.backend!r}"


class SeparableConv2d(_SeparableConvNd):
    """Depthwise KxK conv with ``rank`` filters per input channel, then a 1x1 conv (carrying the bias)."""

    _conv_cls = nn.Conv2d
    _dims = 2


class SeparableConv1d(_SeparableConvNd):
    """1-D version of :class:`SeparableConv2d` (depthwise length-K conv, then a pointwise conv)."""

    _conv_cls = nn.Conv1d
    _dims = 1
