"""``dsrewrite.rewrite``: the one-call entry point (copy, trace or fall back, plan, rewrite, report)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn

from .errors import DsrewriteError, first_line
from .frontends.conv_modules import deepcopy_module
from .frontends.fx import trace
from .frontends.swap import rewrite_untraceable
from .fx_pass import SeparableRewritePass
from .measure import count_params, eval_mode, input_device, time_models
from .modules import BACKENDS
from .pipeline import Decision, Selector
from .policy import RankArg, check_rank
from .selfcheck import check_runs
from .report import Report

__all__ = ["rewrite", "RewriteResult", "as_args"]


@dataclass
class RewriteResult:
    """``model``: the rewritten model (a ``GraphModule`` on the fx route); ``report``: what changed."""

    model: nn.Module
    report: Report
    decisions: Optional[List[Decision]] = None

    def __iter__(self):  # allows ``model, report = rewrite(...)``
        return iter((self.model, self.report))


def as_args(example_inputs: Any) -> tuple:
    """Positional inputs: a tuple is taken as the args, anything else (a tensor, a list) as one arg."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def rewrite(model: nn.Module, example_inputs: Any, *, rank: RankArg = "auto", include: Selector = None,
            exclude: Selector = None, inplace: bool = False, backend: str = "auto",
            measure_time: bool = True, progress: bool = False, name: Optional[str] = None,
            target_flops: Optional[float] = None, target_params: Optional[float] = None,
            target_latency: Optional[float] = None, energy: Optional[float] = None,
            calibration: Any = None, device: Any = None, memory_format: str = "auto",
            latency_cache: Optional[str] = None, ragged: bool = False) -> RewriteResult:
    """Replace the standard convs of ``model`` by low-rank depthwise-separable pairs.

    Args:
        model: an ``nn.Module``; traced with ``torch.fx`` (the fx route) or, if it cannot be traced,
            rewritten through its traceable sub-modules and in-place module swaps (the fallback route).
        example_inputs: positional inputs for one forward (a tuple of args, or a single tensor/list);
            they give output shapes for FLOPs and must run through the model.
        rank: int (same for every layer, clamped to each layer's full rank), ``"auto"`` (default: half of
            each layer's FLOP break-even rank, skipping layers that cannot save) or ``"full"`` (exact).
        include / exclude: glob patterns over conv names (``"layer4.*"``) or a callable ``name -> bool``.
        inplace: allow changing ``model`` itself (its conv modules are swapped); otherwise it is untouched.
        backend: how the new pairs run: ``"auto"``, ``"triton"`` or ``"torch"``.
        measure_time: time the original and rewritten model on ``example_inputs`` (median wall time).
        progress: show progress bars.
        name: model name for the report.
        target_flops / target_params: keep at most this fraction of the whole model's FLOPs / parameters;
            ranks are allocated per layer for the least total error (:mod:`dsrewrite.budget`).
        target_latency: keep at most this fraction of the model's measured time; layers are timed on
            ``device`` (original vs separable at candidate ranks, cached) and slower ones left alone.
        energy: per layer, the smallest rank keeping this fraction of its spectral energy.
        calibration: a tensor (split into batches) or an iterable of input batches. Ranks under a budget are
            then allocated on whitened spectra, and every rewritten layer is refitted in execution order on
            the activations of the rewritten network before it (:mod:`dsrewrite.calibrate`).
        device: where ``target_latency`` times layers (default: the inputs' device).
        memory_format: layout for latency planning: ``"auto"`` (on CPU the faster of NCHW and channels_last
            for the original model), ``"contiguous"`` or ``"channels_last"``.
        latency_cache: JSON file caching layer timings across runs.
        ragged: give each input channel its own rank, from its own spectrum: the same ``Cin*rank`` depthwise
            filters (same cost) spread where they reduce the error most; never a worse fit than uniform ranks.
            The depthwise conv reads its inputs through a channel index. With ``calibration`` the split
            follows the whitened (output-energy) spectra.

    Returns:
        :class:`RewriteResult` with ``.model`` and ``.report``.
    """
    if not isinstance(model, nn.Module):
        raise DsrewriteError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise DsrewriteError("TorchScript modules cannot be rewritten: pass the eager nn.Module (before torch.jit.script/trace)")
    rank = check_rank(rank)
    if backend not in BACKENDS:
        raise DsrewriteError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    args = as_args(example_inputs)
    plan = _Planning(model, args, rank=rank, backend=backend, target_flops=target_flops,
                     target_params=target_params, target_latency=target_latency, energy=energy,
                     calibration=calibration, device=device, memory_format=memory_format,
                     latency_cache=latency_cache, inplace=inplace, progress=progress, ragged=ragged)
    work = model if inplace else deepcopy_module(model)

    notes: List[str] = list(plan.notes)
    try:
        gm = trace(work, len(args))
    except Exception as e:  # noqa: BLE001 - any tracing failure sends us to the fallback route
        gm, trace_error = None, "symbolic_trace failed on the whole model (" + first_line(e, 160, typed=True) + ")"

    if gm is not None:
        gm.training = work.training
        p = SeparableRewritePass(args, rank, include, exclude, backend, mirror=model if inplace else None,
                                 progress=progress, plan_kwargs=plan.kwargs)
        try:
            p(gm)
            new_model, decisions, flops_before, route = gm, p.decisions, p.flops_before, "fx"
            notes.append(p.self_check_note)
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            if p.decisions:  # it failed after planning: not a tracing limit
                raise DsrewriteError(f"rewriting the traced graph failed: {first_line(e, typed=True)}") from None
            # the traced graph does not run where the model does (e.g. control flow on an input): fall back
            gm, trace_error = None, "the traced graph does not run on the example inputs (" + first_line(e, 160, typed=True) + ")"
    if gm is None:
        try:
            new_model, decisions, flops_before, notes = rewrite_untraceable(
                work, args, rank=rank, include=include, exclude=exclude, backend=backend, progress=progress,
                **plan.kwargs)
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"example inputs do not run through the model: {first_line(e, typed=True)}") from None
        route = "fx-submodules+module-swap"
        notes.insert(0, trace_error)

    rewritten = [(d.site.spec.name, d.module) for d in decisions if d.module is not None]
    if rewritten:
        with eval_mode(new_model):
            check_runs(new_model, args, rewritten)
    if plan.batches is not None:
        try:
            notes.append(plan.calibrate(new_model, decisions))
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"calibration batches do not run through the model: {first_line(e, typed=True)}") from None

    layers = [d.report for d in decisions]
    saved = sum(L.flops_before - L.flops_after for L in layers if L.rewritten)
    report = Report(
        layers=layers, model=name or type(model).__name__, route=route,
        input_shapes=[list(a.shape) if isinstance(a, torch.Tensor) else [type(a).__name__] for a in args],
        params_before=count_params(model), params_after=count_params(new_model),
        flops_before=flops_before, flops_after=flops_before - saved, notes=notes,
    )
    report.add_outcome_notes()
    timed = [L for L in layers if L.time_before_ms is not None]
    planned = None
    if timed:
        b, a = sum(L.time_before_ms for L in timed), sum(L.time_after_ms for L in timed)
        total = plan.kwargs["total_time_ms"]
        planned = (total - (b - a)) / total if total else None
        report.notes.append(f"layer timings ({plan.timer.memory_format}): {len(timed)} convs {b:.2f} ms -> {a:.2f} ms "
                            f"(whole model before: {total:.2f} ms)")
    if measure_time:
        if plan.timer is not None and plan.timer.memory_format == "channels_last":
            from .latency import to_format

            m0, a0 = to_format(plan.teacher, args, "channels_last")
            m1, _ = to_format(new_model, args, "channels_last")
            time_models(m0, m1, a0, report)
        else:
            time_models(model if plan.teacher is None else plan.teacher, new_model, args, report)
        ratio = report.time_ratio
        if target_latency is not None and planned is not None and ratio is not None and ratio > target_latency:
            report.notes.append(
                f"target_latency={target_latency:g} not met on the whole model: measured {ratio:.2f}x against "
                f"{planned:.2f}x planned from layer timings (layers are timed alone, on random inputs)")
    if plan.timer is not None:
        plan.timer.save()
    return RewriteResult(new_model, report, decisions)


