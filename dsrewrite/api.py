"""``dsrewrite.rewrite``: the one-call entry point (copy, trace or fall back, plan, rewrite, report)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .config import RewriteConfig
from .errors import DsrewriteError, RewrittenModelFails, first_line, raise_if_out_of_memory
from .frontends.conv_modules import deepcopy_module, weight_states
from .frontends.fx import trace
from .frontends.swap import breaking_swap, rewrite_untraceable
from .fx_pass import SeparableRewritePass
from .timing.layers import to_format
from .timing.loop import Attempt, attempt_from_layers, latency_loop
from .timing.measure import count_params, eval_mode, input_device, outputs_differ, seeded
from .timing.runtimes import time_models
from .plan.planner import Decision, PlanInputs, Selector, layer_report, matcher
from .plan.balance import balance_pairs, balanced_note
from .plan.planfile import Plan, weight_shape
from .plan.inputs import Planning
from .report import Report, build_report
from .plan.selfcheck import check_runs
from .frontends.snapshot import ModelSnapshot

__all__ = ["rewrite", "apply_plan", "RewriteResult", "as_args", "REPLAY_OPTIONS"]


@dataclass
class RewriteResult:
    """``model``: the rewritten model (a ``GraphModule`` on the fx route); ``report``: what changed;
    ``memory_format``: the layout latency planning timed it in (``"channels_last"`` or ``"contiguous"``;
    ``None`` without ``target_latency``), the one to deploy it in; ``plan``: what was decided per layer, to save
    and replay (:class:`~dsrewrite.plan.Plan`, :func:`~dsrewrite.apply_plan`)."""

    model: nn.Module
    report: Report
    decisions: Optional[List[Decision]] = None
    memory_format: Optional[str] = None
    plan: Optional[Plan] = None

    def __iter__(self):  # allows ``model, report = rewrite(...)``
        return iter((self.model, self.report))


def as_args(example_inputs: Any) -> tuple:
    """Positional inputs: a tuple is taken as the args, anything else (a tensor, a list) as one arg."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def rewrite(model: nn.Module, example_inputs: Any, config: Optional[RewriteConfig] = None,
            **options: Any) -> RewriteResult:
    """Replace the standard convs of ``model`` by low-rank depthwise-separable pairs, and (``kinds``) its 1x1 convs
    and linear layers by low-rank pairs.

    The options are a :class:`~dsrewrite.config.RewriteConfig` (``config``) and/or its fields as keyword
    arguments (applied on top of ``config``):

    Args:
        model: an ``nn.Module``; traced with ``torch.fx`` (the fx route) or, if it cannot be traced,
            rewritten through its traceable sub-modules and in-place module swaps (the fallback route).
        example_inputs: positional inputs for one forward (a tuple of args, or a single tensor/list);
            they give output shapes for FLOPs and must run through the model.
        rank: int (same for every layer, clamped to each layer's full rank), ``"auto"`` (default: half of
            each layer's FLOP break-even rank, skipping layers that cannot save) or ``"full"`` (exact).
        kinds: which layers to rewrite: ``"kxk"`` (KxK convs, as depthwise-separable pairs), ``"pointwise"``
            (1x1 convs) and ``"linear"`` (``nn.Linear``, ``F.linear``), both as low-rank pairs (a ``k``-wide
            reduction, then the expansion); a list, or ``"all"``. Default: all kinds under a budget (one
            allocation over every layer), ``"kxk"`` with ``rank`` (a rank means a different thing per kind).
        include / exclude: glob patterns over conv names (``"layer4.*"``) or a callable ``name -> bool``.
        inplace: allow changing ``model`` itself (its conv modules are swapped); otherwise it is untouched.
        backend: how the new pairs run: ``"auto"``, ``"triton"`` or ``"torch"``.
        measure_time: time the original and rewritten model on ``example_inputs`` side by side (fastest of
            interleaved rounds, with the noise); ``False`` also turns off ``target_latency``'s whole-model check.
        runtime: what models are timed in, for ``target_latency`` and the report: ``"eager"`` (default),
            ``"inductor"`` (``torch.compile``: layers and whole models compiled before timing) or
            ``"onnxruntime"`` (exported to ONNX; sessions set by ``ort_threads``, ``ort_optimization``,
            ``ort_provider``). Deploy the model the way it was timed: the report says how.
        progress: show progress bars.
        name: model name for the report.
        target_flops / target_params: keep at most this fraction of the whole model's FLOPs / parameters;
            ranks are allocated per layer for the least total error (:mod:`dsrewrite.plan.allocate`).
        target_latency: keep at most this fraction of the model's measured time; layers are timed on
            ``device`` (original vs separable at candidate ranks, cached) and slower ones left alone. The plan
            is then checked on the whole model and re-planned while it misses (:mod:`dsrewrite.timing.loop`,
            up to 3 plans, listed in ``report.latency_rounds``); a target no plan reaches is refused.
        energy: per layer, the smallest rank keeping this fraction of its spectral energy.
        calibration: a tensor (split into batches) or an iterable of input batches. Ranks under a budget are
            then allocated on whitened spectra, and every rewritten layer is refitted in execution order on
            the activations of the rewritten network before it (:mod:`dsrewrite.calib.solve`).
        device: where ``target_latency`` times layers (default: the inputs' device).
        memory_format: layout for latency planning: ``"auto"`` (on CPU the faster of NCHW and channels_last
            for the original model), ``"contiguous"`` or ``"channels_last"``.
        latency_cache: JSON file caching layer timings across runs.
        ragged: give each input channel its own rank, from its own spectrum: the same ``Cin*rank`` depthwise
            filters (same cost) spread where they reduce the error most; never a worse fit than uniform ranks.
            The depthwise conv reads its inputs through a channel index. With ``calibration`` the split
            follows the whitened (output-energy) spectra.
        int8_friendly: rescale each pair's depthwise filters (reductions) and pointwise columns (expansions) to
            equal ranges (:mod:`dsrewrite.plan.balance`), so the pairs lose less to int8 quantization; the float model
            is unchanged in value. Quantize the result with :func:`dsrewrite.backends.int8.quantize_pt2e`.

    Returns:
        :class:`RewriteResult` with ``.model`` and ``.report``.
    """
    if not isinstance(model, nn.Module):
        raise DsrewriteError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise DsrewriteError("TorchScript modules cannot be rewritten: pass the eager nn.Module (before torch.jit.script/trace)")
    cfg = RewriteConfig.build(config, options, route="torch", words=" for dsrewrite.rewrite")
    args = as_args(example_inputs)
    if not cfg.inplace:
        return _rewrite(model, args, cfg)
    before = ModelSnapshot(model)  # inplace: succeed, or leave the model exactly as it was
    try:
        return _rewrite(model, args, cfg)
    except BaseException:
        before.restore()
        raise


