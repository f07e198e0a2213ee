"""Per-layer latency: time a conv and its separable replacement at candidate ranks, on the runtime that runs it.

FLOPs are not time (a separable pair at half the FLOPs can be slower in PyTorch eager NCHW), so
``rewrite(..., target_latency=...)`` allocates ranks by measured milliseconds. :class:`LayerTimer` builds a
layer of the conv's shape with random weights (the same ``SeparableConv*d`` and backend the rewritten model
uses: Triton on CUDA, torch ops on CPU), runs it in the chosen runtime and memory format, and times the conv
and its pairs at every candidate rank side by side, round by round (drift on a shared machine moves them
alike), keeping the fastest round of each under a small time budget. With torch ops a uniform pair is timed in
both depthwise forms (grouped, and on a gathered copy of the input: see :mod:`dsrewrite.modules`), and the
gathered form is chosen when it is clearly faster (``GATHER_MARGIN``). Measurements are cached in memory
(keyed by shape, dtype, device, backend, memory format, rank, form and thread count) and optionally in a
JSON file.

A 1x1 conv or linear layer (``spec.lowrank``) is timed as itself (``nn.Conv*d`` with its stride, ``nn.Linear`` on
an input ``[rows, Cin]``, ``rows`` those of one call) and as the low-rank pair the pass installs
(``LowRankConv*d`` / ``LowRankLinear`` at rank ``k``); it has one form (nothing to gather).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..plan.cost_model import candidate_ranks
from ..frontends.conv_modules import deepcopy_module
from ..ir import LINEAR, ConvSpec
from ..modules import LowRankConv1d, LowRankConv2d, LowRankLinear, SeparableConv1d, SeparableConv2d
from .measure import time_call, time_side_by_side

__all__ = ["LayerTimer", "ScaledTimer", "layer_input", "calls_scale", "cached_ms", "time_fn",
           "best_memory_format", "timeable", "linear_rows", "MEMORY_FORMATS", "GATHER_MARGIN"]

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
# the gathered depthwise form must take less than this fraction of the grouped form's time: it copies the
# input `rank` times (memory), and a single timing of a large layer on a shared CPU is noisy
GATHER_MARGIN = 0.9
_CACHE: Dict[str, float] = {}  # process-wide: the same layer shape is timed once


def time_fn(fn, args: Sequence[Any], *, device: torch.device, reps: int = 5, warmup: int = 1,
            max_seconds: float = 0.25) -> float:
    """Fastest of up to ``reps`` calls in milliseconds (at least 2 timed calls; CUDA-synchronised)."""
    return time_call(fn, args, warmup=warmup, reps=reps, max_seconds=max_seconds, device=device, reduce=min,
                     min_reps=2)


def timeable(spec: ConvSpec) -> bool:
    """Whether a layer's shape is known well enough to time it: a conv's output size, a linear layer's rows."""
    return spec.out_pixels > 0 if spec.kind == LINEAR else bool(spec.out_spatial)


def linear_rows(spec: ConvSpec) -> int:
    """Rows of one call of a linear layer (the leading dims of its input flattened; calls of differing shapes
    averaged): it is timed on an input ``[rows, Cin]``."""
    return max(1, round(spec.out_pixels / max(spec.calls, 1)))


def layer_input(spec: ConvSpec) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The input shape ``[batch, Cin, *spatial]`` and symmetric padding of a layer timed alone: 'same'-style
    padding and the input size that gives the conv's output size (its real padding does not change its cost).
    A linear layer: ``[rows, Cin]`` (:func:`linear_rows`), no padding."""
    if spec.kind == LINEAR:
        return (linear_rows(spec), spec.in_channels), ()
    pads, size = [], []
    for o, k, s, d in zip(spec.out_spatial, spec.kernel, spec.stride, spec.dilation):
        p = d * (k - 1) // 2
        pads.append(p)
        size.append(max((o - 1) * s + d * (k - 1) + 1 - 2 * p, 1))
    return (spec.batch, spec.in_channels, *size), tuple(pads)


def calls_scale(spec: ConvSpec) -> float:
    """What one timed call is multiplied by to cover all of the conv's calls (shared modules, varying shapes)."""
    one = linear_rows(spec) if spec.kind == LINEAR else spec.batch * math.prod(spec.out_spatial)
    return spec.out_pixels / one if one else 1.0


