"""Measurements on the real model: whole-model FLOPs (FlopCounterMode), parameter counts, wall time."""
from __future__ import annotations

import contextlib
import os
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["seeded", "tensors_of", "outputs_differ", "count_params", "count_flops", "time_call", "time_side_by_side", "compare",
           "Comparison", "eval_mode", "input_device"]


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode and restore every submodule's training flag afterwards (BN stats stay untouched)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run with the random generators seeded (CPU and the current CUDA device) and put their state back after:
    two runs of a forward that draws random numbers draw the same ones."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def tensors_of(value: Any) -> List[torch.Tensor]:
    """The tensors of a (nested) model output, in order: tuples, lists, dicts (``ModelOutput`` too), dataclasses."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in tensors_of(getattr(value, f.name))]
    return []


def outputs_differ(a: Any, b: Any, tol: float = 1e-5) -> Optional[str]:
    """Why two model outputs are not the same computation's (structure, shape, dtype, or a relative error above
    ``tol``; 16-bit outputs allow 1e-2), or ``None``."""
    ta, tb = tensors_of(a), tensors_of(b)
    if len(ta) != len(tb):
        return f"{len(tb)} output tensors instead of {len(ta)}"
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {tuple(y.shape)} {y.dtype} instead of {tuple(x.shape)} {x.dtype}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i} differs"
            continue
        x64, y64 = x.detach().double(), y.detach().double()
        if not torch.equal(torch.isfinite(x64), torch.isfinite(y64)):
            return f"output {i}: non-finite values differ"
        x64, y64 = torch.nan_to_num(x64), torch.nan_to_num(y64)
        err = float((x64 - y64).norm() / x64.norm().clamp_min(1e-30))
        if err > (1e-2 if x.dtype in (torch.float16, torch.bfloat16) else tol):
            return f"output {i}: relative error {err:.2g}"
    return None


def count_flops(fn: Callable[..., Any], args: Sequence[Any]) -> int:
    """FLOPs (2 per multiply-add) of one call, as ``FlopCounterMode`` counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def input_device(args: Sequence[Any]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return torch.device("cpu")


def time_call(fn: Callable[..., Any], args: Sequence[Any], *, warmup: int = 2, reps: int = 10,
              max_seconds: float = 5.0, device: Optional[torch.device] = None,
              reduce: Callable[[List[float]], float] = statistics.median, min_reps: int = 3) -> float:
    """``reduce`` (median by default) of the wall times of ``fn(*args)`` in milliseconds, CUDA-synchronised on
    GPU: up to ``reps`` timed calls, stopping after ``max_seconds`` once ``min_reps`` calls are in."""
    return reduce(_rounds([fn], args, warmup, reps, max_seconds, device, min_reps)[0])


def time_side_by_side(fns: Sequence[Callable[..., Any]], args: Sequence[Any], *, warmup: int = 1, reps: int = 5,
                      max_seconds: float = 0.5, device: Optional[torch.device] = None,
                      min_reps: int = 2) -> List[float]:
    """The fastest wall time (ms) of each of ``fns`` on ``args``, called in turn in every round, so drift on a
    shared machine hits all of them alike: up to ``reps`` rounds, stopping after ``max_seconds`` once
    ``min_reps`` rounds are in."""
    return [min(t) for t in _rounds(fns, args, warmup, reps, max_seconds, device, min_reps)]


def _rounds(fns: Sequence[Callable[..., Any]], args: Sequence[Any], warmup: int, reps: int, max_seconds: float,
            device: Optional[torch.device], min_reps: int) -> List[List[float]]:
    """Wall times (ms) of each of ``fns``, called in turn each round (CUDA-synchronised on GPU), after
    ``warmup`` untimed calls each; up to ``reps`` rounds, stopping after ``max_seconds`` once ``min_reps``
    rounds are in."""
    device = device or input_device(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: List[List[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            for _ in range(warmup):
                fn(*args)
        sync()
        start = time.perf_counter()
        for done in range(1, reps + 1):
            for fn, t in zip(fns, times):
                t0 = time.perf_counter()
                fn(*args)
                sync()
                t.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start > max_seconds and done >= min_reps:
                break
    return times


@dataclass
class Comparison:
    """Two callables timed in turn, round by round: the fastest time of each (ms), the ratio of those, and the
    noise: half the interquartile range of the per-round ratios (a ratio differing from 1 by less than that is
    not a measured difference)."""

    before_ms: float
    after_ms: float
    noise: float
    rounds: int
    median_ratio: Optional[float] = None  # the median of the per-round ratios: the robust central estimate
    load: Optional[float] = None  # the 1-minute load average per core while timing (CPU), when it could be read

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms if self.before_ms else float("nan")

    @property
    def central(self) -> float:
        """The ratio a decision should rest on: the median per-round ratio (the ratio of minimums when unknown)."""
        return self.median_ratio if self.median_ratio is not None else self.ratio

    @property
    def disturbed(self) -> bool:
        """The machine was busy (other runnable tasks on every core) or the rounds disagreed by more than 10%."""
        return (self.load is not None and self.load >= 1.0) or self.noise > NOISY * max(self.central, 1e-9)

    def words(self) -> str:
        """How noisy the timing was, for a report line."""
        load = f", {self.load:.1f} other runnable tasks per core" if self.load is not None else ""
        return (f"timing was disturbed ({self.rounds} interleaved rounds, per-round ratios +-{self.noise:.2f} "
                f"around a median of {self.central:.2f}x{load}): treat the time ratio as approximate")


NOISY = 0.1  # per-round ratios spread by more than this fraction of their median: a disturbed measurement


def _load_per_core() -> Optional[float]:
    """Other runnable tasks per core right now (``/proc/loadavg``'s running count, less this reader), where the
    system says it; the 1-minute load average lags by minutes, so it is only the fallback."""
    cores = max(os.cpu_count() or 1, 1)
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        return max(running - 1, 0) / cores
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0] / cores
    except (AttributeError, OSError):
        return None


def _compared(t0: List[float], t1: List[float], load: Optional[float]) -> Comparison:
    ratios = sorted(b / a for a, b in zip(t0, t1) if a > 0)
    noise = 0.0
    if len(ratios) >= 4:
        q = statistics.quantiles(ratios, n=4)
        noise = (q[2] - q[0]) / 2
    median = statistics.median(ratios) if ratios else None
    return Comparison(min(t0), min(t1), noise, len(t0), median, load)


def compare(before: Callable[..., Any], after: Callable[..., Any], args: Sequence[Any], *, warmup: int = 2,
            reps: int = 15, max_seconds: float = 6.0, min_reps: int = 5,
            device: Optional[torch.device] = None) -> Comparison:
    """Time ``before`` and ``after`` on ``args`` in interleaved rounds (drift on a shared machine hits both
    alike); the minimum of each (the statistic least moved by other processes) and the median per-round ratio.
    A disturbed measurement (busy machine, rounds that disagree) gets as many rounds again, once."""
    device = device or input_device(args)
    t0, t1 = _rounds([before, after], args, warmup, reps, max_seconds, device, min_reps)
    cpu = device.type == "cpu"
    c = _compared(t0, t1, _load_per_core() if cpu else None)
    if c.disturbed:
        m0, m1 = _rounds([before, after], args, 0, reps, max_seconds, device, min_reps)
        c = _compared(t0 + m0, t1 + m1, _load_per_core() if cpu else None)
    return c


def note_disturbed(report: Any, c: Comparison) -> None:
    """Say on the report that its timing was disturbed (a busy machine, rounds that disagree), once."""
    if c.disturbed:
        report.notes = [n for n in report.notes if not n.startswith("timing was disturbed")] + [c.words()]