def _rewrite(model: nn.Module, args: tuple, cfg: RewriteConfig) -> RewriteResult:
    """:func:`rewrite` after its checks: plan, build (or the latency closed loop), calibrate, report."""
    plan = Planning(model, args, cfg)
    closed = plan.timer is not None and cfg.target_latency is not None and cfg.measure_time is not False
    dev = input_device(args)
    # the whole model runs where its inputs are (onnxruntime: on the CPU, whatever their device)
    elsewhere = closed and plan.runtime.name != "onnxruntime" and not _same_device(plan.timer.device, dev)
    if elsewhere:  # the whole model runs where its inputs are: it cannot check layer timings made elsewhere
        closed = False
        plan.notes.append(f"target_latency planned from layer timings on {plan.timer.device}; the whole model "
                          f"was not checked there (the inputs are on {input_device(args)})")
    if not closed:
        built = _build(model, args, cfg, plan, inplace=cfg.inplace)
        if plan.batches is not None:
            built.calibrate(plan)
        report = built.report(model, cfg, plan)
        if cfg.measure_time is not False and not elsewhere:
            _measure(model, built.model, args, plan, report)
        elif plan.timer is not None and not elsewhere:
            report.notes.append("target_latency not checked on the whole model (measure_time=False)")
    else:
        try:
            built, report = _closed_loop(model, args, cfg, plan)
        finally:  # layer timings are worth keeping even when the target is refused
            plan.timer.save()
    if plan.timer is not None:
        plan.timer.save()
    if cfg.int8_friendly:  # after calibration, which refits the pointwise weights
        pairs = {id(d.module): d.module for d in built.decisions if d.rewritten and d.module is not None}
        report.notes.append(balanced_note(balance_pairs(pairs.values())))
    kept = Plan.from_decisions(built.decisions, route=built.route, config=cfg, memory_format=plan.memory_format,
                               runtime=plan.runtime.name)
    return RewriteResult(built.model, report, built.decisions, plan.memory_format, kept)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when one of them names no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