Variant = Tuple[Optional[int], bool]  # (rank, gathered); rank None: the dense conv


def cached_ms(timer: Any, cache: Dict, spec: ConvSpec, want: Variant, variants: Sequence[Variant],
              key: Callable[[Variant], Any], measure: Callable[[List[Variant]], List[float]]) -> Optional[float]:
    """A layer timer's time of variant ``want`` of ``spec`` over all the conv's calls (``None`` when the output
    shape is unknown), from ``cache`` (one call's ms under ``key(variant)``).

    On a miss every variant planning asks about (``variants``: the dense conv first) is measured by
    ``measure(variants)`` side by side, round by round, so drift on a shared machine moves the dense conv and
    its candidate pairs alike, and all are cached; a variant outside that list is timed next to the dense conv
    and cached alone. New measurements are counted in ``timer.measured``."""
    if not timeable(spec):
        return None
    if key(want) not in cache:
        todo = list(variants) if want in variants else [variants[0], want]
        times = measure(todo)
        for v, t in zip(todo, times):
            if want in variants or v == want:
                cache[key(v)] = t
        timer.measured += len(todo)
    return cache[key(want)] * calls_scale(spec)


class LayerTimer:
    """Measure convs and separable pairs of a :class:`~dsrewrite.ir.ConvSpec`'s shape (1x1 convs and linear
    layers: the layer and its low-rank pair).

    Args:
        device: where to time (``"cpu"``, ``"cuda"``, a ``torch.device``).
        dtype: the model's dtype.
        backend: ``SeparableConv*d`` backend (``"auto"``: Triton on CUDA when it can run, torch ops otherwise).
        memory_format: ``"contiguous"`` (NCHW) or ``"channels_last"`` (2-D convs only).
        reps / max_seconds: repetitions and time budget per measurement (the fastest is kept).
        cache_file: optional JSON file read at start and written after new measurements.
        ragged: time ragged pairs (torch ops gather the input channels first; Triton reads through the index).
        runtime: a :class:`dsrewrite.timing.runtimes.Runtime` the layers run in (eager by default; Inductor compiles
            each layer before timing it).

    ``gathered(spec, rank)`` says whether the pair should run with ``gather_input=True`` (measured faster).
    """

    @property
    def runtime_name(self) -> str:
        return self.runtime.name if self.runtime is not None else "eager"

    def __init__(self, device: Any = "cpu", dtype: torch.dtype = torch.float32, backend: str = "auto",
                 memory_format: str = "contiguous", reps: int = 5, max_seconds: float = 0.25,
                 cache_file: Optional[str] = None, ragged: bool = False, runtime: Any = None) -> None:
        self.device = torch.device(device)
        self.runtime = runtime  # None: eager, each layer called as it is
        self.dtype = dtype
        self.backend = backend
        self.memory_format = "contiguous" if memory_format == "auto" else memory_format
        self.reps, self.max_seconds = reps, max_seconds
        self.ragged = bool(ragged)
        # torch ops run a uniform pair's depthwise conv in either form; Triton (auto on CUDA) has one
        self.two_forms = not self.ragged and (self.backend == "torch" or self.device.type != "cuda")
        self.cache_file = os.fspath(cache_file) if cache_file else None
        self.measured = 0  # new measurements (cache misses)
        if self.cache_file and os.path.exists(self.cache_file):
            try:
                with open(self.cache_file) as f:
                    _CACHE.update({k: float(v) for k, v in json.load(f).items()})
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------ keys and shapes
    def _where(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.device)}"
        return f"cpu:{torch.get_num_threads()}t"

    def key(self, spec: ConvSpec, rank: Optional[int], gathered: bool = False) -> str:
        if rank is None:
            what = "dense"
        elif spec.lowrank:
            what = f"lowrank{rank}"
        else:
            what = f"{'ragged' if self.ragged else 'gathered' if gathered else 'sep'}{rank}"
        shape = layer_input(spec)[0] if timeable(spec) else None  # a linear layer's rows are in no other field
        return "|".join(str(x) for x in (
            what, spec.kind, spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.dilation,
            spec.bias, spec.batch, spec.out_spatial, shape, str(self.dtype), self._where(), self.backend,
            self.memory_format, self.runtime_name))

    def _two_forms(self, spec: ConvSpec) -> bool:
        """Whether the pair of ``spec`` has two depthwise forms to choose from (a low-rank pair has one)."""
        return self.two_forms and not spec.lowrank

    # ------------------------------------------------------------------ measuring
    def _build(self, spec: ConvSpec, rank: Optional[int], gathered: bool = False) -> Tuple[nn.Module, torch.Tensor]:
        """A layer of ``spec``'s shape (dense, or separable at ``rank``) with random weights, and its input."""
        shape, pads = layer_input(spec)
        dims = spec.spatial_dims
        kw = dict(stride=spec.stride, padding=pads, dilation=spec.dilation, bias=spec.bias,
                  device=self.device, dtype=self.dtype)
        cin, cout = spec.in_channels, spec.out_channels
        mod: nn.Module
        if spec.kind == LINEAR:
            mod = (nn.Linear(cin, cout, bias=spec.bias, device=self.device, dtype=self.dtype) if rank is None else
                   LowRankLinear(cin, cout, rank, bias=spec.bias, device=self.device, dtype=self.dtype))
        elif spec.lowrank and rank is not None:  # a 1x1 conv's pair: the reduction carries its stride
            mod = (LowRankConv1d if dims == 1 else LowRankConv2d)(cin, cout, rank, **kw)
        elif rank is None:
            mod = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, spec.kernel, **kw)
        else:
            cls = SeparableConv1d if dims == 1 else SeparableConv2d
            # a ragged pair costs the same whatever the per-channel split: time the uniform split, gathered
            index = torch.arange(cin).repeat_interleave(rank) if self.ragged else None
            mod = cls(cin, cout, spec.kernel, rank, backend=self.backend,
                      channel_index=index, gather_input=gathered, **kw)
        mod.eval().requires_grad_(False)
        x = torch.randn(shape, device=self.device, dtype=self.dtype)
        if dims == 2 and self.memory_format == "channels_last":
            mod = mod.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return mod, x

    def _variants(self, spec: ConvSpec) -> List[Variant]:
        """What planning asks about a conv: the dense conv and the pair at each candidate rank, in both
        depthwise forms where there are two."""
        ranks = candidate_ranks(spec)
        both = [(r, True) for r in ranks if self._two_forms(spec) and r > 1]
        return [(None, False)] + [(r, False) for r in ranks] + both

    def _measure_variants(self, spec: ConvSpec, variants: Sequence[Variant]) -> List[float]:
        """One call's time (ms) of each ``(rank, gathered)`` variant, timed side by side round by round."""
        built = [self._build(spec, r, g) for r, g in variants]
        x = built[0][1]
        fns = [self.runtime.prepare(m, (x,)) if self.runtime is not None else m for m, _ in built]
        return time_side_by_side(fns, (x,), device=self.device, reps=self.reps,
                                 max_seconds=self.max_seconds * len(fns), warmup=self._warmup)

    @property
    def _warmup(self) -> int:  # a compiled layer's first call compiles it, and the next may still settle
        return 1 if self.runtime_name == "eager" else 2

    def _get(self, spec: ConvSpec, rank: Optional[int], gathered: bool = False) -> Optional[float]:
        variants = self._variants(spec)
        if (rank, gathered) not in variants:  # a rank off the candidate list: its forms next to the dense conv
            variants = [(None, False), (rank, False)] + ([(rank, True)] if self._two_forms(spec) and rank > 1 else [])
        return cached_ms(self, _CACHE, spec, (rank, gathered), variants,
                         lambda v: self.key(spec, *v), lambda vs: self._measure_variants(spec, vs))

    def form_times(self, spec: ConvSpec, rank: int) -> Optional[Tuple[float, float]]:
        """(grouped, gathered) times of the uniform pair over all calls of the conv; ``None`` when the output
        shape is unknown or the pair has one form only (Triton, ragged pairs, rank 1, low-rank pairs)."""
        if not (self._two_forms(spec) and rank > 1 and timeable(spec)):
            return None
        return self._get(spec, rank), self._get(spec, rank, gathered=True)

    def dense_ms(self, spec: ConvSpec) -> Optional[float]:
        """Time of the original conv over all its calls (``None`` when the output shape is unknown)."""
        return self._get(spec, None)

    def separable_ms(self, spec: ConvSpec, rank: int) -> Optional[float]:
        """Time of the separable pair at ``rank`` over all calls of the conv, in the form it will run in."""
        times = self.form_times(spec, int(rank))
        if times is None:
            return self._get(spec, int(rank))
        return times[1] if _gathers(times) else times[0]

    def gathered(self, spec: ConvSpec, rank: int) -> bool:
        """Whether the pair at ``rank`` runs with ``gather_input=True``: measured faster by ``GATHER_MARGIN``."""
        times = self.form_times(spec, int(rank))
        return times is not None and _gathers(times)

    def save(self) -> None:
        """Write the cache to ``cache_file`` (if one was given)."""
        if self.cache_file:
            tmp = self.cache_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(_CACHE, f, indent=0, sort_keys=True)
            os.replace(tmp, self.cache_file)