class _Planning:
    """What ``rewrite`` needs beyond a rank: budget arguments, layer timer, calibration data and statistics."""

    def __init__(self, model: nn.Module, args: tuple, *, rank, backend: str, target_flops, target_params,
                 target_latency, energy, calibration, device, memory_format: str, latency_cache,
                 inplace: bool, progress: bool, ragged: bool = False) -> None:
        from .pipeline import budget_args

        self.notes: List[str] = []
        self.timer = None
        self.batches = None
        self.progress = progress
        self.n_inputs = len(args)
        from .latency import MEMORY_FORMATS

        if memory_format not in MEMORY_FORMATS:
            raise DsrewriteError(f"memory_format must be 'auto', 'contiguous' or 'channels_last', got {memory_format!r}")
        budget = budget_args(rank, target_flops, target_params, target_latency, energy, timer=True)
        self.teacher: Optional[nn.Module] = None
        if calibration is not None:
            from .calibrate import as_batches

            self.batches = as_batches(calibration, example_args=args)
            # the original model gives the true outputs; keep a copy when the user's model will be changed
            self.teacher = deepcopy_module(model) if inplace else model
        kw: dict = {"ragged": True} if ragged else {}
        if budget is not None:
            kw[budget[0]] = budget[1]
        if budget is not None and budget[0] == "target_latency":
            from .latency import LayerTimer, best_memory_format

            dev = torch.device(device) if device is not None else input_device(args)
            ref = model if self.teacher is None else self.teacher
            p0 = next(ref.parameters(), None)
            if p0 is not None and p0.device != dev:
                ref = deepcopy_module(ref).to(dev)
                args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
            fmt = memory_format
            if fmt == "auto":
                with eval_mode(ref):  # timing must not update the user's BatchNorm statistics
                    fmt, times = best_memory_format(ref, args, dev)
                if times:
                    self.notes.append("latency planned in " + fmt + " (original model: " + ", ".join(
                        f"{k} {v:.2f} ms" for k, v in times.items()) + ")" + (
                        "; run the model and inputs with .to(memory_format=torch.channels_last)"
                        if fmt == "channels_last" else ""))
            self.timer = LayerTimer(dev, p0.dtype if p0 is not None else torch.float32, backend, fmt,
                                    cache_file=latency_cache, ragged=ragged)
            with eval_mode(ref):
                kw["total_time_ms"] = self.timer.model_ms(ref, args)
            kw["timer"] = self.timer
            if self.teacher is None:
                self.teacher = model
        if self.batches is not None and budget is not None and budget[0] != "energy":
            from .calibrate import collect_patch_stats

            names = [n for n, m in self.teacher.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
            with eval_mode(self.teacher):
                try:
                    kw["stats"] = collect_patch_stats(self.teacher, self.batches, names, self.n_inputs)
                except DsrewriteError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise DsrewriteError(f"calibration batches do not run through the model: {first_line(e, typed=True)}") from None
        self.kwargs = kw

    def calibrate(self, new_model: nn.Module, decisions: List[Decision]) -> str:
        """Refit the rewritten layers sequentially; fill ``calib_error_*`` in the reports; return a note."""
        from .calibrate import calibrate_sequential

        layers, plain = _calib_layers(self.teacher, decisions)
        with eval_mode(new_model), eval_mode(self.teacher):
            results = calibrate_sequential(new_model, self.teacher, layers, self.batches,
                                           n_inputs=self.n_inputs, progress=self.progress)
        by_name = {d.report.name: d.report for d in decisions}
        methods: dict = {}
        for name, res in results.items():
            rep = by_name[name]
            rep.calib_error_before, rep.calib_error_after = res.error_before, res.error_after
            methods[res.method] = methods.get(res.method, 0) + 1
        kept = (f"; {len(plain)} layer(s) with dynamic 'same' padding keep their plain SVD factors "
                f"({', '.join(plain[:4])}{', ...' if len(plain) > 4 else ''})") if plain else ""
        if not results:
            return "calibration: no rewritten layer ran on the calibration data" + kept
        before = sum(r.error_before for r in results.values()) / len(results)
        after = sum(r.error_after for r in results.values()) / len(results)
        how = ", ".join(f"{k} {v}" for k, v in sorted(methods.items()))
        return (f"calibrated {len(results)} layer(s) on {len(self.batches)} batch(es): mean relative output "
                f"error {before:.4f} (plain SVD) -> {after:.4f} ({how})" + kept)


def _calib_layers(teacher: nn.Module, decisions: List[Decision]) -> tuple:
    """The separable modules the backends installed, each with its original conv (and the teacher's conv),
    and the names of the layers the refit cannot take (dynamic padding)."""
    from .calibrate import CalibLayer

    layers, plain = [], []
    for d in decisions:
        if d.module is None:
            continue
        spec, h = d.site.spec, d.site.handle
        if h.conv_args.get("dynamic_same"):  # the refit unfolds patches with static padding
            plain.append(spec.name)
            continue
        if h.kind == "function" or spec.extra.get("folded"):  # a dense conv rebuilt from the effective weight
            a = h.conv_args
            cls = nn.Conv1d if spec.spatial_dims == 1 else nn.Conv2d
            w = d.site.weight.detach()
            conv = cls(spec.in_channels, spec.out_channels, spec.kernel, stride=a.get("stride", 1),
                       padding=a.get("padding", 0), dilation=a.get("dilation", 1), bias=d.site.bias is not None,
                       padding_mode=a.get("padding_mode", "zeros"), device=w.device, dtype=w.dtype)
            with torch.no_grad():
                conv.weight.copy_(w)
                if d.site.bias is not None:
                    conv.bias.copy_(d.site.bias.detach())
            t = None
        else:
            conv = h.module
            try:
                t = teacher.get_submodule(spec.name)
                if not isinstance(t, (nn.Conv1d, nn.Conv2d)) or t.weight.shape != conv.weight.shape:
                    t = None
            except AttributeError:
                t = None
        layers.append(CalibLayer(spec.name, d.module, conv, t, max(spec.calls, 1)))
    return layers, plain