# ------------------------------------------------------------------------------------------ one plan, built
@dataclass
class _Built:
    """One plan of the model, written back: the new model, its decisions, route, notes and FLOPs before."""

    model: nn.Module
    decisions: List[Decision]
    route: str
    notes: List[str]
    flops_before: Any
    args: tuple
    params_before: int = 0  # counted before the pass touched anything (inplace=True changes the model)

    def calibrate(self, plan: Planning) -> str:
        """Refit the rewritten layers on the calibration batches; the note is added to ``notes`` and returned."""
        try:
            self.notes.append(plan.calibrate(self.model, self.decisions))
            return self.notes[-1]
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"calibration batches do not run through the model: {first_line(e, typed=True)}") from None

    def report(self, model: nn.Module, cfg: RewriteConfig, plan: Planning) -> Report:
        layers = [d.report for d in self.decisions]
        report = build_report(
            layers, model=cfg.name or type(model).__name__, route=self.route,
            input_shapes=[list(a.shape) if isinstance(a, torch.Tensor) else [type(a).__name__] for a in self.args],
            params_before=self.params_before, params_after=count_params(self.model),
            flops_before=self.flops_before, notes=self.notes)
        timed = [L for L in layers if L.time_before_ms is not None]
        if timed:
            b, a = sum(L.time_before_ms for L in timed), sum(L.time_after_ms for L in timed)
            report.notes.append(f"layer timings ({plan.runtime.label(plan.memory_format)}): {len(timed)} layers {b:.2f} ms -> "
                                f"{a:.2f} ms (whole model before: {plan.inputs.totals.time_ms:.2f} ms)")
        return report


def _build(model: nn.Module, args: tuple, cfg: RewriteConfig, plan: Planning, *, inplace: bool,
           inputs: Optional[PlanInputs] = None) -> _Built:
    """Trace (or fall back), plan with ``inputs`` (default ``plan.inputs``), write the plan back, check that it runs.

    The fx route is tried first; a model it cannot trace, whose traced graph does not run, or whose rewritten
    graph fails its checks goes to the module-swap route (the report says why). On that route a layer whose
    pair makes the model fail is left dense with the error as its reason, and the rest is rebuilt.
    """
    params_before = count_params(model)
    work = model if inplace else deepcopy_module(model)
    notes: List[str] = list(plan.notes)  # the planner's own notes (a budget not met, best effort) are added here
    inputs = inputs if inputs is not None else plan.inputs
    # a forward traced by fx may set attributes to proxies (``self.mean = self.mean.type_as(x)``), and the fx pass
    # mirrors its swaps into an in-place model: the module-swap route starts from the model as it was (structure
    # only: tracing runs on proxies; a failed in-place rewrite gets its values back from rewrite()'s snapshot)
    undo = ModelSnapshot(work, values=False)
    built = None
    try:
        gm = trace(work, len(args))
    except Exception as e:  # noqa: BLE001 - any tracing failure sends us to the fallback route
        gm, why = None, "symbolic_trace failed on the whole model (" + first_line(e, 160, typed=True, cut_mark="...") + ")"
    undo.restore()
    if gm is not None:
        reference, why = _reference(work, args)
        if why is None:
            built, why = _fx_route(gm, model if inplace else None, args, cfg, inputs, notes, reference)
        del gm, reference
        if built is None:
            undo.restore()
    if built is None:
        built = _swap_route(work, args, cfg, inputs, notes, why, undo)
    built.params_before = params_before
    return built


