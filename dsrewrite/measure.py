"""Measurements on the real model: whole-model FLOPs (FlopCounterMode), parameter counts, wall time."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_flops", "time_call", "time_side_by_side", "time_models", "eval_mode",
           "input_device"]


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


def time_models(original: nn.Module, new: nn.Module, args: Sequence[Any], report: Any) -> None:
    """Time ``original`` and ``new`` side by side on ``args`` (eval mode) and fill the report's time fields."""
    device = input_device(args)
    with eval_mode(original), eval_mode(new):
        before = time_call(original, args)
        after = time_call(new, args)
        before = min(before, time_call(original, args))  # second look at the original: less warm-up bias
    report.time_before_ms, report.time_after_ms = before, after
    report.time_device = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    backends = {getattr(m, "backend", None) for m in new.modules() if hasattr(m, "rank") and hasattr(m, "pointwise")}
    backends.discard(None)
    report.time_backend = "backend=" + ",".join(sorted(backends)) if backends else None
