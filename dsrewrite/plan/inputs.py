"""What a rewrite needs beyond a rank, shared by ``rewrite()`` and the torch.compile backend: the budget
arguments for the planner, the layer timer and its memory format (latency budgets), the calibration batches
and patch statistics, the teacher (the original model, for calibration targets and timing), and the
sequential calibration of the rewritten layers once a backend has installed them."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..calib.run import CalibLayer, as_batches, calibrate_sequential, collect_patch_stats
from ..calib.solve import summary
from ..config import RewriteConfig
from ..errors import DsrewriteError, first_line
from ..frontends.conv_modules import deepcopy_module
from ..ir import LINEAR
from ..timing.layers import best_memory_format, time_fn, to_format
from ..timing.measure import eval_mode, input_device
from ..timing.runtimes import get_runtime
from .planner import Decision, PlanInputs, Totals

__all__ = ["Planning", "calib_layers"]


class Planning:
    """What ``rewrite`` needs beyond a rank: budget arguments, layer timer, calibration data and statistics."""

    def __init__(self, model: nn.Module, args: tuple, cfg: RewriteConfig) -> None:
        self.notes: List[str] = []
        self.timer = None
        self.batches = None
        self.progress = cfg.progress
        self.n_inputs = len(args)
        budget = cfg.chosen_budget()
        inplace, ragged, device = cfg.inplace, cfg.ragged, cfg.device
        self.teacher: Optional[nn.Module] = None
        if cfg.calibration is not None:
            self.batches = as_batches(cfg.calibration, example_args=args)
            # the original model gives the true outputs; keep a copy when the user's model will be changed
            self.teacher = deepcopy_module(model) if inplace else model
        total_time_ms, stats = None, None
        self.runtime = get_runtime(cfg.runtime, ort_threads=cfg.ort_threads, ort_optimization=cfg.ort_optimization,
                                   ort_provider=cfg.ort_provider)
        self.memory_format: Optional[str] = None  # the layout models are timed in (None: as given)
        self._originals: dict = {}  # memory format -> (original in it, args in it, what runs it in the runtime)
        if budget is not None and budget[0] == "target_latency":
            dev = torch.device(device) if device is not None else input_device(args)
            ref = model if self.teacher is None else self.teacher
            p0 = next(ref.parameters(), None)
            if p0 is not None and p0.device != dev:
                ref = deepcopy_module(ref).to(dev)
                args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
            fmt = cfg.memory_format
            with eval_mode(ref):  # timing must not update the user's BatchNorm statistics
                if fmt == "auto":
                    fmt, times = best_memory_format(lambda f: self.original_in(ref, args, f), args, dev,
                                                    self.runtime.memory_formats)
                    if times:
                        self.notes.append(f"latency planned in {fmt} ({self.runtime.label(None)}; original model: "
                                          + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()) + ")")
                self.memory_format = fmt
                self.timer = self.runtime.layer_timer(dev, p0.dtype if p0 is not None else torch.float32,
                                                      cfg.backend, fmt, cfg.latency_cache, ragged)
                _, a, fn = self.original_in(ref, args, fmt)
                total_time_ms = time_fn(fn, a, device=dev, reps=7, warmup=2, max_seconds=2.0)
            if self.teacher is None:
                self.teacher = model
        if self.batches is not None and budget is not None and budget[0] != "energy":
            names = [n for n, m in self.teacher.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
            with eval_mode(self.teacher):
                try:
                    stats = collect_patch_stats(self.teacher, self.batches, names, self.n_inputs,
                                                kinds=cfg.layer_kinds())
                except DsrewriteError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise DsrewriteError(f"calibration batches do not run through the model: {first_line(e, typed=True)}") from None
        self.inputs = PlanInputs.from_config(cfg, totals=Totals(time_ms=total_time_ms), timer=self.timer, stats=stats)

    def original_in(self, model: nn.Module, args: tuple, memory_format: str) -> tuple:
        """``(model, args, fn)``: the original in ``memory_format`` (a copy for channels_last), its inputs in it,
        and what runs it in the runtime, made once per format (a compiled or exported original is reused by
        every whole-model timing)."""
        if memory_format not in self._originals:
            m, a = to_format(model, args, memory_format)
            self._originals[memory_format] = (m, a, self.runtime.prepare(m, a))
        return self._originals[memory_format]

    def calibrate(self, new_model: nn.Module, decisions: List[Decision]) -> str:
        """Refit the rewritten layers sequentially; fill ``calib_error_*`` in the reports; return a note."""
        layers, plain = calib_layers(self.teacher, decisions)
        with eval_mode(new_model), eval_mode(self.teacher):
            results = calibrate_sequential(new_model, self.teacher, layers, self.batches,
                                           n_inputs=self.n_inputs, progress=self.progress)
        by_name = {d.report.name: d for d in decisions}
        for name, res in results.items():
            rep = by_name[name].report
            rep.calib_error_before, rep.calib_error_after = res.error_before, res.error_after
            by_name[name].calibrated = True
        kept = (f"; {len(plain)} layer(s) with dynamic 'same' padding keep their plain SVD factors "
                f"({', '.join(plain[:4])}{', ...' if len(plain) > 4 else ''})") if plain else ""
        if not results:
            return "calibration: no rewritten layer ran on the calibration data" + kept
        return (f"calibrated {len(results)} layer(s) on {len(self.batches)} batch(es): "
                f"{summary(results.values())}" + kept)


def calib_layers(teacher: nn.Module, decisions: List[Decision]) -> tuple:
    """The pair modules the backends installed (separable and low-rank), each with its original layer (and the
    teacher's layer of that name), and the names of the layers the refit cannot take (dynamic padding)."""
    layers, plain = [], []
    for d in decisions:
        if d.module is None:
            continue
        spec, h = d.site.spec, d.site.handle
        if h.conv_args.get("dynamic_same"):  # the refit unfolds patches with static padding
            plain.append(spec.name)
            continue
        if (h.kind == "function" or spec.extra.get("folded")  # a dense layer rebuilt from the effective weight
                or not isinstance(h.module, (nn.Conv1d, nn.Conv2d, nn.Linear))):  # or from a registered module's
            conv, t = _dense_layer(d), None
        else:
            conv = h.module
            try:
                t = teacher.get_submodule(spec.name)
                if not isinstance(t, (nn.Conv1d, nn.Conv2d, nn.Linear)) or t.weight.shape != conv.weight.shape:
                    t = None
            except AttributeError:
                t = None
        layers.append(CalibLayer(spec.name, d.module, conv, t, max(spec.calls, 1)))
    return layers, plain


def _dense_layer(d: Decision) -> nn.Module:
    """The original layer of a functional or folded site, rebuilt from its effective weight and settings: an
    ``nn.Linear`` for a linear layer, else an ``nn.Conv1d/2d``."""
    spec, a = d.site.spec, d.site.handle.conv_args
    w = d.site.weight.detach()
    if spec.kind == LINEAR:
        layer = nn.Linear(spec.in_channels, spec.out_channels, bias=d.site.bias is not None, device=w.device,
                          dtype=w.dtype)
    else:
        cls = nn.Conv1d if spec.spatial_dims == 1 else nn.Conv2d
        layer = cls(spec.in_channels, spec.out_channels, spec.kernel, stride=a.get("stride", 1),
                    padding=a.get("padding", 0), dilation=a.get("dilation", 1), bias=d.site.bias is not None,
                    padding_mode=a.get("padding_mode", "zeros"), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape))
        if d.site.bias is not None:
            layer.bias.copy_(d.site.bias.detach().reshape(-1))
    return layer
