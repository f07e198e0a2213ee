"""``dsrewrite.onnx.rewrite``: load, infer shapes, plan with the shared pipeline, rewrite, report, save.

The model is edited as a protobuf: only the rewritten nodes (``Conv``, and with ``kinds`` the 1x1 ``Conv``,
``Gemm`` and ``MatMul`` weight layers) and the weights nothing reads any more change, so a model with nothing
to rewrite comes back as it was, and everything the rewrite does not touch (value infos, subgraphs, metadata,
opsets) is kept exactly, with one exception said in the report: a model below opset 13 that gains weights is
converted to opset 13 so that onnxruntime's quantizer takes it (:func:`.quantize.quantizable`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Sequence, Union

import onnx

from ..config import RewriteConfig
from ..plan.balance import balance_decisions
from ..plan.eligibility import why_not
from ..errors import DsrewriteError, first_line
from ..ir import ConvSite
from ..plan.planner import Decision, PlanInputs, Totals, plan_sites
from ..plan.planfile import Plan, weight_shape
from ..report import Report, build_report
from ..timing import measure as timing_measure  # called through the module: tests patch compare
from ..timing.loop import Attempt, attempt_from_layers, latency_loop
from . import measure as onnx_measure  # called through the module: tests patch session
from .backend import apply_decisions
from .calib_data import as_feeds
from .calibrate import OnnxCalibration
from .flops import Shapes, count_flops, count_params, infer_shapes, partial_flops, subgraph_note
from .frontend import CONV_OPS, collect_sites
from .latency import OrtLayerTimer
from .model_io import LARGE, load_model, model_nbytes, same_file, save_model
from .quantize import quantizable, unit_multiplier
from .runtime import OnnxRuntime
from .selfcheck import self_check

__all__ = ["rewrite", "apply_plan", "OnnxRewriteResult"]


class _ModelReport(NamedTuple):
    model: onnx.ModelProto
    report: Report


class OnnxRewriteResult(_ModelReport):
    """``(model, report)``: the rewritten ModelProto and what changed; ``.plan``: what was decided per layer, to
    save and replay (:class:`dsrewrite.Plan`, :func:`apply_plan`). Unpacks as the pair it always was."""

    plan: Optional[Plan] = None  # set per result (a copy made by ``_replace`` has none)

    def __new__(cls, model: onnx.ModelProto, report: Report, plan: Optional[Plan] = None) -> "OnnxRewriteResult":
        self = super().__new__(cls, model, report)
        self.plan = plan
        return self

    def __getnewargs__(self):
        return (self.model, self.report, self.plan)


def rewrite(src: Union[str, "os.PathLike[str]", onnx.ModelProto], dst: Union[None, str, "os.PathLike[str]"] = None,
            config: Optional[RewriteConfig] = None, **options: Any) -> OnnxRewriteResult:
    """Replace the eligible ``Conv`` nodes of an ONNX model by low-rank depthwise + pointwise ``Conv`` pairs, and
    (``kinds``) its 1x1 ``Conv`` and ``Gemm`` / ``MatMul`` weight layers by low-rank pairs.

    The options are a :class:`~dsrewrite.config.RewriteConfig` (``config``) and/or its fields as keyword
    arguments (applied on top); options the ONNX route cannot honour (device, memory_format, ...) are refused by
    name.

    Args:
        src: path to an ``.onnx`` file (external data is read too) or an ``onnx.ModelProto`` (not changed).
        dst: where to write the result (optional); equal to ``src`` only with ``overwrite=True``. Written
            atomically, with external data when the source had it or the model exceeds 2 GB.
        rank: int, ``"auto"`` or ``"full"``, as for :func:`dsrewrite.rewrite`.
        include / exclude: glob patterns over node names (``"/layer4/*"``) or a callable ``name -> bool``.
        kinds: the layer kinds to rewrite: ``"kxk"`` convs (separable pairs), ``"pointwise"`` 1x1 convs and
            ``"linear"`` ``Gemm`` / ``MatMul`` nodes with a constant weight (low-rank pairs), or ``"all"``; by
            default all kinds under a budget, ``"kxk"`` for a rank (:func:`dsrewrite.plan.policy.default_kinds`).
        overwrite: allow ``dst`` to be the source file.
        input_shapes: static shapes by input name for the FLOP count; by default the model's own, with a
            symbolic batch set to 1 (FLOPs then per sample).
        measure_time: time both models with onnxruntime (random inputs, interleaved rounds). With
            ``target_latency`` the models are timed anyway (the closed loop); ``False`` turns that check off.
        progress: show a progress bar while factorising.
        name: model name for the report (default: the file name or the graph name).
        target_flops / target_params / energy: budgets instead of a rank, as for :func:`dsrewrite.rewrite`
            (fractions of the whole graph's FLOPs / parameters; per-layer spectral energy).
        target_latency: keep at most this fraction of the model's onnxruntime time (static input shapes): layers timed in onnxruntime, the whole model checked against the
            original in the closed loop of :mod:`dsrewrite.timing.loop` (refused with the best measured ratio).
        ort_threads / ort_optimization / ort_provider: the onnxruntime sessions models and layers are timed in
            (intra-op threads, default onnxruntime's; graph optimisation ``disable``/``basic``/``extended``/``all``;
            execution provider, default ``CPUExecutionProvider``): time in what you deploy with.
        ragged: per-channel ranks, as for :func:`dsrewrite.rewrite`; the depthwise ``Conv`` then reads its
            input through a ``Gather`` of the channels.
        calibration: data for data-aware initialisation, computed in onnxruntime (:mod:`.calibrate`): an array
            (one-input models), a ``.npy`` / ``.npz`` file, a dict of arrays by input name, or an iterable of
            such feed dicts (:func:`.calib_data.as_feeds`; images: :func:`.calib_data.image_feeds`). The
            factors are refitted on the layers' outputs, and a budget allocates ranks by data-aware errors.
        sequential: with ``calibration``, refit in execution order on the rewritten graph's activations
            (``True``), on the original model's (``False``), or the first when it fits in time (``None``).
        int8_friendly: rescale each pair's filters and columns to equal ranges for int8 (:mod:`dsrewrite.plan.balance`);
            the float model is unchanged in value.

    A model below opset 13 that gains weights comes back at opset 13 when onnx.version_converter can convert it
    with the same outputs, else with the new weights as ``Constant`` nodes (:func:`.quantize.quantizable`), so
    that onnxruntime's quantizer takes it as it is; the report says which.

    Returns:
        ``(model, report)`` (an :class:`OnnxRewriteResult`), with ``.plan``: the per-layer decisions as a
        :class:`dsrewrite.Plan` (``.save(path)``; :func:`apply_plan` rebuilds them without timing anything).
    """
    if isinstance(dst, RewriteConfig) and config is None:  # rewrite(src, config): no output file
        dst, config = None, dst
    cfg = RewriteConfig.build(config, options, route="onnx", words=" for dsrewrite.onnx.rewrite")
    return _rewrite(src, dst, cfg)


# what apply_plan takes besides the plan and the data: nothing that chooses layers or ranks, or times them
REPLAY_OPTIONS = ("overwrite", "input_shapes", "progress", "name", "measure_time", "sequential", "ort_threads",
                   "ort_optimization", "ort_provider")


def apply_plan(src: Union[str, "os.PathLike[str]", onnx.ModelProto], dst: Union[None, str, "os.PathLike[str]"],
               plan: Union[Plan, str, "os.PathLike[str]"], calibration: Any = None,
               **options: Any) -> OnnxRewriteResult:
    """Rebuild the rewrite ``plan`` describes (``result.plan`` of :func:`rewrite`, or the path of a saved one) on
    the ONNX model ``src`` without timing anything: every layer gets the plan's rank and per-channel ranks, its
    factors by SVD, or refitted on ``calibration`` as :func:`rewrite` does. A plan that does not fit the model
    (a layer missing or added, another weight shape, a layer that cannot be rewritten here) is refused in one
    line naming the first mismatch.

    ``options``: ``overwrite``, ``input_shapes`` (default: the plan's), ``progress``, ``name``, ``sequential``,
    ``measure_time`` (with ``ort_threads`` / ``ort_optimization`` / ``ort_provider``). Returns ``(model, report)``
    with ``.plan`` (the plan as rebuilt), as :func:`rewrite` does.
    """
    if not isinstance(plan, Plan):
        if not isinstance(plan, (str, os.PathLike)):
            raise DsrewriteError(f"plan must be a dsrewrite.Plan or the path of a saved one, got {type(plan).__name__}")
        plan = Plan.load(plan)
    if plan.route != "onnx":
        raise DsrewriteError(f"this plan was made on the {plan.route} route for a torch model: apply it with "
                             "dsrewrite.apply_plan (an ONNX model replays plans made by dsrewrite.onnx.rewrite)")
    bad = next((k for k in options if k not in REPLAY_OPTIONS), None)
    if bad is not None:
        raise DsrewriteError(f"apply_plan does not take {bad!r}: the plan decides the layers and ranks (options: "
                             f"{', '.join(REPLAY_OPTIONS)})")
    if options.get("input_shapes") is None and plan.options.get("input_shapes"):
        options["input_shapes"] = plan.options["input_shapes"]  # the shapes it was planned (and checked) at
    cfg = RewriteConfig.build(None, dict(options, calibration=calibration), route="onnx",
                              words=" for dsrewrite.onnx.apply_plan")
    return _rewrite(src, dst, cfg, replay=plan)


@dataclass
class _Source:
    """The source model as read once: the ModelProto, where it came from, its shapes, FLOPs and parameters, and
    the notes its reading left (symbolic shapes, unknown nodes)."""

    model: onnx.ModelProto
    info: Any
    shapes: Shapes
    flops_before: int
    unknown: List[str]
    params_before: int
    notes: List[str] = field(default_factory=list)


def _rewrite(src, dst, cfg: RewriteConfig, replay: Optional[Plan] = None) -> OnnxRewriteResult:
    """:func:`rewrite` once its options are read; ``replay``: every layer decided as this plan says
    (:func:`apply_plan`), the plan's fit checked before any work."""
    dst = _check_output(src, dst, cfg)
    source = _read(src, cfg)
    inputs, calib = _plan_inputs(source, cfg, replay)
    plan_and_apply = functools.partial(_plan_and_apply, source, cfg, inputs)
    timing, rounds = None, []
    budget = cfg.chosen_budget()
    ort_options = dict(threads=cfg.ort_threads, optimization=cfg.ort_optimization, provider=cfg.ort_provider)
    if budget is not None and budget[0] == "target_latency":
        (new, decisions, done, check_note), timing, rounds, loop_note = _latency_plan(
            source.model, source.shapes, plan_and_apply, budget[1], check=cfg.measure_time is not False,
            large=model_nbytes(source.model) >= LARGE, ort_options=ort_options, strict=cfg.strict)
        if loop_note:
            source.notes.insert(0 if "NOT MET" in loop_note else len(source.notes), loop_note)
        if source.shapes.per_sample:
            source.notes.append("target_latency planned and measured at batch 1 (the model's batch is symbolic): "
                                "give input_shapes (--input-shape) for the batch you deploy with")
    else:
        new, decisions, done, check_note = plan_and_apply()
    if replay is not None:
        _check_replayed(replay, decisions)
    if calib is not None:
        if done:
            source.notes.append(calib.refit(decisions, lambda ds: _rebuilt(source.model, source.shapes, ds)))
            new = _rebuilt(source.model, source.shapes, decisions)
        else:
            source.notes.append("calibration: no layer was rewritten")
    if cfg.int8_friendly:  # after the refit, which re-solves the pointwise weights
        new = _int8_friendly(source, decisions, done, new)
    made = _made_plan(decisions, cfg, replay, timing, source.notes)
    large = model_nbytes(new) >= LARGE
    if done and not large:
        new, quant_note = quantizable(source.model, new, source.shapes.inputs,  # below opset 13: what onnxruntime
                                      feeds=calib.feeds[0] if calib is not None and calib.feeds else None)  # quantizes
        if quant_note:
            source.notes.append(quant_note)
        _check_rewritten(new)
    report = _report(source, new, decisions, done, check_note, cfg)
    if dst is not None:
        save_model(new, dst, external_data=source.info.external_data, threshold=source.info.threshold)
        if done and large:
            _check_rewritten(dst)
    if timing is not None:  # target_latency: the kept plan's side-by-side measurement
        _fill_time(report, timing)
        report.latency_rounds = rounds
    elif cfg.measure_time:  # off unless asked: it runs both models in onnxruntime
        _measure(source.model, new, source.shapes.inputs, report, source.info.path, dst, large, ort_options)
    return OnnxRewriteResult(new, report, made)


def _int8_friendly(source: _Source, decisions: List[Decision], done: bool, new: onnx.ModelProto) -> onnx.ModelProto:
    """Each pair's filters and columns balanced (exact in float), and depthwise convs with several filters per
    channel written as a Gather and one filter per channel, the form onnxruntime's int8 depthwise kernel takes."""
    source.notes.append(balance_decisions(decisions))
    if not done:
        return new
    new = _rebuilt(source.model, source.shapes, decisions)
    gathered = unit_multiplier(new, source=source.model)
    if gathered:
        source.notes.append(f"int8_friendly: {gathered} depthwise conv(s) with several filters per channel written as "
                            "a Gather of the channels and one filter per channel (the same function; onnxruntime's "
                            "int8 depthwise kernel takes only that form)")
    return new


def _check_output(src, dst, cfg: RewriteConfig) -> Optional[str]:
    """``dst`` as a path, refused when it is the source and ``overwrite`` is not given."""
    if dst is None:
        return None
    dst = os.fspath(dst)
    src_path = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    if src_path is not None and same_file(src_path, dst) and not cfg.overwrite:
        raise DsrewriteError(f"refusing to overwrite the source model {dst}: pass overwrite=True (--overwrite) "
                             "or choose another output")
    return dst


def _read(src, cfg: RewriteConfig) -> _Source:
    """Load the model and count what it is before the rewrite."""
    model, info = load_model(src)
    shapes = infer_shapes(model, cfg.input_shapes)
    flops_before, unknown = count_flops(model, shapes)
    return _Source(model, info, shapes, flops_before, unknown, count_params(model))


def _plan_inputs(source: _Source, cfg: RewriteConfig, replay: Optional[Plan]):
    """The planner's inputs (budget totals, calibration statistics, the plan to replay) and the calibration
    runner (``None`` without calibration data); the replayed plan's fit is checked here, before any work."""
    budget, kinds = cfg.chosen_budget(), cfg.layer_kinds()
    flops_budget = budget is not None and budget[0] == "target_flops"
    # the source model's sites, collected once (their weights are decoded from the protobuf) when needed here
    needed = flops_budget or cfg.calibration is not None or replay is not None
    source_sites = collect_sites(source.model, source.shapes) if needed else []
    if replay is not None:
        replay.check_fit((s.spec.name, weight_shape(s.weight)) for s in source_sites)
    totals = Totals()
    if budget is not None:
        totals = Totals(params=source.params_before, flops=_flops_total(
            source_sites, source.flops_before, source.unknown, source.shapes, source.notes, kinds)
            if flops_budget else None)
    calib, stats = None, None
    if cfg.calibration is not None:
        calib = OnnxCalibration(source.model, as_feeds(cfg.calibration, source.model), sequential=cfg.sequential,
                                progress=cfg.progress)
        stats_now = calib.stats(source_sites)  # the original model's activations, one pass
        if budget is not None and budget[0] != "energy":  # ranks allocated by data-aware (whitened) errors
            stats = stats_now
    return PlanInputs.from_config(cfg, totals=totals, stats=stats, replay=replay), calib


def _plan_and_apply(source: _Source, cfg: RewriteConfig, inputs: PlanInputs, timer: Any = None,
                    total_time_ms: Optional[float] = None):
    """One plan written into a copy of the source model (``timer``: a latency plan's layer timer):
    ``(new model, decisions, whether anything was rewritten, the self-check's note)``."""
    if timer is not None:
        inputs = inputs.replace(timer=timer, totals=dataclasses.replace(inputs.totals, time_ms=total_time_ms))
    new = onnx.ModelProto()
    new.CopyFrom(source.model)  # edited in place by the backend; the source model stays as it was
    sites = collect_sites(new, source.shapes)
    decisions = plan_sites(sites, inputs, source.notes)
    for d in decisions:
        if d.rewritten and d.site.spec.extra.get("bias"):
            where = "the expansion" if d.site.spec.lowrank else "the pointwise conv"
            d.report.note = f"{d.site.spec.extra['bias']}, kept on {where}"
    check_note = self_check(source.model, decisions, source.shapes.inputs)  # failing layers become skips first
    return new, decisions, apply_decisions(new, decisions), check_note


def _made_plan(decisions: List[Decision], cfg: RewriteConfig, replay: Optional[Plan], timing: Optional[dict],
               notes: List[str]) -> Plan:
    """The plan of this rewrite; a replay keeps the replayed plan's options, runtime and versions."""
    made = Plan.from_decisions(decisions, route="onnx", config=cfg,
                               runtime=timing["runtime"] if timing is not None else None)
    if replay is None:
        return made
    notes.append(f"rebuilt from a plan ({replay.fingerprint}, made with dsrewrite "
                 f"{replay.versions.get('dsrewrite', '?')}): no layer timed")
    return dataclasses.replace(replay, layers=made.layers, fingerprint="")


def _report(source: _Source, new: onnx.ModelProto, decisions: List[Decision], done: bool,
            check_note: Optional[str], cfg: RewriteConfig) -> Report:
    """The report: counts after, and the notes of every stage (shapes, unknown nodes, the self-check, subgraphs
    and functions the rewrite does not enter)."""
    model, shapes, notes = source.model, source.shapes, source.notes
    shapes_after = infer_shapes(new, cfg.input_shapes) if done else shapes  # the same user shapes
    flops_after, _ = count_flops(new, shapes_after)
    if shapes.per_sample:
        notes.append("the model has a symbolic batch size: FLOPs are per sample (batch 1)")
    notes.extend(shapes.notes)
    if source.unknown:
        notes.append(f"{len(source.unknown)} conv/matmul nodes have unknown shapes and are not counted "
                     f"(first: {source.unknown[0]})")
    if check_note:
        notes.append(check_note)
    inner = subgraph_note(model, shapes)
    if inner:
        notes.append(inner)
    in_functions = [f"{f.name}/{n.name or n.op_type}" for f in model.functions for n in f.node if n.op_type in CONV_OPS]
    if in_functions:
        notes.append(f"{len(in_functions)} convolutions inside model-local functions are not rewritten "
                     f"(first: {in_functions[0]})")
    return build_report(
        [d.report for d in decisions], model=cfg.name or source.info.name or model.graph.name, route="onnx",
        input_shapes=[list(s) for s in shapes.inputs.values()], params_before=source.params_before,
        params_after=count_params(new) if done else source.params_before, flops_before=source.flops_before,
        flops_after=flops_after, flops_per_sample=shapes.per_sample,
        flops_partial=partial_flops(model, shapes, source.unknown), notes=notes)


def _check_replayed(plan: Plan, decisions: List[Decision]) -> None:
    """Refuse a replay in which a layer the plan rewrites could not be rewritten (the self-check failed, ...)."""
    wanted = plan.by_name()
    for d in decisions:
        if wanted[d.site.spec.name].rewritten and not d.rewritten:
            raise DsrewriteError(f"the plan does not fit this model: layer {d.site.spec.name!r} cannot be rewritten "
                                 f"here ({d.report.reason})")


def _rebuilt(model: onnx.ModelProto, shapes: Shapes, decisions: List[Decision]) -> onnx.ModelProto:
    """A copy of ``model`` with ``decisions`` written into it (decisions are matched to its convs by name)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    by_name = {s.spec.name: s for s in collect_sites(new, shapes)}
    apply_decisions(new, [dataclasses.replace(d, site=by_name[d.site.spec.name]) for d in decisions if d.rewritten])
    return new


def _latency_plan(model: onnx.ModelProto, shapes: Shapes, plan_and_apply, target: float, *, check: bool = True,
                  large: bool = False, ort_options: Optional[dict] = None, strict: bool = False):
    """``target_latency`` in onnxruntime: layers timed by :class:`~dsrewrite.onnx.latency.OrtLayerTimer`, the
    whole model against the original in one loop (:func:`dsrewrite.timing.loop.latency_loop`; one plan from the
    layer timings alone when ``check`` is False). Returns the kept plan's ``(new, decisions, done, check_note)``,
    its timing (``None`` unchecked), the rounds and a note."""
    if large:
        raise DsrewriteError("target_latency times the model in onnxruntime from memory, which a model over 2 GB "
                             "cannot be: use target_flops, target_params, energy or a rank")
    names = [vi.name for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
    if (not shapes.inputs or any(n not in shapes.inputs for n in names)
            or any(0 in s or any(d is None or d < 1 for d in s) for s in shapes.inputs.values())):
        raise DsrewriteError("target_latency times the model in onnxruntime and needs static input shapes: "
                             "give input_shapes (--input-shape NAME=SHAPE)")
    ort_options = ort_options or {}
    feeds = onnx_measure.random_feeds(model, shapes.inputs)
    try:
        before = onnx_measure.session(model, **ort_options, spinning=False)
        before.run(None, feeds)
    except DsrewriteError:
        raise
    except Exception as e:  # noqa: BLE001 - an op onnxruntime lacks, a bad shape: one line
        raise DsrewriteError(f"target_latency: onnxruntime cannot run the model ({first_line(e, 160)})") from None
    timer = OrtLayerTimer(**ort_options)
    total = timing_measure.time_call(before.run, (None, feeds), warmup=2, reps=10, max_seconds=3.0, reduce=min)
    if not check:
        out = plan_and_apply(timer, total)
        return out, None, [], "target_latency not checked on the whole model (measure_time=False)"

    def attempt(t) -> Attempt:
        out = plan_and_apply(t, total)
        try:
            after = onnx_measure.session(out[0], **ort_options, spinning=False)
            c = timing_measure.compare(before.run, after.run, (None, feeds))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: one line, dsrewrite's type
            raise DsrewriteError(f"target_latency: onnxruntime cannot run the rewritten model ({first_line(e, 160)}): "
                                 "a dsrewrite bug, please report it with the model") from None
        return attempt_from_layers((out, c), [d.report for d in out[1]], total, c.ratio, c.noise, c.median_ratio)

    kept, rounds, note = latency_loop(attempt, timer, target, strict=strict)
    out, c = kept.payload
    timing = dict(before=c.before_ms, after=c.after_ms, noise=c.noise, runtime=_runtime(ort_options), comparison=c)
    return out, timing, rounds, note


def _fill_time(report: Report, timing: dict) -> None:
    report.time_before_ms, report.time_after_ms, report.time_noise = timing["before"], timing["after"], timing["noise"]
    report.time_runtime = timing["runtime"]
    c = timing.get("comparison")
    if c is not None:
        report.time_median_ratio = c.median_ratio
        timing_measure.note_disturbed(report, c)


def _runtime(ort_options: dict) -> str:
    """What the report's time column means on the ONNX route: the onnxruntime runtime's own words."""
    return OnnxRuntime(**{f"ort_{k}": v for k, v in ort_options.items()}).label(None)


def _check_rewritten(model: Union[str, onnx.ModelProto]) -> None:
    """The rewrite's post-condition: the rewritten model passes ``onnx.checker`` (a failure is a dsrewrite bug)."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - ValidationError or a protobuf error: one line, dsrewrite's type
        raise DsrewriteError(f"the rewritten model fails onnx.checker ({first_line(e, 200)}): a dsrewrite bug, "
                             "please report it with the model") from None


def _flops_total(sites: List[ConvSite], flops_before: int, unknown: List[str], shapes: Shapes,
                 notes: List[str], kinds: Sequence[str] = ("kxk",)) -> Optional[int]:
    """What a ``target_flops`` budget is a fraction of: the whole model's FLOPs when every counted node has known
    shapes; the planned layers' FLOPs (``None``: the planner's sum over the sites) when only other MatMul/Gemm
    nodes are unknown, said in a note; a one-line error when a conv's FLOPs are unknown, or a linear layer's
    that ``kinds`` would rewrite."""
    weighed = {s.spec.name for s in sites if s.handle.node.op_type in ("Conv", "ConvTranspose")
               or (s.spec.kind in kinds and why_not(s.spec, kinds) is None)}
    blind = [n for n in unknown if n in weighed]
    if blind:
        advice = ("give input_shapes (--input-shape)" if shapes.symbolic_inputs else
                  "shape inference cannot resolve them: use target_params, energy or a rank")
        convs = {s.spec.name for s in sites if s.handle.node.op_type in ("Conv", "ConvTranspose")}
        if not set(blind) & convs:  # only linear layers: they can be left out
            advice += " (or kinds without 'linear': --kinds kxk,pointwise)"
        raise DsrewriteError(f"target_flops needs the FLOPs of every layer it plans, and {len(blind)} of them "
                             f"{'has' if len(blind) == 1 else 'have'} unknown shapes (first: {blind[0]}): {advice}")
    others = [n for n in unknown if n not in weighed]
    if not others:
        return flops_before
    notes.append(f"target_flops applies to the convolutions' FLOPs (and the planned linear layers'): {len(others)} "
                 "MatMul/Gemm nodes have unknown shapes, so the whole model's FLOPs are not known "
                 f"(first: {others[0]})")
    return None


def _measure(model, new, input_shapes, report: Report, src_path: Optional[str], dst: Optional[str],
             big: bool, ort_options: dict) -> None:
    """Time both models with onnxruntime, side by side in interleaved rounds (:func:`dsrewrite.timing.measure.compare`),
    in the sessions ``ort_options`` describe; ``big``: over the protobuf limit, so loaded from their files."""
    if big and not (src_path and dst):
        report.notes.append("latency not measured: a model over 2 GB needs both src and dst paths")
        return
    if any(0 in s for s in input_shapes.values()) or not input_shapes:
        report.notes.append("latency not measured: input shapes are not static")
        return
    try:
        before = onnx_measure.session(src_path if big else model, **ort_options, spinning=False)
        after = onnx_measure.session(dst if big else new, **ort_options, spinning=False)
    except DsrewriteError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. an op onnxruntime lacks: keep the rewrite, say why
        report.notes.append(f"latency not measured: onnxruntime cannot load the model ({first_line(e, 120)})")
        return
    feeds = onnx_measure.random_feeds(model, input_shapes)
    try:
        c = timing_measure.compare(before.run, after.run, (None, feeds))
    except Exception as e:  # noqa: BLE001
        report.notes.append(f"latency not measured: onnxruntime failed to run the model ({first_line(e, 120)})")
        return
    _fill_time(report, dict(before=c.before_ms, after=c.after_ms, noise=c.noise, runtime=_runtime(ort_options),
                            comparison=c))
