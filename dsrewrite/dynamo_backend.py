"""``torch.compile`` backend: rewrite the captured graph's convs into separable pairs, then compile with Inductor.

``torch.compile(model, backend="dsrewrite", options={...})`` (registered through the ``torch_dynamo_backends``
entry point: no import needed) and ``dsrewrite.compile(model, **options)`` run the same
:class:`DsrewriteBackend`. Its options are :func:`dsrewrite.rewrite`'s (rank, include/exclude, budgets, energy,
calibration) and go through the same frontend, planner and factorisation, so ranks and factors equal
``rewrite()``'s.

Dynamo lifts parameters to graph inputs. Each functional conv whose weight is such an input is turned into a
conv module holding that very parameter, under its module path (the name ``rewrite()`` reports), so the shared
fx frontend, planner and backend (:func:`~dsrewrite.frontends.fx.collect_sites`,
:func:`~dsrewrite.pipeline.plan_sites`, :func:`~dsrewrite.backends.fx.apply_decisions`) do the rewrite; convs
left dense go back to reading their graph input, so the rest of the graph is untouched.

Factors come from the weights seen at compile time (the report says so). They are cached by weight identity
and version counter: a recompile (a new batch size) reuses them. Parameters being graph inputs, Dynamo does
not recompile when a weight changes, so every call checks the rewritten weights' version counters and data
pointers (a few attribute reads) and refactorises a changed one at the same rank. Inference only: with grad
enabled and weights requiring grad the backend refuses, as the original weights would silently get no gradient.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from .backends.fx import apply_decisions, set_submodule
from .config import COMPILERS, ROUTE_UNSUPPORTED, RewriteConfig
from .eligibility import why_not
from .errors import DsrewriteError, first_line
from .factorize import Factors, factorize
from .frontends.fx import _CONV_ARGS, CONV_FUNCTIONS, collect_sites
from .ir import ConvSite
from .pipeline import Decision, layer_report, plan_sites, selected
from .planning import Planning
from .report import Report

__all__ = ["DsrewriteBackend", "dsrewrite_backend", "compile", "last_report", "clear_cache", "OPTIONS", "COMPILERS"]

OPTIONS = tuple(f.name for f in dataclasses.fields(RewriteConfig) if f.name not in ROUTE_UNSUPPORTED["torch.compile"])
_NS = "dsrewrite_convs"  # where lifted and rewritten conv modules live inside the captured GraphModule
_STATE_ATTRS = {"_modules", "_parameters", "_buffers"}
_PLANS: "OrderedDict[int, _Plan]" = OrderedDict()  # recent plans, for recompiles of the same graph
_MAX_PLANS = 16
_LAST: List[Report] = []


# ---------------------------------------------------------------------------------------------- options
def _check_options(options: Dict[str, Any], base: Optional[RewriteConfig] = None) -> RewriteConfig:
    """The backend's :class:`~dsrewrite.config.RewriteConfig` (``options`` over ``base``), checked for this
    route; calibration data turned into batches. One-line :class:`DsrewriteError` otherwise."""
    cfg = RewriteConfig.build(base, options, route="torch.compile", words=" for the dsrewrite backend")
    _check_mode(cfg.mode)
    if cfg.calibration is not None and "calibration" in options:
        from .calibrate import as_batches

        cfg = dataclasses.replace(cfg, calibration=as_batches(cfg.calibration))
    return cfg


def _check_mode(mode: Optional[str]) -> None:
    """Inductor's compile modes (``torch.compile`` refuses ``mode=`` next to ``options=``: give it as an option)."""
    if mode is None:
        return
    from torch._inductor import list_mode_options

    try:
        list_mode_options(mode)
    except (RuntimeError, KeyError):
        raise DsrewriteError(f"mode must be one of Inductor's modes (default, reduce-overhead, max-autotune, "
                             f"max-autotune-no-cudagraphs), got {mode!r}") from None


