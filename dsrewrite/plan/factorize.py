"""Low-rank separable factorisation of a convolution weight: the maths both frontends share.

For each input channel ``c`` the slice ``W[:, c]`` reshaped to ``Cout x K`` (``K`` = kernel taps) has an
SVD ``U S Vh``. Keeping ``r`` terms gives the best rank-``r`` fit of that slice (Eckart-Young), i.e. a
depthwise conv with ``r`` filters per channel (rows of ``sqrt(S) Vh``) followed by a 1x1 conv
(columns of ``U sqrt(S)``). ``r = min(Cout, K)`` is exact. All channels go through one batched SVD.

*Ragged* ranks keep the same number of terms, ``Cin*r``, but let each channel have its own count: the
``Cin*r`` largest singular values over all channels. That is the best fit with that many depthwise filters
(the error is the sum of the dropped ``s**2``), at the cost of the uniform rank ``r``; the depthwise conv then
reads its input through ``channel_index`` (filter ``j`` reads input channel ``channel_index[j]``).

*Low rank* (1x1 convs and linear layers, ``[Cout, Cin]``): the same factorisation of the weight seen as one input
channel with ``Cin`` taps (:func:`lowrank_view`), i.e. the truncated SVD of the whole matrix: a ``k``-wide
reduction (rows of ``sqrt(S) Vh``) then the expansion (``U sqrt(S)``), exact at ``k = min(Cin, Cout)``.
:func:`factorize_layer` picks the form; :func:`as_lowrank` / :func:`as_view` convert between the view's factors
and the layer's.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..ir import full_rank  # one definition, shared with ConvSpec.full_rank (re-exported here)

__all__ = ["Factors", "factorize", "factorize_layer", "lowrank_view", "as_lowrank", "as_view", "exact_factors", "full_rank", "rank_errors", "uniform_error_curve", "ragged_error_curve",
           "as_tensor", "channel_svd", "ragged_keep", "counts_keep", "uniform_keep", "separable_terms"]


@dataclass
class Factors:
    """Result of :func:`factorize`.

    Attributes:
        depthwise: ``[Cin*r, 1, *kernel]`` weight of the depthwise conv (channel ``c*r + j`` reads input ``c``).
        pointwise: ``[Cout, Cin*r, 1, ...]`` weight of the 1x1 conv.
        bias: the original bias (now on the pointwise conv) or ``None``.
        rank: the rank kept (after clamping to the full rank).
        error: relative Frobenius error ``||W - W_r|| / ||W||`` of the weight reconstruction.
        channel_index: for ragged ranks, ``[Cin*r]`` int64, the input channel of each depthwise filter
            (non-decreasing; a channel may have none); ``depthwise`` is then ``[Cin*r, 1, *kernel]`` with one
            filter per entry. ``None`` for uniform ranks (filter ``c*r + j`` reads input ``c``).
        lowrank: a low-rank pair: ``depthwise`` is the reduction ``[k, Cin, 1...]`` (``[k, Cin]`` for a linear
            layer) and ``pointwise`` the expansion ``[Cout, k, 1...]``, ``rank`` is ``k``.
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    bias: Optional[torch.Tensor]
    rank: int
    error: float
    channel_index: Optional[torch.Tensor] = None
    lowrank: bool = False

    @property
    def channel_ranks(self) -> Optional[torch.Tensor]:
        """Ragged ranks: filters per input channel ``[Cin]`` (``None`` for uniform ranks)."""
        if self.channel_index is None:
            return None
        cin = self.pointwise.shape[1] // self.rank
        return torch.bincount(self.channel_index.cpu(), minlength=cin)


def exact_factors(weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, lowrank: bool = False) -> Factors:
    """The trivial exact factorisation, no SVD: ``K`` one-hot depthwise filters per channel (one per tap)
    and the weight itself as the pointwise conv (low rank: the identity, then the weight). Same function as the
    layer, for checking a pair's settings."""
    w = as_tensor(weight).detach()
    if lowrank:
        cout, cin, ones = w.shape[0], w.shape[1], (1,) * (w.dim() - 2)
        eye = torch.eye(cin, dtype=w.dtype, device=w.device).reshape(cin, cin, *ones)
        b = None if bias is None else as_tensor(bias).detach().clone()
        return Factors(eye, w.clone(), b, cin, 0.0, lowrank=True)
    cout, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    taps = math.prod(kernel)
    eye = torch.eye(taps, dtype=w.dtype, device=w.device).reshape(1, taps, 1, *kernel)
    depthwise = eye.expand(cin, taps, 1, *kernel).reshape(cin * taps, 1, *kernel).clone()
    pointwise = w.reshape(cout, cin * taps, *([1] * len(kernel))).clone()
    b = None if bias is None else as_tensor(bias).detach().clone()
    return Factors(depthwise, pointwise, b, taps, 0.0)


