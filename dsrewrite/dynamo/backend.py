"""The dsrewrite Dynamo backend: lift, plan (or replay a cached plan), rewrite, restore the dense layers, report,
compile with Inductor, guard the weights. Convs and linear layers are lifted alike (``kinds=`` chooses which
become pairs: KxK convs separable, 1x1 convs and linear layers low rank).

Planning is the shared middle (:func:`~dsrewrite.frontends.fx.collect_sites`,
:func:`~dsrewrite.plan.planner.plan_sites`, :func:`~dsrewrite.backends.fx.apply_decisions`), so ranks and factors
equal ``rewrite()``'s. Each :class:`DsrewriteBackend` owns its plan cache; the registered entry point
:func:`dsrewrite_backend`, built afresh by every ``torch.compile(backend="dsrewrite")`` graph, shares one.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ..backends.fx import apply_decisions, set_submodule
from ..calib.run import as_batches
from ..config import COMPILERS, ROUTE_UNSUPPORTED, RewriteConfig
from ..plan.eligibility import why_not
from ..errors import DsrewriteError, first_line
from ..frontends.fx import bind_conv_args, collect_sites
from ..ir import ConvSite
from ..plan.planner import Decision, PlanInputs, plan_sites, selected
from ..plan.inputs import Planning
from ..report import Report, build_report
from .guards import Guarded, Watch, weight_getter
from .inputs import (GraphInputs, LiftedConv, Unlifted, conv_module_path, declare_params, hint, lift_convs,
                     source_text, source_text_of, unlift)
from .plans import Plan, PlanCache, clear_all, replay

__all__ = ["DsrewriteBackend", "dsrewrite_backend", "compile", "last_report", "clear_cache", "OPTIONS", "COMPILERS"]

OPTIONS = tuple(f.name for f in dataclasses.fields(RewriteConfig) if f.name not in ROUTE_UNSUPPORTED["torch.compile"])
_ENTRY_PLANS = PlanCache()  # the registered entry point's plans: torch.compile builds no backend object to own them
_LAST: List[Report] = []


# ---------------------------------------------------------------------------------------------- options
def _check_options(options: Dict[str, Any], base: Optional[RewriteConfig] = None) -> RewriteConfig:
    """The backend's :class:`~dsrewrite.config.RewriteConfig` (``options`` over ``base``), checked for this
    route; calibration data turned into batches. One-line :class:`DsrewriteError` otherwise."""
    cfg = RewriteConfig.build(base, options, route="torch.compile", words=" for the dsrewrite backend")
    _check_mode(cfg.mode)
    if cfg.calibration is not None and "calibration" in options:
        cfg = dataclasses.replace(cfg, calibration=as_batches(cfg.calibration))
    return cfg


def _check_mode(mode: Optional[str]) -> None:
    """Inductor's compile modes (``torch.compile`` refuses ``mode=`` next to ``options=``: give it as an option)."""
    if mode is None:
        return
    from torch._inductor import list_mode_options  # heavy: Inductor loads only to check a mode= option

    try:
        list_mode_options(mode)
    except (RuntimeError, KeyError):
        raise DsrewriteError(f"mode must be one of Inductor's modes (default, reduce-overhead, max-autotune, "
                             f"max-autotune-no-cudagraphs), got {mode!r}") from None


# ---------------------------------------------------------------------------------------------- calibration
class _BoundGraph(nn.Module):
    """The captured graph as a function of its one data input, the other inputs fixed at their compile-time
    values, so calibration can run it on batches. It shares the graph's conv modules (same hooks), under the
    names the sites have (``down_blocks.0.conv``: what patch statistics and teacher convs are looked up by), not
    their paths inside the graph."""

    def __init__(self, gm: fx.GraphModule, inputs: GraphInputs, sites: Sequence[ConvSite]) -> None:
        super().__init__()
        made: set = set()  # containers made here: names are only added under these
        for s in sites:
            if s.handle.kind == "module":
                _attach(self, s.spec.name, gm.get_submodule(s.handle.target), made)
        object.__setattr__(self, "_graph", gm)  # not a child: names stay those of the conv modules
        self._values, self._index = list(inputs.values), inputs.data[0]
        self._sizes = []  # (graph input, dim of the data input) for sizes Dynamo made symbolic
        data_src = source_text(inputs.placeholders[self._index])
        for j, node in enumerate(inputs.placeholders):
            src = getattr(node.meta.get("grapharg"), "source", None)
            if type(src).__name__ == "TensorPropertySource" and source_text_of(src.base) == data_src \
                    and getattr(src.prop, "name", "") == "SIZE":
                self._sizes.append((j, int(src.idx)))

    def forward(self, x: torch.Tensor) -> Any:
        args = list(self._values)
        args[self._index] = x
        for j, d in self._sizes:
            args[j] = x.shape[d]
        return self._graph(*args)