# ---------------------------------------------------------------------------------------------- graph inputs
def _hint(a: Any) -> Any:
    """A concrete value for a graph input: SymInts become their hint (no guard is added)."""
    if isinstance(a, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return optimization_hint(a)
    return a


def _source_text_of(src: Any) -> str:
    """A Dynamo source as text, e.g. ``L['self']._modules['conv1']._parameters['weight']``."""
    name = src.name
    return name() if callable(name) else str(name)  # a method in older torch, a property in newer


def _source_text(node: fx.Node) -> str:
    src = getattr(node.meta.get("grapharg"), "source", None)
    return "" if src is None else _source_text_of(src)


def _source_path(text: str) -> Optional[str]:
    """``L['self']._modules['conv1']._parameters['weight']`` -> ``conv1.weight`` (the root local dropped)."""
    parts = [a or b or c for a, b, c in re.findall(r"\['([^']*)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]", text)]
    parts = [p for p in parts[1:] if p not in _STATE_ATTRS]
    return ".".join(parts) or None


@dataclass
class _Inputs:
    """The captured graph's inputs: which are parameters (with their module path), which are data."""

    placeholders: List[fx.Node]
    values: List[Any]
    params: Dict[fx.Node, Tuple[int, nn.Parameter, str]]  # placeholder -> (index, parameter, module path)
    data: List[int]  # tensor inputs that are neither parameters nor buffers

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> "_Inputs":
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = [_hint(a) for a in example_inputs]
        params, data = {}, []
        for i, (node, v) in enumerate(zip(ph, values)):
            if isinstance(v, nn.Parameter):
                params[node] = (i, v, _source_path(_source_text(node)) or node.name)
            elif isinstance(v, torch.Tensor) and "._buffers[" not in _source_text(node):
                data.append(i)
        return cls(ph, values, params, data)

    def data_shapes(self) -> List[List[int]]:
        return [[int(_hint(s)) for s in self.values[i].shape] for i in self.data]


# ---------------------------------------------------------------------------------------------- lifting
@dataclass
class _Lifted:
    """A functional conv on a parameter input, turned into a conv module for planning; ``calls`` restore it."""

    path: str  # module path inside the GraphModule
    name: str  # the name rewrite() gives it (report, include/exclude)
    weight_index: int
    bias_index: Optional[int]
    calls: Dict[fx.Node, Tuple[Any, tuple, dict]] = field(default_factory=dict)  # call_module -> original call


def _has_node(v: Any) -> bool:
    return isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and any(isinstance(x, fx.Node) for x in v))


def _conv_module(dims: int, weight: nn.Parameter, bias: Optional[nn.Parameter], hyper: dict) -> nn.Module:
    """An ``nn.Conv*d`` holding ``weight``/``bias`` themselves (built on the meta device: nothing is copied)."""
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    cout, cin_g = weight.shape[:2]
    g = int(hyper["groups"])
    conv = cls(cin_g * g, cout, tuple(weight.shape[2:]), stride=hyper["stride"], padding=hyper["padding"],
               dilation=hyper["dilation"], groups=g, bias=False, device="meta")
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    return conv


def _free_path(gm: nn.Module, name: str) -> str:
    path, i = f"{_NS}.{name}", 1
    while True:
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        i += 1
        path = f"{_NS}.{name}_{i}"