def as_tensor(x) -> torch.Tensor:
    """``x`` as a torch tensor (a numpy array is wrapped without a copy where it is contiguous)."""
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


def channel_svd(weight: torch.Tensor, right: Optional[torch.Tensor] = None):
    """Batched per-input-channel SVD in float64: returns U [Cin,Cout,q], S [Cin,q], Vh [Cin,q,K].

    ``right`` (``[Cin, K, K]``, float64): decompose ``W_c @ right_c`` instead (the whitened SVD).
    """
    cout, cin = weight.shape[:2]
    taps = int(math.prod(weight.shape[2:]))
    slices = weight.detach().to(torch.float64).reshape(cout, cin, taps).permute(1, 0, 2)
    if right is not None:
        slices = slices @ right.to(slices.device)
    with _single_thread(slices.device):
        return torch.linalg.svd(slices, full_matrices=False)


def factorize(weight, rank: int, bias=None, *, ragged: bool = False, channel_ranks=None) -> Factors:
    """Factorise a conv weight ``[Cout, Cin, *kernel]`` (groups=1) into a rank-``rank`` separable pair.

    Args:
        weight: torch tensor or numpy array, 1-D, 2-D or 3-D kernel.
        rank: depthwise filters per input channel; values above the full rank are clamped.
        bias: optional bias ``[Cout]``, carried over to the pointwise conv unchanged.
        ragged: spread the ``Cin*rank`` filters over the channels by their spectra (see the module doc).
        channel_ranks: ragged ranks given, ``[Cin]`` filters per input channel summing to ``Cin*rank`` (a saved
            plan's, :func:`counts_keep`): each channel keeps its first terms, whatever its spectrum.

    Returns:
        :class:`Factors` with tensors of the weight's dtype and device.
    """
    weight = as_tensor(weight)
    bias = as_tensor(bias) if bias is not None else None
    if weight.dim() < 3:
        raise ValueError(f"conv weight must be [Cout, Cin, *kernel], got shape {tuple(weight.shape)}")
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    cin = weight.shape[1]
    kernel = tuple(weight.shape[2:])
    r = min(int(rank), full_rank(weight.shape))
    u, s, vh = channel_svd(weight)
    if channel_ranks is not None:
        keep, ragged = counts_keep(channel_ranks, s.shape[1], cin * r).to(s.device), True
        if keep.shape[0] != cin:
            raise ValueError(f"channel ranks must hold {cin} values (one per input channel), got {keep.shape[0]}")
    else:
        ragged = ragged and r < s.shape[1]
        keep = ragged_keep(s ** 2, cin * r) if ragged else uniform_keep(s, r)
    dw, pw, index = separable_terms(u, s, vh, keep, kernel)
    err = _error_of(s, float((s[~keep] ** 2).sum()))
    return Factors(
        depthwise=dw.to(dtype=weight.dtype, device=weight.device).contiguous(),
        pointwise=pw.to(dtype=weight.dtype, device=weight.device).contiguous(),
        bias=None if bias is None else bias.detach().clone(),
        rank=r,
        error=err,
        channel_index=index.to(weight.device) if ragged else None,
    )


def lowrank_view(weight):
    """A 1x1 conv or linear weight ``[Cout, Cin, 1...]`` seen as one input channel with ``Cin`` taps:
    ``[Cout, 1, Cin]`` (a view where possible; numpy arrays become tensors)."""
    w = as_tensor(weight)
    return w.reshape(w.shape[0], 1, -1)


def as_lowrank(view: Factors, weight_shape) -> Factors:
    """The layer's low-rank factors from those of its :func:`lowrank_view`: reduction ``[k, Cin, 1...]`` and
    expansion ``[Cout, k, 1...]`` (no trailing dims for a linear weight ``[Cout, Cin]``)."""
    ones = (1,) * (len(weight_shape) - 2)
    k = view.depthwise.shape[0]
    return Factors(view.depthwise.reshape(k, -1, *ones), view.pointwise.reshape(view.pointwise.shape[0], k, *ones),
                   view.bias, view.rank, view.error, None, lowrank=True)


def as_view(factors: Factors) -> Factors:
    """The inverse of :func:`as_lowrank`: the factors of the layer's one-channel view (unchanged if not low rank)."""
    if not factors.lowrank:
        return factors
    k, cin = factors.depthwise.shape[:2]
    return Factors(factors.depthwise.reshape(k, 1, cin), factors.pointwise.reshape(factors.pointwise.shape[0], k, 1),
                   factors.bias, factors.rank, factors.error, None)


