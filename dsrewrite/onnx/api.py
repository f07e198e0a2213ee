"""``dsrewrite.onnx.rewrite``: load, infer shapes, plan with the shared pipeline, rewrite, report, save.

The model is edited as a protobuf: only the rewritten nodes (``Conv``, and with ``kinds`` the 1x1 ``Conv``,
``Gemm`` and ``MatMul`` weight layers) and the weights nothing reads any more change, so a model with nothing
to rewrite comes back as it was, and everything the rewrite does not touch (value infos, subgraphs, metadata,
opsets) is kept exactly, with one exception said in the report: a model below opset 13 that gains weights is
converted to opset 13 so that onnxruntime's quantizer takes it (:func:`.quantize.quantizable`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, List, NamedTuple, Optional, Sequence, Union

import onnx

from ..config import RewriteConfig
from ..eligibility import why_not
from ..errors import DsrewriteError, first_line
from ..ir import ConvSite
from ..pipeline import Decision, plan_sites
from ..plan import Plan, _shape  # a site's weight shape as the plan's fingerprint lists it
from ..report import Report, build_report
from .backend import apply_decisions
from .flops import Shapes, count_flops, count_params, infer_shapes, partial_flops, subgraph_note
from .frontend import CONV_OPS, collect_sites
from .model_io import PROTOBUF_LIMIT, load_model, model_nbytes, same_file, save_model
from .quantize import quantizable
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
            default all kinds under a budget, ``"kxk"`` for a rank (:func:`dsrewrite.policy.default_kinds`).
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
            original in the closed loop of :mod:`dsrewrite.latency_loop` (refused with the best measured ratio).
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
        int8_friendly: rescale each pair's filters and columns to equal ranges for int8 (:mod:`dsrewrite.balance`);
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
_REPLAY_OPTIONS = ("overwrite", "input_shapes", "progress", "name", "measure_time", "sequential", "ort_threads",
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
    bad = next((k for k in options if k not in _REPLAY_OPTIONS), None)
    if bad is not None:
        raise DsrewriteError(f"apply_plan does not take {bad!r}: the plan decides the layers and ranks (options: "
                             f"{', '.join(_REPLAY_OPTIONS)})")
    if options.get("input_shapes") is None and plan.options.get("input_shapes"):
        options["input_shapes"] = plan.options["input_shapes"]  # the shapes it was planned (and checked) at
    cfg = RewriteConfig.build(None, dict(options, calibration=calibration), route="onnx",
                              words=" for dsrewrite.onnx.apply_plan")
    return _rewrite(src, dst, cfg, replay=plan)


def _rewrite(src, dst, cfg: RewriteConfig, replay: Optional[Plan] = None) -> OnnxRewriteResult:
    """:func:`rewrite` once its options are read; ``replay``: every layer decided as this plan says
    (:func:`apply_plan`), the plan's fit checked before any work."""
    rank, include, exclude, progress, ragged = cfg.rank, cfg.include, cfg.exclude, cfg.progress, cfg.ragged
    overwrite, input_shapes, name, budget = cfg.overwrite, cfg.input_shapes, cfg.name, cfg.chosen_budget()
    kinds = cfg.layer_kinds()
    measure_time = bool(cfg.measure_time)  # off unless asked: it runs both models in onnxruntime
    src_path = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    if dst is not None:
        dst = os.fspath(dst)
        if src_path is not None and same_file(src_path, dst) and not overwrite:
            raise DsrewriteError(f"refusing to overwrite the source model {dst}: pass overwrite=True (--overwrite) "
                                 "or choose another output")
    model, info = load_model(src)

    shapes = infer_shapes(model, input_shapes)
    flops_before, unknown = count_flops(model, shapes)
    params_before = count_params(model)
    notes: List[str] = []
    flops_budget = budget is not None and budget[0] == "target_flops"
    # the source model's sites, collected once (their weights are decoded from the protobuf) when needed here
    needed = flops_budget or cfg.calibration is not None or replay is not None
    source_sites = collect_sites(model, shapes) if needed else []
    if replay is not None:
        replay.check_fit((s.spec.name, _shape(s.weight)) for s in source_sites)
    budget_kw: dict = {}
    if budget is not None:
        budget_kw = {"budget": budget, "total_params": params_before}
        if flops_budget:
            budget_kw["total_flops"] = _flops_total(source_sites, flops_before, unknown, shapes, notes, kinds)
    calib = None
    if cfg.calibration is not None:
        from .calib_data import as_feeds
        from .calibrate import OnnxCalibration

        calib = OnnxCalibration(model, as_feeds(cfg.calibration, model), sequential=cfg.sequential,
                                progress=progress)
        stats = calib.stats(source_sites)  # the original model's activations, one pass
        if budget is not None and budget[0] != "energy":  # ranks allocated by data-aware (whitened) errors
            budget_kw["stats"] = stats

    def plan_and_apply(extra: dict):
        new = onnx.ModelProto()
        new.CopyFrom(model)  # edited in place by the backend; the source model stays as it was
        sites = collect_sites(new, shapes)
        decisions = plan_sites(sites, rank, include, exclude, progress=progress, ragged=ragged, kinds=kinds,
                               replay=replay, strict=cfg.strict, notes=notes, **budget_kw, **extra)
        for d in decisions:
            if d.rewritten and d.site.spec.extra.get("bias"):
                where = "the expansion" if d.site.spec.lowrank else "the pointwise conv"
                d.report.note = f"{d.site.spec.extra['bias']}, kept on {where}"
        check_note = self_check(model, decisions, shapes.inputs)  # failing layers become skips before the edit
        return new, decisions, apply_decisions(new, decisions), check_note

    timing, rounds = None, []
    ort_options = dict(threads=cfg.ort_threads, optimization=cfg.ort_optimization, provider=cfg.ort_provider)
    if budget is not None and budget[0] == "target_latency":
        (new, decisions, done, check_note), timing, rounds, loop_note = _latency_plan(
            model, shapes, plan_and_apply, budget[1], check=cfg.measure_time is not False,
            large=model_nbytes(model) >= PROTOBUF_LIMIT - (64 << 20), ort_options=ort_options, strict=cfg.strict)
        if loop_note:
            notes.insert(0 if "NOT MET" in loop_note else len(notes), loop_note)
        if shapes.per_sample:
            notes.append("target_latency planned and measured at batch 1 (the model's batch is symbolic): give "
                         "input_shapes (--input-shape) for the batch you deploy with")
    else:
        new, decisions, done, check_note = plan_and_apply({})
    if replay is not None:
        _check_replayed(replay, decisions)
    if calib is not None:
        if done:
            notes.append(calib.refit(decisions, lambda ds: _rebuilt(model, shapes, ds)))
            new = _rebuilt(model, shapes, decisions)
        else:
            notes.append("calibration: no layer was rewritten")
    if cfg.int8_friendly:  # after the refit, which re-solves the pointwise weights
        from ..balance import balance_decisions
        from .quantize import unit_multiplier

        notes.append(balance_decisions(decisions))
        if done:
            new = _rebuilt(model, shapes, decisions)
            gathered = unit_multiplier(new, source=model)
            if gathered:
                notes.append(f"int8_friendly: {gathered} depthwise conv(s) with several filters per channel written as "
                             "a Gather of the channels and one filter per channel (the same function; onnxruntime's "
                             "int8 depthwise kernel takes only that form)")

    made = Plan.from_decisions(decisions, route="onnx", config=cfg,
                               runtime=timing["runtime"] if timing is not None else None)
    if replay is not None:  # the plan as rebuilt: its own options, runtime and versions
        made = dataclasses.replace(replay, layers=made.layers, fingerprint="")
        notes.append(f"rebuilt from a plan ({replay.fingerprint}, made with dsrewrite "
                     f"{replay.versions.get('dsrewrite', '?')}): no layer timed")
    large = model_nbytes(new) >= PROTOBUF_LIMIT - (64 << 20)
    if done and not large:
        new, quant_note = quantizable(model, new, shapes.inputs,  # below opset 13: what onnxruntime quantizes
                                      feeds=calib.feeds[0] if calib is not None and calib.feeds else None)
        if quant_note:
            notes.append(quant_note)
        _check_rewritten(new)
    shapes_after = infer_shapes(new, input_shapes) if done else shapes  # the same user shapes
    flops_after, _ = count_flops(new, shapes_after)
    if shapes.per_sample:
        notes.append("the model has a symbolic batch size: FLOPs are per sample (batch 1)")
    notes.extend(shapes.notes)
    if unknown:
        notes.append(f"{len(unknown)} conv/matmul nodes have unknown shapes and are not counted "
                     f"(first: {unknown[0]})")
    if check_note:
        notes.append(check_note)
    inner = subgraph_note(model, shapes)
    if inner:
        notes.append(inner)
    in_functions = [f"{f.name}/{n.name or n.op_type}" for f in model.functions for n in f.node if n.op_type in CONV_OPS]
    if in_functions:
        notes.append(f"{len(in_functions)} convolutions inside model-local functions are not rewritten "
                     f"(first: {in_functions[0]})")
    report = build_report(
        [d.report for d in decisions], model=name or info.name or model.graph.name, route="onnx",
        input_shapes=[list(s) for s in shapes.inputs.values()], params_before=params_before,
        params_after=count_params(new) if done else params_before, flops_before=flops_before,
        flops_after=flops_after, flops_per_sample=shapes.per_sample,
        flops_partial=partial_flops(model, shapes, unknown), notes=notes)

    if dst is not None:
        save_model(new, dst, external_data=info.external_data, threshold=info.threshold)
        if done and large:
            _check_rewritten(dst)
    if timing is not None:  # target_latency: the kept plan's side-by-side measurement
        _fill_time(report, timing)
        report.latency_rounds = rounds
    elif measure_time:
        _measure(model, new, shapes.inputs, report, info.path, dst, large, ort_options)
    return OnnxRewriteResult(new, report, made)


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
    whole model against the original in one loop (:func:`dsrewrite.latency_loop.latency_loop`; one plan from the
    layer timings alone when ``check`` is False). Returns the kept plan's ``(new, decisions, done, check_note)``,
    its timing (``None`` unchecked), the rounds and a note."""
    from ..latency_loop import Attempt, attempt_from_layers, latency_loop
    from ..measure import compare, time_call
    from .latency import OrtLayerTimer
    from .measure import random_feeds, session

    if large:
        raise DsrewriteError("target_latency times the model in onnxruntime from memory, which a model over 2 GB "
                             "cannot be: use target_flops, target_params, energy or a rank")
    names = [vi.name for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
    if (not shapes.inputs or any(n not in shapes.inputs for n in names)
            or any(0 in s or any(d is None or d < 1 for d in s) for s in shapes.inputs.values())):
        raise DsrewriteError("target_latency times the model in onnxruntime and needs static input shapes: "
                             "give input_shapes (--input-shape NAME=SHAPE)")
    ort_options = ort_options or {}
    feeds = random_feeds(model, shapes.inputs)
    try:
        before = session(model, **ort_options)
        before.run(None, feeds)
    except DsrewriteError:
        raise
    except Exception as e:  # noqa: BLE001 - an op onnxruntime lacks, a bad shape: one line
        raise DsrewriteError(f"target_latency: onnxruntime cannot run the model ({first_line(e, 160)})") from None
    timer = OrtLayerTimer(**ort_options)
    total = time_call(before.run, (None, feeds), warmup=2, reps=10, max_seconds=3.0, reduce=min)
    if not check:
        out = plan_and_apply({"timer": timer, "total_time_ms": total})
        return out, None, [], "target_latency not checked on the whole model (measure_time=False)"

    def attempt(t) -> Attempt:
        out = plan_and_apply({"timer": t, "total_time_ms": total})
        try:
            after = session(out[0], **ort_options)
            c = compare(before.run, after.run, (None, feeds))
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
        from ..measure import note_disturbed

        report.time_median_ratio = c.median_ratio
        note_disturbed(report, c)


def _runtime(ort_options: dict) -> str:
    """What the report's time column means on the ONNX route: the onnxruntime runtime's own words."""
    from ..runtimes import get_runtime

    return get_runtime("onnxruntime", **{f"ort_{k}": v for k, v in ort_options.items()}).label(None)


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
    """Time both models with onnxruntime, side by side in interleaved rounds (:func:`dsrewrite.measure.compare`),
    in the sessions ``ort_options`` describe; ``big``: over the protobuf limit, so loaded from their files."""
    from ..measure import compare
    from .measure import random_feeds, session

    if big and not (src_path and dst):
        report.notes.append("latency not measured: a model over 2 GB needs both src and dst paths")
        return
    if any(0 in s for s in input_shapes.values()) or not input_shapes:
        report.notes.append("latency not measured: input shapes are not static")
        return
    try:
        before = session(src_path if big else model, **ort_options)
        after = session(dst if big else new, **ort_options)
    except DsrewriteError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. an op onnxruntime lacks: keep the rewrite, say why
        report.notes.append(f"latency not measured: onnxruntime cannot load the model ({first_line(e, 120)})")
        return
    feeds = random_feeds(model, input_shapes)
    try:
        c = compare(before.run, after.run, (None, feeds))
    except Exception as e:  # noqa: BLE001
        report.notes.append(f"latency not measured: onnxruntime failed to run the model ({first_line(e, 120)})")
        return
    _fill_time(report, dict(before=c.before_ms, after=c.after_ms, noise=c.noise, runtime=_runtime(ort_options),
                            comparison=c))