def _reference(model: nn.Module, args: tuple):
    """``(the model's own output on args, None)``, or ``(None, why a traced graph of it cannot stand for it)``: its
    forward assigns conv weights (which a graph would freeze at the values it was traced with)."""
    before = weight_states(model)
    try:
        with eval_mode(model), torch.no_grad(), seeded():
            out = model(*args)
    except Exception as e:  # noqa: BLE001
        raise_if_out_of_memory(e)
        raise DsrewriteError(f"example inputs do not run through the model: {first_line(e, typed=True)}") from None
    after = weight_states(model)
    names = {m: q for q, m in model.named_modules()}
    assigned = [names[m] for m, state in before.items() if after.get(m) != state]
    if assigned:
        more = ", ..." if len(assigned) > 3 else ""
        return None, (f"the model's forward assigns conv weights ({', '.join(assigned[:3])}{more}), which a traced "
                      "graph would freeze")
    return out, None


def _fx_route(gm, mirror: Optional[nn.Module], args: tuple, cfg: RewriteConfig, inputs: PlanInputs,
              notes: List[str], reference: Any):
    """``(built, None)`` on the fx route, or ``(None, why the module-swap route must do it)``. ``reference``: the
    model's own output, which the traced graph must reproduce before it is trusted."""
    gm.training = (mirror or gm).training
    p = SeparableRewritePass(args, inputs=inputs, backend=cfg.backend, mirror=mirror, notes=notes)
    try:
        p(gm)
    except DsrewriteError:
        raise
    except Exception as e:  # noqa: BLE001
        raise_if_out_of_memory(e)
        what = ("the rewritten graph fails its checks" if p.decisions  # it failed after planning: the graph
                else "the traced graph does not run on the example inputs")  # e.g. control flow on an input
        return None, f"{what} ({first_line(e, 160, typed=True, cut_mark='...')})"
    differs = outputs_differ(reference, p.traced_output)
    p.traced_output = None
    if differs:
        return None, f"the traced graph does not reproduce the model ({differs})"
    rewritten = [(d.site.spec.name, d.module) for d in p.decisions if d.module is not None]
    if rewritten:
        try:
            with eval_mode(gm):
                check_runs(gm, args, rewritten)
        except RewrittenModelFails as e:
            return None, f"the fx-rewritten graph does not run ({first_line(e, 200, cut_mark='...')})"
    return _Built(gm, p.decisions, "fx", notes + [p.self_check_note], p.flops_before, args), None


_MAX_LEFT_DENSE = 3  # layers the swap route leaves dense, one rebuild each, before it gives up


def _swap_route(work: nn.Module, args: tuple, cfg: RewriteConfig, inputs: PlanInputs, notes: List[str],
                why: str, undo: ModelSnapshot) -> _Built:
    """The module-swap route on ``work`` (rewritten in place, ``undo`` its structure before); rebuilt without a
    layer whose pair fails."""
    failed: Dict[str, str] = {}
    while True:
        exclude = _also_excluding(inputs.exclude, failed)
        try:
            new_model, decisions, flops_before, route_notes = rewrite_untraceable(
                work, args, inputs.replace(exclude=exclude), backend=cfg.backend, notes=notes)
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise_if_out_of_memory(e)
            raise DsrewriteError(f"example inputs do not run through the model: {first_line(e, typed=True)}") from None
        for d in decisions:
            if d.site.spec.name in failed:
                d.report = layer_report(d.site.spec, reason=failed[d.site.spec.name])
        rewritten = [(d.site.spec.name, d.module) for d in decisions if d.module is not None]
        try:
            if rewritten:
                with eval_mode(new_model):
                    check_runs(new_model, args, rewritten)
            break
        except RewrittenModelFails as e:
            # bisection names the swap that breaks the model; the last pair entered is only a guess, for the rest
            culprit = breaking_swap(new_model, args, decisions) or e.layer
            if culprit is None or culprit in failed or len(failed) >= _MAX_LEFT_DENSE:
                raise
            failed[culprit] = f"left dense: the model fails with this layer rewritten ({e.cause})"
            undo.restore()
    if failed:
        route_notes.append(f"{len(failed)} layer(s) left dense because the model fails with them rewritten: "
                           f"{', '.join(failed)}")
    return _Built(new_model, decisions, "fx-submodules+module-swap", [why] + notes + route_notes, flops_before, args)


