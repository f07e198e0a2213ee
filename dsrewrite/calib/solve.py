"""Data-aware initialisation of a separable or low-rank pair, the maths: patch statistics, whitened SVD, ridge refit.

Pure computation on tensors and one conv's settings; running a model to collect the data is
:mod:`dsrewrite.calib.run`. Plain per-channel SVD (:mod:`dsrewrite.plan.factorize`) fits the weights; what matters is
the layer's output on the data it sees. For input channel ``c`` with patch autocorrelation ``A_c = E[p p^T]``
(``K x K``, ``K`` taps), the channel's output error is ``||(W_c - W'_c) A_c^{1/2}||``, so the best rank-``r``
depthwise filters come from the SVD of ``W_c A_c^{1/2}`` (whitened SVD). ``A_c`` is damped relative to the layer
(``+ damp * mean diag``, with a floor) and a dead channel (no variance: dead ReLU, padding) falls back to its
plain SVD, so nothing turns NaN. The pointwise weights (and bias) are then refitted by ridge least squares on the
layer's true outputs, shrunk towards the SVD solution. Statistics are Gram matrices accumulated in float64
(``Cin*r`` square for the refit, ``K x K`` per channel for whitening): activations are never stored.

Of the candidates (plain SVD, plain depthwise + refit, whitened depthwise + refit) the one with the smallest
calibration objective ``||Y - f(X)||_F / ||Y||_F`` is kept, so the result is never worse than plain SVD there.

A low-rank pair (1x1 conv, linear layer ``[Cout, Cin]``) is the separable pair of its one-channel view
(:func:`~dsrewrite.plan.factorize.lowrank_view`), and so is its calibration: the "patches" are the input rows
``[M, Cin]`` (a 1x1 conv's after its stride and padding), the autocorrelation is ``[1, Cin, Cin]``, the whitened
SVD is the layer's SVD whitened by its input covariance, and the refit of the expansion (and bias) is the same
ridge fit with ``d = k`` (:class:`LayerInputs` turns a layer's inputs into either form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..plan.factorize import (Factors, as_lowrank, as_tensor, as_view, channel_svd, factorize, factorize_layer,
                        lowrank_view, ragged_error_curve, ragged_keep, separable_terms, uniform_error_curve,
                        uniform_keep)

__all__ = [
    "PatchStats", "LayerInputs", "LinearFit", "LayerCalibrator", "CalibResult", "whiten_roots", "whitened_factors",
    "whitened_rank_errors", "calibrate_conv", "patch_conv", "patch_conv_like", "summary", "DAMP", "RIDGE",
]

ArrayLike = Union[torch.Tensor, np.ndarray]  # a weight, bias or autocorrelation (numpy from the ONNX route)

DAMP = 1e-2  # autocorrelation damping, relative to the layer's mean patch energy
RIDGE = 1e-3  # ridge strength of the pointwise refit, relative to the mean Gram diagonal
_FLOOR = 1e-12  # absolute floor of the damping (an all-zero layer)
_DEAD = 1e-6  # a channel whose energy is below this fraction of the layer mean is dead: plain SVD
_CHUNK = 1 << 22  # elements per float64 block when accumulating


# ---------------------------------------------------------------------------------------------- statistics
def patch_conv(conv: nn.Module) -> nn.Module:
    """A depthwise conv with one-hot filters that turns an input into its patches (same stride/padding/mode).

    ``patch_conv(conv)(x)`` is ``[N, Cin*K, *out]``: channel ``c*K + t`` is tap ``t`` of input channel ``c``,
    exactly the values ``conv``'s filters multiply (any padding, ``padding_mode``, dilation, stride).
    """
    cin = conv.in_channels if conv.groups == 1 else conv.groups
    kernel = tuple(conv.kernel_size)
    taps = math.prod(kernel)
    cls = type(conv) if type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else {1: nn.Conv1d, 2: nn.Conv2d}[len(kernel)]
    pc = cls(cin, cin * taps, kernel, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
             groups=cin, bias=False, padding_mode=conv.padding_mode,
             device=conv.weight.device, dtype=conv.weight.dtype)
    eye = torch.eye(taps, dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        pc.weight.copy_(eye.repeat(cin, 1).reshape(cin * taps, 1, *kernel))
    pc.requires_grad_(False)
    return pc


def patch_conv_like(patcher: nn.Module, rank: int, ragged: bool = False) -> nn.Module:
    """A depthwise conv with the settings of ``patcher`` and ``rank`` filters per channel (weights unset);
    ``ragged``: one filter per channel of an input gathered to ``Cin*rank`` channels."""
    cin = patcher.groups
    groups = cin * rank if ragged else cin
    pc = type(patcher)(groups, cin * rank, patcher.kernel_size, stride=patcher.stride, padding=patcher.padding,
                       dilation=patcher.dilation, groups=groups, bias=False, padding_mode=patcher.padding_mode,
                       device=patcher.weight.device, dtype=patcher.weight.dtype)
    pc.requires_grad_(False)
    return pc


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` -> ``[N*P, C]`` (one row per output position)."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2).reshape(-1, t.shape[1])


class PatchStats:
    """Per-input-channel patch autocorrelation ``sum p p^T`` (``[Cin, K, K]``, float64) over seen positions."""

    def __init__(self, in_channels: int, taps: int) -> None:
        self.cin, self.taps = in_channels, taps
        self.gram = torch.zeros(in_channels, taps, taps, dtype=torch.float64)
        self.count = 0

    def update(self, patches: torch.Tensor) -> None:
        """Add ``[N, Cin*K, *out]`` patches (the output of :func:`patch_conv`)."""
        n = patches.shape[0]
        p = patches.reshape(n, self.cin, self.taps, -1)
        step = max(1, _CHUNK // max(1, p[0].numel()))
        for i in range(0, n, step):
            blk = p[i:i + step].to(torch.float64)
            self.gram += torch.einsum("nckp,ncjp->ckj", blk, blk).cpu()
        self.count += n * p.shape[-1]

    def autocorr(self) -> torch.Tensor:
        """Mean ``E[p p^T]`` per channel, ``[Cin, K, K]``."""
        return self.gram / max(self.count, 1)


class LayerInputs:
    """A layer's inputs as what its pair's first factor multiplies, and their statistics (pass 1).

    A KxK conv (``lowrank=False``): each input channel's patches (:func:`patch_conv`), ``PatchStats(Cin, K)``.
    A low-rank layer: the input rows ``[M, Cin]`` (a linear layer's channels are last; a 1x1 conv's are dim 1,
    taken after its own stride, padding and padding mode by a one-tap :func:`patch_conv`), which are the patches
    of the one-channel view: ``PatchStats(1, Cin)``.
    """

    def __init__(self, layer: nn.Module, lowrank: bool = False, stats: Optional[PatchStats] = None) -> None:
        self.linear = isinstance(layer, nn.Linear)
        self.lowrank = bool(lowrank) or self.linear
        self.patcher = None if self.linear else patch_conv(layer)
        self.dtype = layer.weight.dtype
        cin = layer.in_features if self.linear else self.patcher.groups
        taps = 1 if self.lowrank else math.prod(self.patcher.kernel_size)
        self.stats = stats if stats is not None else (PatchStats(1, cin) if self.lowrank else PatchStats(cin, taps))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """What :meth:`PatchStats.update` takes: ``[N, Cin*K, *out]``, or (low rank) ``[M, Cin, 1]``."""
        if self.lowrank:
            return self.rows(x).unsqueeze(-1)
        return self.patcher(x.to(self.dtype))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Low rank: the input rows ``[M, Cin]`` the reduction multiplies (one per output position)."""
        if self.linear:
            return x.to(self.dtype).reshape(-1, x.shape[-1])
        return _rows(self.patcher(x.to(self.dtype)))

    def out_rows(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output as rows ``[M, Cout]`` (channels last for a linear layer, dim 1 for a conv)."""
        return y.reshape(-1, y.shape[-1]) if self.linear else _rows(y)

    def matches(self, x: torch.Tensor, y: torch.Tensor, cout: int) -> bool:
        """Whether ``y`` has the shape of this layer's output (``cout`` channels) for input ``x``."""
        if self.linear:
            return y.shape[:-1] == x.shape[:-1] and y.shape[-1] == cout
        return y.dim() == x.dim() and y.shape[:2] == (x.shape[0], cout)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the layer's input ``x`` to the statistics."""
        self.stats.update(self.patches(x))


class LinearFit:
    """Sufficient statistics of a multi-output linear fit ``y ~ P^T z + b`` (float64 Grams, no stored data)."""

    def __init__(self, d: int, cout: int) -> None:
        f64 = torch.float64
        self.zz = torch.zeros(d, d, dtype=f64)
        self.zy = torch.zeros(d, cout, dtype=f64)
        self.sz = torch.zeros(d, dtype=f64)
        self.sy = torch.zeros(cout, dtype=f64)
        self.yy = 0.0
        self.n = 0

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``z [n, d]``, ``y [n, Cout]``."""
        step = max(1, _CHUNK // max(1, z.shape[1] + y.shape[1]))
        for i in range(0, z.shape[0], step):
            zb, yb = z[i:i + step].to(torch.float64), y[i:i + step].to(torch.float64)
            self.zz += (zb.T @ zb).cpu()
            self.zy += (zb.T @ yb).cpu()
            self.sz += zb.sum(0).cpu()
            self.sy += yb.sum(0).cpu()
            self.yy += float((yb * yb).sum())
        self.n += z.shape[0]

    def residual(self, p: torch.Tensor, b: Optional[torch.Tensor]) -> float:
        """``sum ||y - P^T z - b||^2`` from the statistics (``p`` is ``[d, Cout]``)."""
        r = self.yy - 2 * float((p * self.zy).sum()) + float((p * (self.zz @ p)).sum())
        if b is not None:
            r += -2 * float(b @ self.sy) + 2 * float(b @ (p.T @ self.sz)) + self.n * float(b @ b)
        return max(r, 0.0)

    def relative_error(self, p: torch.Tensor, b: Optional[torch.Tensor]) -> float:
        """``||Y - f(Z)||_F / ||Y||_F`` (0 when ``Y`` is all zero and the fit is exact)."""
        res = self.residual(p, b)
        return math.sqrt(res / self.yy) if self.yy > 0 else math.sqrt(res)

    def solve(self, prior: torch.Tensor, fit_bias: bool, ridge: float = RIDGE
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Ridge least squares shrunk towards ``prior`` (``[d, Cout]``); returns ``(P, b)`` in float64.

        The strength grows when there are few samples per unknown (``d / n``), so a fit from a handful of
        positions stays near the SVD solution instead of interpolating noise.
        """
        d = self.zz.shape[0]
        n = max(self.n, 1)
        g, c = self.zz.clone(), self.zy.clone()
        mz, my = self.sz / n, self.sy / n
        if fit_bias:
            g -= n * torch.outer(mz, mz)
            c -= n * torch.outer(mz, my)
        scale = float(torch.diagonal(g).mean().clamp_min(0.0))
        lam = (ridge + d / n) * scale + _FLOOR
        g += lam * torch.eye(d, dtype=g.dtype)
        rhs = c + lam * prior
        try:
            p = torch.linalg.solve(g, rhs)
        except RuntimeError:
            p = torch.linalg.lstsq(g, rhs).solution
        if not torch.isfinite(p).all():
            p = prior.clone()
        b = (my - p.T @ mz) if fit_bias else None
        return p, b


# ---------------------------------------------------------------------------------------------- whitening
def whiten_roots(autocorr: ArrayLike, damp: float = DAMP) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped square roots of per-channel autocorrelations.

    Returns ``(L, L_inv, live)``: ``[Cin, K, K]`` symmetric ``A^{1/2}`` and its inverse (identity for dead
    channels) and a bool mask of channels that are whitened (the rest use plain SVD).
    """
    a = as_tensor(autocorr).to(torch.float64)
    cin, k, _ = a.shape
    a = 0.5 * (a + a.transpose(1, 2))
    energy = torch.diagonal(a, dim1=1, dim2=2).mean(1).clamp_min(0.0)  # per channel
    mean = float(energy.mean()) if cin else 0.0
    eye = torch.eye(k, dtype=torch.float64).expand(cin, k, k)
    if not math.isfinite(mean) or mean <= 0.0:
        return eye.clone(), eye.clone(), torch.zeros(cin, dtype=torch.bool)
    lam = damp * mean + _FLOOR
    live = torch.isfinite(a).all(2).all(1) & (energy > _DEAD * mean)
    a = torch.where(live[:, None, None], a, eye)
    evals, evecs = torch.linalg.eigh(a + lam * eye)
    evals = evals.clamp_min(lam)
    root = (evecs * evals.sqrt()[:, None, :]) @ evecs.transpose(1, 2)
    inv = (evecs * evals.rsqrt()[:, None, :]) @ evecs.transpose(1, 2)
    ok = live & torch.isfinite(root).all(2).all(1) & torch.isfinite(inv).all(2).all(1)
    root = torch.where(ok[:, None, None], root, eye)
    inv = torch.where(ok[:, None, None], inv, eye)
    return root, inv, ok


def _whitened_svd(weight: ArrayLike, autocorr: ArrayLike, damp: float) -> Tuple[torch.Tensor, ...]:
    """Per-channel SVD of ``W_c A_c^{1/2}``: ``(U, S, Vh, A^{-1/2}, live)``."""
    root, inv, live = whiten_roots(autocorr, damp)
    u, s, vh = channel_svd(as_tensor(weight).detach().to(torch.float64).cpu(), right=root)
    return u, s, vh, inv, live


def _output_energy(s: torch.Tensor, live: torch.Tensor, ragged: bool) -> torch.Tensor:
    """Squared whitened singular values. For a ragged split, which compares channels, a dead channel (no
    input: its ``s`` are unwhitened weight values) has none, so it gives its filters to live channels."""
    return (s ** 2) * live[:, None].to(s.dtype) if ragged else s ** 2


def whitened_factors(weight: ArrayLike, rank: int, autocorr: ArrayLike, bias: Optional[ArrayLike] = None,
                     damp: float = DAMP, ragged: bool = False) -> Factors:
    """Rank-``rank`` separable factors from the SVD of ``W_c A_c^{1/2}`` per input channel.

    ``autocorr`` is ``[Cin, K, K]`` (:meth:`PatchStats.autocorr`). Dead channels get their plain SVD.
    ``error`` is the whitened relative error (the data-weighted analogue of the weight error).
    ``ragged``: keep the ``Cin*rank`` terms of largest output energy over all channels (dead channels last).
    """
    w = as_tensor(weight)
    kernel = tuple(w.shape[2:])
    cin = w.shape[1]
    u, s, vh, inv, live = _whitened_svd(w, autocorr, damp)
    r = min(int(rank), s.shape[1])
    energy = _output_energy(s, live, ragged)
    ragged = ragged and r < s.shape[1]
    keep = ragged_keep(energy, cin * r) if ragged else uniform_keep(s, r)
    dw, pw, index = separable_terms(u, s, vh @ inv, keep, kernel)  # filters back in input units
    dropped = float(energy[~keep].sum())
    if not (bool(torch.isfinite(dw).all()) and bool(torch.isfinite(pw).all())):
        return factorize(w, r, bias, ragged=ragged)
    total = float(energy.sum())
    err = math.sqrt(max(dropped, 0.0) / total) if total > 0 else 0.0
    b = as_tensor(bias) if bias is not None else None
    return Factors(dw.to(dtype=w.dtype, device=w.device).contiguous(),
                   pw.to(dtype=w.dtype, device=w.device).contiguous(),
                   None if b is None else b.detach().clone(), r, err, index.to(w.device) if ragged else None)


def whitened_rank_errors(weight: ArrayLike, autocorr: ArrayLike, damp: float = DAMP, ragged: bool = False
                         ) -> List[float]:
    """Whitened relative error at every rank ``0..full_rank`` (index = rank): data-aware rank errors.

    ``ragged``: the error of the ragged split with ``Cin*rank`` terms.
    """
    _, s, _, _, live = _whitened_svd(weight, autocorr, damp)
    return (ragged_error_curve if ragged else uniform_error_curve)(_output_energy(s, live, ragged))


# ---------------------------------------------------------------------------------------------- one layer
@dataclass
class CalibResult:
    """Outcome for one layer: the chosen factors and the calibration errors (relative output error)."""

    factors: Factors
    error_before: float  # plain SVD
    error_after: float  # the kept candidate
    method: str  # "svd", "svd+refit", "whitened+refit"


def _pw_matrix(f: Factors) -> torch.Tensor:
    """Pointwise weight as ``[d, Cout]`` float64."""
    return f.pointwise.detach().reshape(f.pointwise.shape[0], -1).T.to(torch.float64).cpu()


class LayerCalibrator:
    """Two passes over calibration data for one layer being replaced by a rank-``rank`` pair.

    Pass 1 (:meth:`observe_inputs`): per-channel patch autocorrelation. Pass 2 (:meth:`observe`): Grams of
    the depthwise outputs of the plain and whitened candidates against the true outputs. :meth:`result`
    solves the refits and keeps the best candidate on the calibration objective.

    A low-rank layer (``lowrank``, implied by an ``nn.Linear`` or low-rank ``plain``) is solved as its one-channel
    view (see the module doc): the same whitening and refit, the result converted back with
    :func:`~dsrewrite.plan.factorize.as_lowrank`.

    Args:
        conv: an ``nn.Conv1d``/``nn.Conv2d`` (or, low rank, an ``nn.Linear`` or 1x1 conv) carrying the settings
            (stride, padding, ...) and, unless ``weight`` is given, the original weight and bias.
        rank: depthwise filters per input channel (low rank: the width ``k`` of the reduction).
        plain: the plain-SVD factors to compare with (computed if ``None``).
        ragged: per-channel ranks (the whitened split is chosen on output energy); implied by ragged ``plain``.
        stats: pass 1 already made (the layer's input statistics gathered elsewhere, e.g. for rank allocation):
            go straight to :meth:`finish_inputs`.
        lowrank: calibrate the layer's low-rank pair (a 1x1 conv's; implied for a linear layer).
    """

    def __init__(self, conv: nn.Module, rank: int, *, weight: Optional[ArrayLike] = None,
                 bias: Optional[ArrayLike] = None, plain: Optional[Factors] = None, damp: float = DAMP,
                 ridge: float = RIDGE, ragged: bool = False, stats: Optional[PatchStats] = None,
                 lowrank: bool = False) -> None:
        self.weight = (conv.weight if weight is None else as_tensor(weight)).detach()
        self.bias = (conv.bias if weight is None else (None if bias is None else as_tensor(bias)))
        self.bias = None if self.bias is None else self.bias.detach()
        self.cout, self.cin = self.weight.shape[:2]
        self.lowrank = bool(lowrank) or isinstance(conv, nn.Linear) or (plain is not None and plain.lowrank)
        # the weight the solver sees: the conv's own, or the low-rank layer's one-channel view [Cout, 1, Cin]
        self.view = lowrank_view(self.weight) if self.lowrank else self.weight
        self.kernel = tuple(self.view.shape[2:])
        self.taps = math.prod(self.kernel)
        self.ragged = not self.lowrank and (bool(ragged) or (plain is not None and plain.channel_index is not None))
        if plain is None:
            plain = factorize_layer(self.weight, rank, self.bias, lowrank=self.lowrank, ragged=self.ragged)
        self.plain = plain
        self.rank = self.plain.rank
        self.damp, self.ridge = damp, ridge
        self.inputs = LayerInputs(conv, self.lowrank, stats)
        self.patcher, self.stats = self.inputs.patcher, self.inputs.stats
        self.whitened: Optional[Factors] = None  # of the view, for a low-rank layer
        d = self.view.shape[1] * self.rank
        self.fits = {"svd": LinearFit(d, self.cout), "whitened": LinearFit(d, self.cout)}
        self._dw: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def _depthwise(self, factors: Factors) -> Callable[[torch.Tensor], torch.Tensor]:
        """The candidate's first factor as a function of the layer input, giving rows ``[M, d]`` (ragged: the
        depthwise conv on the gathered channels; low rank: the reduction of the view's ``factors``)."""
        if self.lowrank:
            red = factors.depthwise.reshape(factors.depthwise.shape[0], -1).T.to(self.inputs.dtype)
            return lambda x: self.inputs.rows(x) @ red.to(x.device)
        index = factors.channel_index
        dw = patch_conv_like(self.patcher, self.rank, ragged=index is not None)
        with torch.no_grad():
            dw.weight.copy_(factors.depthwise.to(dw.weight.dtype))
        dtype = self.patcher.weight.dtype
        if index is None:
            return lambda x: _rows(dw(x.to(dtype)))
        index = index.to(dw.weight.device)
        return lambda x: _rows(dw(x.to(dtype).index_select(1, index)))

    @torch.no_grad()
    def observe_inputs(self, x: torch.Tensor) -> None:
        """Pass 1: add the layer's input ``x`` (``[N, Cin, *spatial]``; ``[..., Cin]`` for a linear layer)."""
        self.inputs.update(x)

    def matches(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether ``y`` has the shape of this layer's output for input ``x`` (a usable target)."""
        return self.inputs.matches(x, y, self.cout)

    def finish_inputs(self) -> None:
        """End pass 1: compute the whitened depthwise filters (low rank: the whitened reduction)."""
        wf = whitened_factors(self.view, self.rank, self.stats.autocorr(), self.bias, self.damp, ragged=self.ragged)
        self.whitened = wf
        self._dw = {"svd": self._depthwise(as_view(self.plain)), "whitened": self._depthwise(wf)}

    @torch.no_grad()
    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Pass 2: add input ``x`` and the true output ``y`` (``[N, Cout, *out]``; ``[..., Cout]`` for a linear
        layer)."""
        if not self._dw:
            self.finish_inputs()
        yr = self.inputs.out_rows(y)
        for key, dw in self._dw.items():
            self.fits[key].update(dw(x), yr)

    def result(self) -> CalibResult:
        """The best of plain SVD, SVD + refit and whitened + refit on the calibration objective."""
        if not self._dw:
            self.finish_inputs()
        fit_bias = self.bias is not None
        plain = as_view(self.plain)
        p0 = _pw_matrix(plain)
        b0 = None if plain.bias is None else plain.bias.detach().to(torch.float64).cpu()
        base = self.fits["svd"].relative_error(p0, b0)
        best = (base, "svd", self.plain)
        for key, f in (("svd", plain), ("whitened", self.whitened)):
            p, b = self.fits[key].solve(_pw_matrix(f), fit_bias, self.ridge)
            err = self.fits[key].relative_error(p, b)
            if math.isfinite(err) and err < best[0]:
                kept = _with_pointwise(f, p, b)
                best = (err, f"{key}+refit", as_lowrank(kept, tuple(self.weight.shape)) if self.lowrank else kept)
        return CalibResult(best[2], base, best[0], best[1])


def _with_pointwise(f: Factors, p: torch.Tensor, b: Optional[torch.Tensor]) -> Factors:
    """``f`` with the refitted pointwise ``p`` (``[d, Cout]``) and bias ``b``, in ``f``'s dtype and device."""
    pw = p.T.reshape(f.pointwise.shape).to(dtype=f.pointwise.dtype, device=f.pointwise.device).contiguous()
    bias = None if b is None else b.to(dtype=f.pointwise.dtype, device=f.pointwise.device)
    return Factors(f.depthwise, pw, bias, f.rank, f.error, f.channel_index)


def calibrate_conv(conv: nn.Module, rank: int, inputs: Iterable[torch.Tensor],
                   targets: Optional[Iterable[torch.Tensor]] = None, **kw: Any) -> CalibResult:
    """Calibrate one conv (or linear layer; ``lowrank=True``: a 1x1 conv's low-rank pair) on input batches
    (``targets`` default to ``conv(x)``, the layer's true outputs); ``kw`` go to :class:`LayerCalibrator`."""
    xs = list(inputs)
    with torch.no_grad():
        ys = [conv(x) for x in xs] if targets is None else list(targets)
    cal = LayerCalibrator(conv, rank, **kw)
    with torch.no_grad():
        for x in xs:
            cal.observe_inputs(x)
        cal.finish_inputs()
        for x, y in zip(xs, ys):
            cal.observe(x, y)
    return cal.result()


def summary(results: Iterable[CalibResult]) -> str:
    """The report's words for a set of calibrated layers: mean relative output error before and after, and how
    many layers kept each candidate (both routes say it the same way)."""
    results = list(results)
    if not results:
        return "no layer calibrated"
    methods: Dict[str, int] = {}
    for r in results:
        methods[r.method] = methods.get(r.method, 0) + 1
    before = sum(r.error_before for r in results) / len(results)
    after = sum(r.error_after for r in results) / len(results)
    how = ", ".join(f"{k} {v}" for k, v in sorted(methods.items()))
    return f"mean relative output error {before:.4f} (plain SVD) -> {after:.4f} ({how})"