def _attach(root: nn.Module, name: str, module: nn.Module, made: set) -> None:
    """``module`` at the dotted ``name`` under ``root``, inside containers made for it; a name that collides
    with another (a prefix of it is a conv, an attribute of ``nn.Module``) is left out: its layer then calibrates
    on the original conv's output instead of the teacher's activations."""
    *prefix, last = name.split(".")
    parent = root
    try:
        for p in prefix:
            child = parent._modules.get(p)
            if child is None:
                child = nn.Module()
                parent.add_module(p, child)
                made.add(id(child))
            elif id(child) not in made:
                return
            parent = child
        if last not in parent._modules:
            parent.add_module(last, module)
    except (KeyError, TypeError):  # add_module refuses a name: empty, an attribute, a dot
        return


def _calibration_batches(batches: List[tuple], inputs: GraphInputs, bound: _BoundGraph) -> List[tuple]:
    """The batches as inputs of this graph: one tensor each, re-batched to the graph's batch size when it is static."""
    if len(inputs.data) != 1:
        raise DsrewriteError(f"calibration in the torch.compile backend needs a captured graph with one tensor input, "
                             f"this one has {len(inputs.data)}: use dsrewrite.rewrite(model, x, calibration=...)")
    example = inputs.values[inputs.data[0]]
    xs = [b[0] for b in batches]
    if any(not isinstance(x, torch.Tensor) or x.shape[1:] != example.shape[1:] for x in xs):
        bad = next(x for x in xs if not isinstance(x, torch.Tensor) or x.shape[1:] != example.shape[1:])
        raise DsrewriteError(f"calibration batches must be tensors shaped like the graph input [N, "
                             f"{', '.join(map(str, example.shape[1:]))}], got {list(getattr(bad, 'shape', []))}")
    if any(d == 0 for _, d in bound._sizes):
        return [(x,) for x in xs]
    n = example.shape[0]  # static batch: the graph only runs at this size
    chunks = [c for c in torch.cat(xs).split(n) if c.shape[0] == n]
    if not chunks:
        raise DsrewriteError(f"calibration has {sum(x.shape[0] for x in xs)} samples, fewer than the compiled "
                             f"batch size {n}")
    return [(c,) for c in chunks]


def _teacher(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph sharing its conv modules (apply_decisions will swap modules in ``gm`` only)."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


# ---------------------------------------------------------------------------------------------- one graph
class _CannotRewrite(Exception):
    """A captured graph the pass cannot read as a whole (it is compiled unchanged): the message says why."""


def _check_inference(sites: List[ConvSite], opts: RewriteConfig) -> None:
    if not torch.is_grad_enabled():
        return
    kinds = opts.layer_kinds()
    for s in sites:
        if s.weight is None or why_not(s.spec, kinds) or selected(s.spec.name, opts.include, opts.exclude):
            continue
        if s.weight.requires_grad or (s.bias is not None and s.bias.requires_grad):
            raise DsrewriteError(
                f"the dsrewrite backend is inference-only, but conv {s.spec.name!r} needs a gradient (grad enabled, "
                "weight requires grad): run under torch.no_grad() or torch.inference_mode(), or to train call "
                "dsrewrite.rewrite(model, x) and torch.compile the rewritten model")


def _propagate(gm: fx.GraphModule, values: List[Any]) -> int:
    """Output shapes on every node (fake tensors: no side effect on buffers) and the graph's FLOPs."""
    try:
        with FlopCounterMode(display=False) as counter:
            ShapeProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*values)
    except Exception as e:  # noqa: BLE001 - any failure: one line, the cause kept
        raise _CannotRewrite(f"cannot propagate shapes through the captured graph "
                             f"({first_line(e, 200, typed=True, cut_mark='...')})") from e
    return int(counter.get_total_flops())