def _also_excluding(exclude: Selector, names: Dict[str, str]) -> Selector:
    """``exclude`` plus the layer ``names``."""
    if not names:
        return exclude
    given = matcher(exclude, "exclude")
    return lambda name: name in names or bool(given and given(name))


def _measure(model: nn.Module, new_model: nn.Module, args: tuple, plan: Planning, report: Report) -> None:
    """Time the original (the teacher, when one was kept) and the rewritten model side by side, in the runtime
    and memory format latency planning chose."""
    original = model if plan.teacher is None else plan.teacher
    fmt = None
    prepared = None
    if plan.memory_format is not None:  # latency planning made the original in its format (and compiled it)
        original, args, prepared = plan.original_in(original, args, plan.memory_format)
        if plan.memory_format == "channels_last":
            new_model, _ = to_format(new_model, args, "channels_last")
            fmt = "channels_last"
    time_models(original, new_model, args, report, memory_format=fmt, runtime=plan.runtime, before=prepared)
    how = plan.runtime.how(fmt or ("NCHW" if plan.memory_format == "contiguous" else None))
    if how and how not in report.notes:
        report.notes.append(how)


# ------------------------------------------------------------------------------------------ closed loop
def _closed_loop(model: nn.Module, args: tuple, cfg: RewriteConfig, plan: Planning):
    """``target_latency`` checked on the whole model (:func:`dsrewrite.timing.loop.latency_loop`): each plan is
    built on a copy and timed against the original; the report lists every plan, planned vs measured."""
    def attempt(t) -> Attempt:
        built = _build(model, args, cfg, plan, inplace=False, inputs=plan.inputs.replace(timer=t))
        report = built.report(model, cfg, plan)
        _measure(model, built.model, args, plan, report)
        return attempt_from_layers((built, report, t), report.layers, plan.inputs.totals.time_ms,
                                   report.time_ratio, report.time_noise or 0.0, report.time_median_ratio)

    kept, rounds, note = latency_loop(attempt, plan.timer, cfg.target_latency, strict=cfg.strict)
    built, report, used = kept.payload
    report.latency_rounds = rounds
    if note:
        report.notes.insert(0 if "NOT MET" in note else len(report.notes), note)
    if cfg.inplace:  # the rounds ran on copies: write the kept plan into the user's model
        built = _build(model, args, cfg, plan, inplace=True, inputs=plan.inputs.replace(timer=used))
        report.layers = [d.report for d in built.decisions]
    if plan.batches is not None:
        report.notes.append(built.calibrate(plan))
    return built, report


REPLAY_OPTIONS = ("inplace", "backend", "progress", "name", "measure_time")  # what apply_plan takes beside the plan