class ScaledTimer:
    """A layer timer whose pair times (separable and low-rank) are multiplied by ``scale``: the closed loop's
    correction when the whole model measured a different ratio than the layers timed alone predicted (dense
    times, the depthwise form and everything else are the wrapped timer's)."""

    def __init__(self, timer: Any, scale: float) -> None:
        self.timer, self.scale = timer, float(scale)

    def separable_ms(self, spec: ConvSpec, rank: int) -> Optional[float]:
        ms = self.timer.separable_ms(spec, rank)
        return None if ms is None else ms * self.scale

    def __getattr__(self, name: str) -> Any:  # dense_ms, gathered, memory_format, ... of the wrapped timer
        return getattr(self.timer, name)


def _gathers(times: Tuple[float, float]) -> bool:
    """The form rule on (grouped, gathered) times: gathered only when clearly faster."""
    return times[1] < GATHER_MARGIN * times[0]


def to_format(model: nn.Module, args: Sequence[Any], memory_format: str) -> Tuple[nn.Module, tuple]:
    """A copy of ``model`` and ``args`` in ``memory_format`` (unchanged objects for ``"contiguous"``)."""
    if memory_format != "channels_last":
        return model, tuple(args)
    model = deepcopy_module(model).to(memory_format=torch.channels_last)
    args = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)
    return model, args


def best_memory_format(original_in: Any, args: Sequence[Any], device: torch.device,
                       choosable: bool = True) -> Tuple[str, Dict[str, float]]:
    """The faster of NCHW and channels_last for the original model: ``original_in(fmt)`` gives ``(model, args,
    fn)`` in that layout, ``fn`` running it in the deploy runtime. CPU image models only (CUDA keeps the
    input's format); ``choosable=False`` (onnxruntime chooses its own layouts) keeps NCHW."""
    if not choosable or device.type != "cpu" or not any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
        return "contiguous", {}
    times = {}
    for fmt in ("contiguous", "channels_last"):
        _, a, fn = original_in(fmt)
        times[fmt] = time_fn(fn, a, device=device, reps=5, warmup=2, max_seconds=1.0)
    return min(times, key=times.get), times