def _lift_convs(gm: fx.GraphModule, inputs: _Inputs) -> Dict[str, _Lifted]:
    """Turn ``conv(x, <parameter input>, ...)`` calls into ``call_module`` of a conv holding that parameter.

    A weight used by several calls with the same settings becomes one module called several times (as a shared
    module in ``rewrite()``); anything else (settings computed at run time, a bias that is not a parameter,
    one weight under different settings) is left for the fx frontend to report.
    """
    groups: "OrderedDict[fx.Node, List[Tuple[fx.Node, dict]]]" = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in CONV_FUNCTIONS:
            bound = dict(zip(_CONV_ARGS, node.args))
            bound.update(node.kwargs)
            if bound.get("weight") in inputs.params and "input" in bound:
                groups.setdefault(bound["weight"], []).append((node, bound))
    lifted: Dict[str, _Lifted] = {}
    for w_node, calls in groups.items():
        node0, b0 = calls[0]
        hyper = {k: b0.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}
        b_node = b0.get("bias")
        if (any(_has_node(v) for v in hyper.values()) or (b_node is not None and b_node not in inputs.params)
                or any({k: b.get(k, hyper[k]) for k in hyper} != hyper or b.get("bias") is not b_node
                       or n.target is not node0.target for n, b in calls[1:])):
            continue
        w_index, weight, fqn = inputs.params[w_node]
        b_index, bias = (inputs.params[b_node][:2]) if b_node is not None else (None, None)
        try:
            module = _conv_module(CONV_FUNCTIONS[node0.target], weight, bias, hyper)
        except (ValueError, TypeError, RuntimeError):
            continue
        name = fqn.rsplit(".", 1)[0] if "." in fqn else fqn  # the owner module, as rewrite() names it
        path = _free_path(gm, name)
        gm.add_submodule(path, module)
        item = _Lifted(path, name, w_index, b_index)
        for node, _ in calls:  # node.args now, not `bound`: earlier lifts replaced some inputs
            x = node.args[0] if node.args else node.kwargs["input"]
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(path, (x,))
            call.meta.update(node.meta)
            item.calls[call] = (node.target, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        lifted[path] = item
    return lifted


def _unlift(gm: fx.GraphModule, lifted: Dict[str, _Lifted], rewritten: set) -> None:
    """Convs left dense read their graph inputs again, exactly as Dynamo captured them."""
    for path, item in lifted.items():
        if path in rewritten:
            continue
        for call, (target, args, kwargs) in item.calls.items():
            x = call.args[0]  # the input as it is now (a later lift may have replaced the captured one)
            args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input": x})
            with gm.graph.inserting_before(call):
                node = gm.graph.call_function(target, args, kwargs)
            node.meta.update(call.meta)
            call.replace_all_uses_with(node)
            gm.graph.erase_node(call)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _declare_params(gm: fx.GraphModule) -> None:
    """Give the factors (and ragged pairs' channel index buffers) a Dynamo source. AOT autograd (under Inductor)
    looks up the source of every parameter and buffer of a Dynamo graph module (guards, cudagraph static
    inputs); the factors have none in user code."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, _ in named:
        if name not in table:
            table[name] = ConstantSource(f"__dsrewrite_{name.replace('.', '_')}")


# ---------------------------------------------------------------------------------------------- plans
def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: the data pointer still guards
        return -1


class _Snap:
    """Identity, storage and version of a tensor when it was factorised."""

    __slots__ = ("ref", "ptr", "version")

    def __init__(self, t: Optional[torch.Tensor]) -> None:
        self.ref = None if t is None else weakref.ref(t)
        self.ptr = None if t is None else t.data_ptr()
        self.version = None if t is None else _version(t)

    def same(self, t: Optional[torch.Tensor]) -> bool:
        if t is None or self.ref is None:
            return t is None and self.ref is None
        return self.ref() is t and t.data_ptr() == self.ptr and _version(t) == self.version


@dataclass
class _Plan:
    """Ranks and factors of one graph's convs. Recompiles of the graph (new shapes) reuse them while every
    conv weight is the same tensor, unchanged; the separable modules are shared by those compiled graphs."""

    options_key: tuple
    names: Tuple[str, ...]
    snaps: List[Tuple[_Snap, _Snap]]  # per site: weight, bias
    layers: List[Tuple[Any, Optional[Factors]]]  # per site: its first LayerReport, factors (views of the module's)
    modules: List[Optional[nn.Module]]  # per site: the separable module, or None
    calibrated: bool
    keep: list  # objects whose id() is in options_key
    warned: bool = False

    def matches(self, options_key: tuple, sites: List[ConvSite]) -> bool:
        return (self.options_key == options_key and self.names == tuple(s.spec.name for s in sites)
                and all(w.same(s.weight) and b.same(s.bias) for (w, b), s in zip(self.snaps, sites)))

    def refresh(self, i: int, weight: torch.Tensor, bias: Optional[torch.Tensor], name: str, frozen: bool) -> None:
        """Refactorise site ``i`` from its new weight at the same rank, in place (the compiled code reads it)."""
        if self.calibrated:
            raise DsrewriteError(f"the weight of conv {name!r} changed after compile and its factors were calibrated "
                                 "on data: call torch._dynamo.reset() and run again to recompile and recalibrate")
        if frozen:
            raise DsrewriteError(f"the weight of conv {name!r} changed after compile, but Inductor froze the factors "
                                 "(torch._inductor.config.freezing): call torch._dynamo.reset() and run again")
        sep = self.modules[i]
        sep.load_factors(factorize(weight, sep.rank, bias, ragged=sep.ragged))
        self.snaps[i] = (_Snap(weight), _Snap(bias))
        if not self.warned:
            self.warned = True
            warnings.warn(f"dsrewrite: conv weights changed since compile (first: {name!r}); their factors were "
                          "recomputed at the compiled ranks", stacklevel=3)


def _find_plan(options_key: tuple, sites: List[ConvSite]) -> Optional[_Plan]:
    for k, plan in reversed(_PLANS.items()):
        if plan.matches(options_key, sites):
            _PLANS.move_to_end(k)
            return plan
    return None


def _store_plan(plan: _Plan) -> None:
    _PLANS[id(plan)] = plan
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)


def clear_cache() -> None:
    """Forget cached plans (ranks and factors): the next compile factorises again."""
    _PLANS.clear()


# ---------------------------------------------------------------------------------------------- calibration
class _BoundGraph(nn.Module):
    """The captured graph as a function of its one data input, the other inputs fixed at their compile-time
    values, so calibration can run it on batches. It shares the graph's conv modules (same names, same hooks)."""

    def __init__(self, gm: fx.GraphModule, inputs: _Inputs) -> None:
        super().__init__()
        if hasattr(gm, _NS):
            for k, m in getattr(gm, _NS)._modules.items():
                self.add_module(k, m)
        object.__setattr__(self, "_graph", gm)  # not a child: names stay those of the conv modules
        self._values, self._index = list(inputs.values), inputs.data[0]
        self._sizes = []  # (graph input, dim of the data input) for sizes Dynamo made symbolic
        data_src = _source_text(inputs.placeholders[self._index])
        for j, node in enumerate(inputs.placeholders):
            src = getattr(node.meta.get("grapharg"), "source", None)
            if type(src).__name__ == "TensorPropertySource" and _source_text_of(src.base) == data_src \
                    and getattr(src.prop, "name", "") == "SIZE":
                self._sizes.append((j, int(src.idx)))

    def forward(self, x: torch.Tensor) -> Any:
        args = list(self._values)
        args[self._index] = x
        for j, d in self._sizes:
            args[j] = x.shape[d]
        return self._graph(*args)


def _calibration_batches(batches: List[tuple], inputs: _Inputs, bound: _BoundGraph) -> List[tuple]:
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


# ---------------------------------------------------------------------------------------------- the backend
@dataclass
class _Watch:
    """A rewritten conv: where its weight and bias come from on each call, and its site in the plan."""

    site: int
    name: str
    get: Callable[[tuple], Tuple[torch.Tensor, Optional[torch.Tensor]]]


class _Guarded:
    """The compiled graph, preceded by the check that the rewritten weights are those that were factorised."""

    def __init__(self, inner: Callable, plan: _Plan, watches: List[_Watch], frozen: bool) -> None:
        self.inner, self.plan, self.watches, self.frozen = inner, plan, watches, frozen

    def __call__(self, *args: Any) -> Any:
        snaps = self.plan.snaps
        for w in self.watches:
            weight, bias = w.get(args)
            ws, bs = snaps[w.site]
            if not (ws.same(weight) and bs.same(bias)):
                self.plan.refresh(w.site, weight, bias, w.name, self.frozen)
        return self.inner(*args)


def _getter(site: ConvSite, lifted: Dict[str, _Lifted]) -> Callable[[tuple], tuple]:
    item = lifted.get(site.handle.target)
    if item is not None:  # the weight is a graph input: read what this call passes
        wi, bi = item.weight_index, item.bias_index
        return lambda args: (args[wi], None if bi is None else args[bi])
    conv = site.handle.module  # a conv module or parameter attribute of the graph itself
    if conv is not None:
        return lambda args: (conv.weight, conv.bias)
    w, b = site.weight, site.bias
    return lambda args: (w, b)


def _check_inference(sites: List[ConvSite], opts: RewriteConfig) -> None:
    if not torch.is_grad_enabled():
        return
    for s in sites:
        if s.weight is None or why_not(s.spec) or selected(s.spec.name, opts.include, opts.exclude):
            continue
        if s.weight.requires_grad or (s.bias is not None and s.bias.requires_grad):
            raise DsrewriteError(
                f"the dsrewrite backend is inference-only, but conv {s.spec.name!r} needs a gradient (grad enabled, "
                "weight requires grad): run under torch.no_grad() or torch.inference_mode(), or to train call "
                "dsrewrite.rewrite(model, x) and torch.compile the rewritten model")


def _propagate(gm: fx.GraphModule, values: List[Any]) -> int:
    """Output shapes on every node (fake tensors: no side effect on buffers) and the graph's FLOPs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FlopCounterMode(display=False) as counter:
            ShapeProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*values)
    except Exception as e:  # noqa: BLE001 - any failure: one line, the cause kept
        raise DsrewriteError(f"cannot propagate shapes through the captured graph: {first_line(e, 200)}") from e
    return int(counter.get_total_flops())


def _replay(plan: _Plan, sites: List[ConvSite]) -> List[Decision]:
    """The plan's decisions on this graph's sites (new shapes, so new FLOPs), without factorising."""
    decisions = []
    for s, (old, f) in zip(sites, plan.layers):
        if f is not None:
            rep = layer_report(s.spec, rank=f.rank, factors=f, policy=old.policy)
        else:
            rep = layer_report(s.spec, reason=old.reason, policy=old.policy)
        rep.note, rep.gather_input = old.note, old.gather_input
        rep.calib_error_before, rep.calib_error_after = old.calib_error_before, old.calib_error_after
        decisions.append(Decision(s, rep, f))
    return decisions


def _teacher(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph sharing its conv modules (apply_decisions will swap modules in ``gm`` only)."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


def _plan_fresh(gm: fx.GraphModule, sites: List[ConvSite], inputs: _Inputs, opts: RewriteConfig, flops: int,
                params: int, notes: List[str]) -> Tuple[List[Decision], bool]:
    """Plan with the shared middle (as rewrite() does, calibration included), write the pairs into ``gm``."""
    teacher = student = None
    batches = None
    if opts.calibration is not None:
        teacher = _BoundGraph(_teacher(gm), inputs)
        batches = _calibration_batches(opts.calibration, inputs, teacher)
    planning = Planning(teacher if teacher is not None else gm, (inputs.values[inputs.data[0]],) if batches else (),
                        dataclasses.replace(opts, calibration=batches))
    kw = dict(planning.kwargs, total_flops=flops, total_params=params)
    decisions = plan_sites(sites, opts.rank, opts.include, opts.exclude, progress=opts.progress, **kw)
    apply_decisions(gm, decisions, backend=opts.backend)
    for d in decisions:
        if d.rewritten and d.site.handle.kind == "module":
            d.module.requires_grad_(False)
    notes.extend(planning.notes)
    if batches is not None:
        student = _BoundGraph(gm, inputs)
        notes.append(planning.calibrate(student, decisions))
    return decisions, batches is not None


def _inner_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: str, mode: Optional[str]) -> Callable:
    if compiler == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    return compile_fx(gm, list(example_inputs), config_patches=patches)


def _new_plan(decisions: List[Decision], sites: List[ConvSite], gm: fx.GraphModule, options_key: tuple, keep: list,
              calibrated: bool) -> _Plan:
    """Remember what was decided, with factors that are views of the modules' tensors (what the graph runs)."""
    modules, layers = [], []
    for d in decisions:
        m = d.module if d.rewritten and d.site.handle.kind == "module" else None
        f = None if m is None else m.factors(d.factors.error)
        modules.append(m)
        layers.append((d.report, f))
    plan = _Plan(options_key, tuple(s.spec.name for s in sites), [(_Snap(s.weight), _Snap(s.bias)) for s in sites],
                 layers, modules, calibrated, keep)
    if all(m is not None or not d.rewritten for d, m in zip(decisions, modules)):
        _store_plan(plan)  # (a functional conv on a graph attribute would be rewritten afresh at each compile)
    return plan


def _compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: RewriteConfig, mode: Optional[str],
                   reports: List[Report]) -> Callable:
    """Lift, plan (or reuse a plan), rewrite, restore the dense convs, report, compile, guard."""
    inputs = _Inputs.of(gm, example_inputs)
    flops = _propagate(gm, inputs.values)
    params = sum(p.numel() for p in {id(v[1]): v[1] for v in inputs.params.values()}.values())
    params += sum(p.numel() for p in gm.parameters())
    lifted = _lift_convs(gm, inputs)
    sites = collect_sites(gm)
    for s in sites:
        if s.handle.target in lifted:
            s.spec.name = lifted[s.handle.target].name
    _check_inference(sites, opts)
    notes: List[str] = []
    options_key, keep = opts.plan_key()
    plan = _find_plan(options_key, sites)
    if plan is not None:
        decisions = _replay(plan, sites)
        for d, m in zip(decisions, plan.modules):
            if m is not None:
                set_submodule(gm, d.site.handle.target, m)
        notes.append("recompile: ranks and factors reused from an earlier compile (same weights), not refactorised")
    else:
        decisions, calibrated = _plan_fresh(gm, sites, inputs, opts, flops, params, notes)
        plan = _new_plan(decisions, sites, gm, options_key, keep, calibrated)
    _unlift(gm, lifted, {d.site.handle.target for d in decisions if d.rewritten})
    _declare_params(gm)
    report = _report(decisions, inputs, opts, gm, flops, params, notes)
    reports.append(report)
    _LAST[:] = [report]
    watches = [_Watch(i, d.site.spec.name, _getter(d.site, lifted)) for i, d in enumerate(decisions)
               if d.rewritten and plan.modules[i] is not None]
    inner = _inner_compiler(gm, example_inputs, opts.compiler, mode)
    frozen = opts.compiler == "inductor" and bool(torch._inductor.config.freezing)
    return _Guarded(inner, plan, watches, frozen)