def _plan_fresh(gm: fx.GraphModule, sites: List[ConvSite], inputs: GraphInputs, opts: RewriteConfig, flops: int,
                params: int, notes: List[str]) -> Tuple[List[Decision], bool]:
    """Plan with the shared middle (as rewrite() does, calibration included), write the pairs into ``gm``.

    A graph with no conv the options let the planner rewrite (one piece of a model Dynamo split at a graph break)
    is planned without the budget and calibration, which concern the other pieces: each conv gets its reason."""
    kinds = opts.layer_kinds()
    if not any(s.weight is not None and not why_not(s.spec, kinds)
               and not selected(s.spec.name, opts.include, opts.exclude) for s in sites):
        return plan_sites(sites, PlanInputs(rank="full", include=opts.include, exclude=opts.exclude, kinds=kinds)), False
    teacher = student = None
    batches = None
    if opts.calibration is not None:
        teacher = _BoundGraph(_teacher(gm), inputs, sites)
        batches = _calibration_batches(opts.calibration, inputs, teacher)
    planning = Planning(teacher if teacher is not None else gm, (inputs.values[inputs.data[0]],) if batches else (),
                        dataclasses.replace(opts, calibration=batches))
    plan_inputs = planning.inputs.of_whole_model(flops, params)
    decisions = plan_sites(sites, plan_inputs, notes)  # a budget not met says so in this graph's report
    apply_decisions(gm, decisions, backend=opts.backend)
    for d in decisions:
        if d.rewritten and d.site.handle.kind == "module":
            d.module.requires_grad_(False)
    notes.extend(planning.notes)
    if batches is not None:
        student = _BoundGraph(gm, inputs, sites)
        notes.append(planning.calibrate(student, decisions))
    return decisions, batches is not None


def _inner_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: str, mode: Optional[str]) -> Callable:
    if compiler == "eager":
        return gm.forward
    # heavy: Inductor loads only when a graph is compiled with it
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    return compile_fx(gm, list(example_inputs), config_patches=patches)


def _compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: RewriteConfig, mode: Optional[str],
                   plans: PlanCache, reports: List[Report]) -> Callable:
    """Rewrite ``gm`` (:func:`_rewrite_graph`) and compile it; guard the rewritten weights on every call.

    The pass never fails the user's compile for a reason of its own: if it raises (a bug, a graph it cannot read)
    or the compiler refuses the rewritten graph, ``gm`` is put back as Dynamo captured it and compiled unchanged,
    with one warning naming the cause (also the report's note). :class:`DsrewriteError`, the user's own mistake
    (inference only, calibration data that does not fit the graph, a budget no plan meets), still propagates, as
    does the compiler's error on the captured graph itself.
    """
    saved = _Saved(gm)
    try:
        gm.graph = _copy_graph(saved.graph)  # the pass edits a copy: the captured graph stays whole for a fallback
        rewritten = _rewrite_graph(gm, example_inputs, opts, plans)
    except DsrewriteError:
        saved.restore(gm)
        raise
    except _CannotRewrite as e:
        return _unchanged(gm, saved, example_inputs, opts, mode, reports, str(e))
    except Exception as e:  # noqa: BLE001 - a failure of the pass must not fail the user's compile
        return _unchanged(gm, saved, example_inputs, opts, mode, reports, f"the pass failed ({_cause(e)})")
    try:
        inner = _inner_compiler(gm, example_inputs, opts.compiler, mode)
    except Exception as e:  # noqa: BLE001 - the captured graph may still compile: try it before giving up
        return _unchanged(gm, saved, example_inputs, opts, mode, reports,
                          f"{opts.compiler} could not compile the rewritten graph ({_cause(e)})")
    if rewritten.store:  # (a functional conv on a graph attribute would be rewritten afresh at each compile)
        plans.store(rewritten.plan)
    reports.append(rewritten.report)
    _LAST[:] = [rewritten.report]
    frozen = opts.compiler == "inductor" and bool(torch._inductor.config.freezing)
    return Guarded(inner, rewritten.plan.weights, rewritten.watches, frozen)


@dataclasses.dataclass
class _Rewritten:
    """What :func:`_rewrite_graph` made of a graph: its plan, whether to cache it, the report, the weight watches."""

    decisions: List[Decision]
    plan: Plan
    store: bool
    report: Report
    watches: List[Watch]