def factorize_layer(weight, rank: int, bias=None, *, lowrank: bool = False, ragged: bool = False,
                    channel_ranks=None) -> Factors:
    """:func:`factorize` for any layer kind: a KxK conv's separable pair, or (``lowrank``) a 1x1 conv's or
    linear layer's low-rank pair (the same factorisation of its :func:`lowrank_view`; ``ragged`` and
    ``channel_ranks`` are moot there: there is one channel)."""
    if not lowrank:
        return factorize(weight, rank, bias, ragged=ragged, channel_ranks=channel_ranks)
    w = as_tensor(weight)
    return as_lowrank(factorize(lowrank_view(w), rank, bias), tuple(w.shape))


def ragged_keep(energy: torch.Tensor, terms: int) -> torch.Tensor:
    """Mask ``[Cin, q]`` of the ``terms`` largest energies over all channels (ties: lower channel, lower term).

    Each channel's values are sorted, so the kept set is a prefix of every channel's terms.
    """
    flat = energy.reshape(-1)
    order = torch.argsort(-flat, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:terms]] = True
    return keep.reshape(energy.shape)


def counts_keep(counts, q: int, terms: int) -> torch.Tensor:
    """Mask ``[Cin, q]`` keeping each channel's first ``counts[c]`` terms: ragged ranks given rather than chosen
    (a saved plan's); ``ValueError`` unless ``counts`` are ``Cin`` values in ``[0, q]`` summing to ``terms``."""
    c = torch.as_tensor(counts, dtype=torch.int64).reshape(-1).cpu()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > q) or int(c.sum()) != terms:
        raise ValueError(f"channel ranks must be values in [0, {q}] summing to {terms}, got {c.numel()} values "
                         f"summing to {int(c.sum())}")
    return torch.arange(q)[None, :] < c[:, None]


def uniform_keep(s: torch.Tensor, rank: int) -> torch.Tensor:
    """Mask ``[Cin, q]`` of every channel's first ``rank`` terms (uniform ranks)."""
    return (torch.arange(s.shape[1], device=s.device) < rank).expand(s.shape)


def separable_terms(u: torch.Tensor, s: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, kernel: tuple):
    """Depthwise ``[R, 1, *kernel]``, pointwise ``[Cout, R, 1...]`` and channel index ``[R]`` of the kept terms
    in channel order, then term order (uniform masks give filter ``c*r + j``), each singular value split
    evenly between the two convs; ``rows`` ``[Cin, q, K]``: the depthwise filters of every term."""
    ch, term = keep.nonzero(as_tuple=True)
    root = s[ch, term].sqrt()
    dw = (root[:, None] * rows[ch, term, :]).reshape(len(ch), 1, *kernel)
    pw = (u[ch, :, term] * root[:, None]).t().reshape(u.shape[1], len(ch), *([1] * len(kernel)))
    return dw, pw, ch.to(torch.int64)


def _error_of(s: torch.Tensor, dropped: float) -> float:
    total = float((s**2).sum())
    return 0.0 if total == 0.0 else math.sqrt(max(dropped, 0.0) / total)


def rank_errors(weight, *, ragged: bool = False, lowrank: bool = False) -> list:
    """Relative reconstruction error at every rank ``0..full_rank`` (index = rank), from one SVD.

    ``ragged``: the error of the ragged factorisation with ``Cin*rank`` filters. ``lowrank``: of the low-rank
    pair of a 1x1 conv or linear weight.
    """
    weight = lowrank_view(weight) if lowrank else as_tensor(weight)
    ragged = ragged and not lowrank
    _, s, _ = channel_svd(weight)
    return (ragged_error_curve if ragged else uniform_error_curve)(s ** 2)


def uniform_error_curve(energy: torch.Tensor) -> list:
    """Relative error of the uniform split at every rank ``0..q`` (index = rank), from ``energy`` ``[Cin, q]``
    (squared singular values, or any per-term energy): every channel's first ``rank`` terms are kept."""
    total = float(energy.sum())
    if total <= 0.0:
        return [0.0] * (energy.shape[1] + 1)
    tail = torch.flip(torch.cumsum(torch.flip(energy.sum(0), [0]), 0), [0]).tolist() + [0.0]
    return [math.sqrt(max(t, 0.0) / total) for t in tail]


def ragged_error_curve(energy: torch.Tensor) -> list:
    """Relative error of the best ragged split at every rank ``0..q`` (index = rank), from ``energy``
    ``[Cin, q]`` (squared singular values, or any per-term energy): the ``Cin*rank`` largest are kept."""
    cin, q = energy.shape
    total = float(energy.sum())
    flat = torch.sort(energy.reshape(-1), descending=True).values
    dropped = flat.flip(0).cumsum(0).flip(0)  # dropped[i] = sum of flat[i:]
    return [math.sqrt(max(float(dropped[cin * r]), 0.0) / total) if total > 0 and cin * r < flat.numel() else 0.0
            for r in range(q + 1)]