def apply_plan(model: Any, plan: "Plan | str | os.PathLike[str]", example_inputs: Any, calibration: Any = None,
               **options: Any) -> Any:
    """Rebuild ``plan``'s rewrite of ``model`` (a fresh copy, or the model itself with ``inplace=True``) without
    timing anything: every layer gets the plan's rank, per-channel ranks and depthwise form, its factors by SVD,
    or refitted on ``calibration`` as :func:`dsrewrite.rewrite` does. A plan that does not fit the model (a layer
    missing, another weight shape) is refused in one line naming the first mismatch.

    ``plan``: a :class:`Plan` or the path of a saved one. ``options``: ``inplace``, ``backend``, ``progress``,
    ``name``, ``measure_time`` (default ``False``; ``True`` times the original and the rebuilt model side by side).
    Returns a :class:`~dsrewrite.RewriteResult` (``.model``, ``.report``, ``.plan``: the plan as rebuilt). Then
    ``result.model.load_state_dict(fine_tuned_state_dict)`` gives back a fine-tuned model (docs/plans.md).
    """
    if not isinstance(plan, Plan):
        if not isinstance(plan, (str, os.PathLike)):
            raise DsrewriteError(f"plan must be a dsrewrite.Plan or the path of a saved one, got {type(plan).__name__}")
        plan = Plan.load(plan)
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise DsrewriteError(f"model must be an eager torch.nn.Module, got {type(model).__name__}")
    if plan.route in ("onnx", "torch.compile"):
        raise DsrewriteError(f"this plan was made on the {plan.route} route: apply it there "
                             f"({'dsrewrite.onnx.apply_plan' if plan.route == 'onnx' else 'dsrewrite.compile'})")
    bad = next((k for k in options if k not in REPLAY_OPTIONS), None)
    if bad is not None:
        raise DsrewriteError(f"apply_plan does not take {bad!r}: the plan decides the layers and ranks (options: "
                             f"{', '.join(REPLAY_OPTIONS)})")
    options = dict(options, measure_time=bool(options.get("measure_time", False)))
    cfg = RewriteConfig.build(None, dict(options, calibration=calibration), route="torch",
                              words=" for dsrewrite.apply_plan")
    args = as_args(example_inputs)
    if not cfg.inplace:
        return _replay(model, args, cfg, plan)
    before = ModelSnapshot(model)  # inplace: succeed, or leave the model exactly as it was
    try:
        return _replay(model, args, cfg, plan)
    except BaseException:
        before.restore()
        raise


def _replay(model: Any, args: tuple, cfg: Any, plan: Plan) -> Any:
    """:func:`apply_plan` after its checks: ``api._build`` with the plan as the planner's decisions (the same
    frontends and fallback as ``rewrite``), the fit checked on the route that built it, then calibration."""
    planning = Planning(model, args, cfg)
    built = _build(model, args, cfg, planning, inplace=cfg.inplace, inputs=planning.inputs.replace(replay=plan))
    plan.check_fit((d.site.spec.name, weight_shape(d.site.weight)) for d in built.decisions)
    wanted = plan.by_name()
    for d in built.decisions:
        if wanted[d.site.spec.name].rewritten and not d.rewritten:
            raise DsrewriteError(f"the plan does not fit this model: layer {d.site.spec.name!r} cannot be rewritten "
                                 f"here ({d.report.reason})")
    if built.route != plan.route:
        built.notes.append(f"plan made on the {plan.route} route, rebuilt on the {built.route} route")
    if planning.batches is not None:
        built.calibrate(planning)
    report = built.report(model, cfg, planning)
    if cfg.measure_time:
        _measure(model, built.model, args, planning, report)
    rebuilt = Plan.from_decisions(built.decisions, route=built.route)
    moved = [L.name for L in rebuilt.layers if L.channel_ranks != wanted[L.name].channel_ranks]
    if moved:
        report.notes.append(f"calibration moved the per-channel ranks of {len(moved)} layer(s) (same shapes): "
                            + ", ".join(moved[:4]) + (", ..." if len(moved) > 4 else ""))
    report.notes.append(f"rebuilt from a plan ({plan.fingerprint}, made with dsrewrite "
                        f"{plan.versions.get('dsrewrite', '?')}): no layer timed")
    result_plan = dataclasses.replace(plan, layers=rebuilt.layers, route=built.route, fingerprint="")
    return RewriteResult(built.model, report, built.decisions, plan.memory_format, plan=result_plan)