def _report(decisions: List[Decision], inputs: _Inputs, opts: RewriteConfig, gm: fx.GraphModule, flops: int,
            params: int, notes: List[str]) -> Report:
    layers = [d.report for d in decisions]
    saved_f = sum(L.flops_before - L.flops_after for L in layers if L.rewritten)
    saved_p = sum(L.params_before - L.params_after for L in layers if L.rewritten)
    cid = gm.meta.get("dynamo_compile_id")
    name = opts.name or f"torch.compile graph {cid if cid is not None else ''}".strip()
    report = Report(layers=layers, model=name,
                    route="torch.compile", input_shapes=inputs.data_shapes(), params_before=params,
                    params_after=params - saved_p, flops_before=flops, flops_after=flops - saved_f, notes=notes)
    if report.rewritten:
        notes.insert(0, "factors computed at compile time from the weights Dynamo passed as graph inputs; every call "
                        "checks them and refactorises (same rank) a weight changed since")
    report.add_outcome_notes()
    return report


class DsrewriteBackend:
    """A Dynamo backend ``(gm, example_inputs) -> callable`` with fixed rewrite options (checked here, at once).

    Args:
        **options: those of :func:`dsrewrite.rewrite`: ``rank``, ``include``, ``exclude``, ``backend``,
            ``target_flops``, ``target_params``, ``energy``, ``calibration``, ``ragged``, ``progress``, ``name``; plus
            ``compiler``: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph as is), and ``mode``:
            Inductor's mode (``"max-autotune"``, ...; ``torch.compile`` takes no ``mode=`` next to ``options=``).

    ``reports`` holds one :class:`~dsrewrite.report.Report` per compiled graph, recompiles included.
    """

    def __init__(self, **options: Any) -> None:
        self.options = _check_options(options)
        self.reports: List[Report] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
                 options: Optional[Dict[str, Any]] = None) -> Callable:
        opts = self.options if not options else _check_options(options, self.options)
        if mode not in (None, "default") and opts.mode not in (None, mode):
            raise DsrewriteError(f"two compile modes given: mode={mode!r} and the option mode={opts.mode!r}")
        mode = opts.mode if mode in (None, "default") else mode
        return _compile_graph(gm, example_inputs, opts, mode, self.reports)


