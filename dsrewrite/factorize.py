"""Low-rank separable factorisation of a convolution weight: the maths both frontends share.

For each input channel ``c`` the slice ``W[:, c]`` reshaped to ``Cout x K`` (``K`` = kernel taps) has an
SVD ``U S Vh``. Keeping ``r`` terms gives the best rank-``r`` fit of that slice (Eckart-Young), i.e. a
depthwise conv with ``r`` filters per channel (rows of ``sqrt(S) Vh``) followed by a 1x1 conv
(columns of ``U sqrt(S)``). ``r = min(Cout, K)`` is exact. All channels go through one batched SVD.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["Factors", "factorize", "full_rank", "rank_errors"]


@dataclass
class Factors:
    """Result of :func:`factorize`.

    Attributes:
        depthwise: ``[Cin*r, 1, *kernel]`` weight of the depthwise conv (channel ``c*r + j`` reads input ``c``).
        pointwise: ``[Cout, Cin*r, 1, ...]`` weight of the 1x1 conv.
        bias: the original bias (now on the pointwise conv) or ``None``.
        rank: the rank kept (after clamping to the full rank).
        error: relative Frobenius error ``||W - W_r|| / ||W||`` of the weight reconstruction.
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    bias: Optional[torch.Tensor]
    rank: int
    error: float


def full_rank(weight_shape) -> int:
    """Rank at which the separable form is exact: ``min(Cout, prod(kernel))``."""
    return min(int(weight_shape[0]), int(math.prod(weight_shape[2:])))


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """One intra-op thread for the small CPU SVDs: they do not gain from threads, and with another runtime's
    thread pool loaded in the process (onnxruntime's OpenMP) threaded LAPACK was seen to run many times
    slower (not benchmarked here)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _svd(weight: torch.Tensor):
    """Batched per-input-channel SVD in float64: returns U [Cin,Cout,q], S [Cin,q], Vh [Cin,q,K]."""
    cout, cin = weight.shape[:2]
    taps = int(math.prod(weight.shape[2:]))
    slices = weight.detach().to(torch.float64).reshape(cout, cin, taps).permute(1, 0, 2)
    with _single_thread(slices.device):
        return torch.linalg.svd(slices, full_matrices=False)


def factorize(weight, rank: int, bias=None) -> Factors:
    """Factorise a conv weight ``[Cout, Cin, *kernel]`` (groups=1) into a rank-``rank`` separable pair.

    Args:
        weight: torch tensor or numpy array, 1-D, 2-D or 3-D kernel.
        rank: depthwise filters per input channel; values above the full rank are clamped.
        bias: optional bias ``[Cout]``, carried over to the pointwise conv unchanged.

    Returns:
        :class:`Factors` with tensors of the weight's dtype and device.
    """
    weight = _as_tensor(weight)
    bias = _as_tensor(bias) if bias is not None else None
    if weight.dim() < 3:
        raise ValueError(f"conv weight must be [Cout, Cin, *kernel], got shape {tuple(weight.shape)}")
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    cout, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    r = min(int(rank), full_rank(weight.shape))
    u, s, vh = _svd(weight)
    root = s[:, :r].sqrt()  # balanced split of the singular values between the two convs
    dw = (root[:, :, None] * vh[:, :r, :]).reshape(cin * r, 1, *kernel)
    pw = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2).reshape(cout, cin * r, *([1] * len(kernel)))
    err = _relative_error(s, r)
    return Factors(
        depthwise=dw.to(dtype=weight.dtype, device=weight.device).contiguous(),
        pointwise=pw.to(dtype=weight.dtype, device=weight.device).contiguous(),
        bias=None if bias is None else bias.detach().clone(),
        rank=r,
        error=err,
    )


def _relative_error(s: torch.Tensor, r: int) -> float:
    total = float((s**2).sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float((s[:, r:] ** 2).sum()), 0.0) / total)


def rank_errors(weight) -> list:
    """Relative reconstruction error at every rank ``0..full_rank`` (index = rank), from one SVD."""
    weight = _as_tensor(weight)
    _, s, _ = _svd(weight)
    return [_relative_error(s, r) for r in range(s.shape[1] + 1)]