def _rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: RewriteConfig,
                   plans: PlanCache) -> _Rewritten:
    """Lift, plan (or reuse a plan from ``plans``), rewrite, restore the dense convs, report: ``gm`` edited in place."""
    inputs = GraphInputs.of(gm, example_inputs)
    flops = _propagate(gm, inputs.values)
    params = inputs.param_count() + sum(p.numel() for p in gm.parameters())
    lifted, unlifted = lift_convs(gm, inputs)
    sites = collect_sites(gm)
    _name_sites(sites, lifted, unlifted)
    _check_inference(sites, opts)
    notes: List[str] = []
    options_key, keep = opts.plan_key()
    plan = plans.find(options_key, sites)
    store = False
    if plan is not None:
        decisions = replay(plan, sites)
        for d, m in zip(decisions, plan.modules):
            if m is not None:
                set_submodule(gm, d.site.handle.target, m)
        notes.append("recompile: ranks and factors reused from an earlier compile (same weights), not refactorised")
    else:
        decisions, calibrated = _plan_fresh(gm, sites, inputs, opts, flops, params, notes)
        plan = Plan.of(decisions, sites, options_key, keep, calibrated)
        store = all(m is not None or not d.rewritten for d, m in zip(decisions, plan.modules))
    unlift(gm, lifted, {d.site.handle.target for d in decisions if d.rewritten})
    declare_params(gm)
    report = _report(decisions, inputs, opts, gm, flops, params, notes)
    watches = [Watch(i, d.site.spec.name, weight_getter(d.site, lifted)) for i, d in enumerate(decisions)
               if d.rewritten and plan.modules[i] is not None]
    return _Rewritten(decisions, plan, store, report, watches)


def _name_sites(sites: List[ConvSite], lifted: Dict[str, LiftedConv], unlifted: Dict[fx.Node, Unlifted]) -> None:
    """Lifted convs take the names rewrite() gives them; a conv on a parameter that lifting left as captured
    takes its name too, and lifting's reason (the fx frontend, seeing a graph input, would blame the weight)."""
    for s in sites:
        if s.handle.target in lifted:
            s.spec.name = lifted[s.handle.target].name
        elif s.handle.kind == "function" and s.handle.nodes:
            left = unlifted.get(bind_conv_args(s.handle.nodes[0]).get("weight"))
            if left is not None:
                s.spec.name = left.name
                s.spec.extra["unsupported"] = left.reason
                s.weight = None
            elif s.handle.weight_target is None:  # a weight computed in the graph (a parametrized conv module...)
                s.spec.name = conv_module_path(s.handle.nodes[0]) or s.spec.name


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose nodes keep what Dynamo set on them besides ``meta`` (``_dynamo_source`` on each
    placeholder: AOT autograd reads it)."""
    new = copy.deepcopy(graph)
    for old, node in zip(graph.nodes, new.nodes):
        for k, v in vars(old).items():
            if k not in vars(node):
                setattr(node, k, v)
    return new


class _Saved:
    """What the pass may change in a captured GraphModule: its graph, the module and parameter tables of every
    module under it, the parameter sources AOT autograd reads. :meth:`restore` puts them back."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.graph = gm.graph
        self.tables = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers))
                       for m in {id(m): m for m in gm.modules()}.values()]
        table = getattr(gm, "_param_name_to_source", None)
        self.sources = dict(table) if isinstance(table, dict) else None

    def restore(self, gm: fx.GraphModule) -> None:
        for m, modules, parameters, buffers in self.tables:
            for now, then in ((m._modules, modules), (m._parameters, parameters), (m._buffers, buffers)):
                if now.keys() != then.keys() or any(now[k] is not v for k, v in then.items()):
                    now.clear()
                    now.update(then)
        if self.sources is not None:
            gm._param_name_to_source.clear()
            gm._param_name_to_source.update(self.sources)
        gm.graph = self.graph  # also recompiles gm's forward


def _cause(e: BaseException) -> str:
    """An exception as a short phrase for the warning: its type, first line and where dsrewrite raised it."""
    where = ""
    tb = e.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/dsrewrite/" in path:
            where = f" in {path.rsplit('/dsrewrite/', 1)[1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    return first_line(e, 200, typed=True, cut_mark="...") + where


def _unchanged(gm: fx.GraphModule, saved: _Saved, example_inputs: Sequence[Any], opts: RewriteConfig,
               mode: Optional[str], reports: List[Report], why: str) -> Callable:
    """``gm`` as Dynamo captured it, compiled without rewriting; one warning and a report that say why. If the
    compiler refuses the captured graph too, its error is the user's, as without dsrewrite: no warning then."""
    saved.restore(gm)
    compiled = _inner_compiler(gm, example_inputs, opts.compiler, mode)
    name = _graph_name(gm, opts)
    warnings.warn(f"dsrewrite: {name} compiled without rewriting its convs: {why}", stacklevel=2)
    try:
        params = sum(t.numel() for t in {id(a): a for a in example_inputs if isinstance(a, nn.Parameter)}.values())
        shapes = [[int(hint(d)) for d in a.shape] for a in example_inputs
                  if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)]
    except Exception:  # noqa: BLE001 - the report's counts are best effort here
        params, shapes = 0, []
    report = build_report([], model=name, route="torch.compile", input_shapes=shapes, params_before=params,
                          flops_before=0, notes=[f"not rewritten, compiled unchanged: {why}"])
    report.notes = report.notes[:1]  # not "no convolution found": the graph was not looked at
    reports.append(report)
    _LAST[:] = [report]
    return compiled