def dsrewrite_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
                      options: Optional[Dict[str, Any]] = None) -> Callable:
    """``torch.compile(model, backend="dsrewrite", options={...})``: the registered entry point.

    ``options`` are :class:`DsrewriteBackend`'s; the report of the latest graph is :func:`last_report`.
    """
    return DsrewriteBackend(**(options or {}))(gm, example_inputs, mode=mode)


dsrewrite_backend.reset = clear_cache  # type: ignore[attr-defined] - torch.compile's reset hook


def last_report() -> Optional[Report]:
    """The report of the graph the dsrewrite backend compiled last (any caller), or ``None``."""
    return _LAST[0] if _LAST else None


def compile(model: Callable, *, mode: Optional[str] = None, dynamic: Optional[bool] = None,  # noqa: A001
            fullgraph: bool = False, **options: Any) -> Callable:
    """``torch.compile(model, backend=DsrewriteBackend(**options), mode=..., ...)`` with the reports attached.

    Options are checked now. The result is what ``torch.compile`` returns, with ``.dsrewrite_reports``: one
    :class:`~dsrewrite.report.Report` per compiled graph (filled on the first call). ``mode`` (e.g.
    ``"max-autotune"``) goes to Inductor. Inference only: see :mod:`dsrewrite.dynamo_backend`.
    """
    _check_mode(mode)
    backend = DsrewriteBackend(**options)
    compiled = torch.compile(model, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    if isinstance(compiled, nn.Module):  # OptimizedModule forwards setattr to the user's model: bypass it
        object.__setattr__(compiled, "dsrewrite_reports", backend.reports)
    else:
        compiled.dsrewrite_reports = backend.reports
    return compiled