def _graph_name(gm: fx.GraphModule, opts: RewriteConfig) -> str:
    cid = gm.meta.get("dynamo_compile_id")
    return opts.name or f"torch.compile graph {cid if cid is not None else ''}".strip()


def _report(decisions: List[Decision], inputs: GraphInputs, opts: RewriteConfig, gm: fx.GraphModule, flops: int,
            params: int, notes: List[str]) -> Report:
    """The graph's report: per-layer decisions, FLOPs and parameters before and after, the notes."""
    name = _graph_name(gm, opts)
    if any(d.rewritten for d in decisions):
        notes.insert(0, "factors computed at compile time from the weights Dynamo passed as graph inputs; every call "
                        "checks them and refactorises (same rank) a weight changed since")
    return build_report([d.report for d in decisions], model=name, route="torch.compile",
                        input_shapes=inputs.data_shapes(), params_before=params, flops_before=flops, notes=notes)


# ---------------------------------------------------------------------------------------------- the backend
class DsrewriteBackend:
    """A Dynamo backend ``(gm, example_inputs) -> callable`` with fixed rewrite options (checked here, at once).

    Args:
        **options: those of :func:`dsrewrite.rewrite`: ``rank``, ``include``, ``exclude``, ``kinds``, ``backend``,
            ``target_flops``, ``target_params``, ``energy``, ``calibration``, ``ragged``, ``progress``, ``name``; plus
            ``compiler``: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph as is), and ``mode``:
            Inductor's mode (``"max-autotune"``, ...; ``torch.compile`` takes no ``mode=`` next to ``options=``).

    ``reports`` holds one :class:`~dsrewrite.report.Report` per compiled graph, recompiles included; ``plans`` the
    backend's own :class:`~dsrewrite.dynamo.plans.PlanCache`, from which recompiles reuse ranks and factors.
    """

    def __init__(self, **options: Any) -> None:
        self.options = _check_options(options)
        self.reports: List[Report] = []
        self.plans = PlanCache()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
                 options: Optional[Dict[str, Any]] = None) -> Callable:
        opts = self.options if not options else _check_options(options, self.options)
        if mode not in (None, "default") and opts.mode not in (None, mode):
            raise DsrewriteError(f"two compile modes given: mode={mode!r} and the option mode={opts.mode!r}")
        mode = opts.mode if mode in (None, "default") else mode
        return _compile_graph(gm, example_inputs, opts, mode, self.plans, self.reports)


def clear_cache() -> None:
    """Forget cached plans (ranks and factors) of every backend: the next compile factorises again."""
    clear_all()


def dsrewrite_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
                      options: Optional[Dict[str, Any]] = None) -> Callable:
    """``torch.compile(model, backend="dsrewrite", options={...})``: the registered entry point.

    ``options`` are :class:`DsrewriteBackend`'s; the report of the latest graph is :func:`last_report`. Each call
    builds a backend for this graph; they share the entry point's plan cache (keyed by options and weights), so a
    recompile reuses the factors.
    """
    backend = DsrewriteBackend(**(options or {}))
    backend.plans = _ENTRY_PLANS
    return backend(gm, example_inputs, mode=mode)


dsrewrite_backend.reset = clear_cache  # type: ignore[attr-defined] - torch.compile's reset hook


def last_report() -> Optional[Report]:
    """The report of the graph the dsrewrite backend compiled last (any caller), or ``None``."""
    return _LAST[0] if _LAST else None


def compile(model: Callable, *, mode: Optional[str] = None, dynamic: Optional[bool] = None,  # noqa: A001
            fullgraph: bool = False, **options: Any) -> Callable:
    """``torch.compile(model, backend=DsrewriteBackend(**options), mode=..., ...)`` with the reports attached.

    Options are checked now. The result is what ``torch.compile`` returns, with ``.dsrewrite_reports``: one
    :class:`~dsrewrite.report.Report` per compiled graph (filled on the first call). ``mode`` (e.g.
    ``"max-autotune"``) goes to Inductor. Inference only: see :mod:`dsrewrite.dynamo.backend`.
    """
    _check_mode(mode)
    backend = DsrewriteBackend(**options)
    compiled = torch.compile(model, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    if isinstance(compiled, nn.Module):  # OptimizedModule forwards setattr to the user's model: bypass it
        object.__setattr__(compiled, "dsrewrite_reports", backend.reports)
    else:
        compiled.dsrewrite_reports = backend.reports
    return compiled
