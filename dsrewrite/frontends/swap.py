"""Fallback frontend for models ``torch.fx.symbolic_trace`` cannot trace (detectors, generative models...).

Runs the real forward once with hooks: each conv module's output shapes and a bounded self-check sample, and
which modules call a conv *function* (``F.conv2d`` on a parameter) in their own forward. Then:

* every conv module is swapped in place for its pair (at every path that holds it);
* a module that calls a conv function is traced alone (its children kept as leaves) and keeps its class,
  attributes and methods: only its ``forward`` is replaced by the rewritten graph, run with the module as
  ``self`` (:class:`~dsrewrite.backends.fx.GraphForward`). A forward that does not trace keeps its
  functional convs dense, each with that reason.

Only the inputs of modules that call conv functions are kept from the forward, so the pass stays within about
one forward's memory. Ranks are planned over all sites at once, the same as on the fx route.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from ..backends.fx import GraphForward, apply_decisions, carry_attributes, pair_for, set_submodule
from ..errors import first_line
from ..ir import ConvSite, ConvSpec
from ..timing.measure import count_params, eval_mode
from ..modules import LOWRANK_TYPES, PAIR_TYPES
from ..plan.planner import Decision, PlanInputs, plan_sites
from ..plan.selfcheck import self_check
from .snapshot import ModelSnapshot
from .conv_modules import (TRANSPOSED_TYPES, describe, has_unknown_forward, is_linear_module, is_weight_module,
                           weight_states)
from .fx import (CONV_FUNCTIONS, LINEAR_FUNCTIONS, FxHandle, ProbeProp, attention_sites, bounded_probe, collect_sites,
                 conv_settings, linear_probe, may_rewrite, module_site, owner_name, trace)

__all__ = ["rewrite_untraceable", "breaking_swap"]

_PAIRS = PAIR_TYPES


def _halves(pair: nn.Module) -> Tuple[str, str]:
    return ("reduce", "expand") if isinstance(pair, LOWRANK_TYPES) else ("depthwise", "pointwise")


class _Record:
    """What one module did in the recorded forward (first call's inputs only for conv-function callers)."""

    def __init__(self, order: int) -> None:
        self.order = order  # position of its first call in the forward
        self.calls = 0
        self.args: Optional[Tuple[Any, ...]] = None
        self.has_kwargs = False
        self.out_shapes: List[Tuple[int, ...]] = []
        self.in_shapes: List[Tuple[int, ...]] = []  # transposed convs only
        self.probe: Any = None  # conv modules: a bounded input/output sample of the first call
        self.functional: List[Dict[str, Any]] = []  # conv-function calls made by its own forward (first call)
        self.weight_set_at_run_time = False  # conv modules: the forward assigned or changed its weight


class _Recorder(TorchFunctionMode):
    """Hooks plus a torch-function mode: the module stack tells which module's forward called a conv function."""

    def __init__(self, conv_args: Dict[nn.Module, Dict[str, Any]]) -> None:
        super().__init__()
        self.conv_args = conv_args  # each conv module's settings, read before our hooks were added
        self.recs: Dict[nn.Module, _Record] = {}
        self.stack: List[Tuple[nn.Module, Tuple[Any, ...], bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func in CONV_FUNCTIONS or func in LINEAR_FUNCTIONS) and self.stack:
            mod, _, first = self.stack[-1]
            if first and (not (is_weight_module(mod) or isinstance(mod, _PAIRS)) or has_unknown_forward(mod)):
                call = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args))
                call.update(kwargs)
                w = call.get("weight")
                self.recs[mod].functional.append({
                    "dims": CONV_FUNCTIONS.get(func, 0), "bias": call.get("bias") is not None,
                    "shape": tuple(w.shape) if isinstance(w, torch.Tensor) else None, "weight_id": id(w),
                    "settings": conv_settings(call), "out": tuple(out.shape) if isinstance(out, torch.Tensor) else None})
        return out

    def pre(self, mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        rec = self.recs.get(mod)
        if rec is None:
            rec = self.recs[mod] = _Record(len(self.recs))
        rec.calls += 1
        if rec.calls == 1:
            rec.has_kwargs = bool(kwargs)
        self.stack.append((mod, args, rec.calls == 1))

    def post(self, mod: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        if not self.stack or self.stack[-1][0] is not mod:
            return
        _, first_args, first = self.stack.pop()
        rec = self.recs[mod]
        if first and rec.functional:  # only conv-function callers keep their inputs: they are traced alone
            rec.args = first_args
        if isinstance(mod, nn.MultiheadAttention) and args and isinstance(args[0], torch.Tensor):
            rec.in_shapes.append(tuple(args[0].shape))  # its projections' rows: reported, not rewritten
        if is_linear_module(mod) and isinstance(out, torch.Tensor):
            rec.out_shapes.append(tuple(out.shape))
            if rec.probe is None and args and isinstance(args[0], torch.Tensor):
                rec.probe = linear_probe(args[0], out)
        elif is_weight_module(mod) and isinstance(out, torch.Tensor):
            rec.out_shapes.append(tuple(out.shape))
            if isinstance(mod, TRANSPOSED_TYPES) and args and isinstance(args[0], torch.Tensor):
                rec.in_shapes.append(tuple(args[0].shape))  # its FLOPs are counted over its input positions
            if rec.probe is None and args and isinstance(args[0], torch.Tensor) and may_rewrite(
                    mod.groups, mod.kernel_size, isinstance(mod, TRANSPOSED_TYPES)):
                rec.probe = bounded_probe(args[0], out, tuple(mod.kernel_size), self.conv_args[mod])


def _record(model: nn.Module, args: Sequence[Any]) -> Tuple[Dict[nn.Module, _Record], int]:
    """One real forward with hooks: per-module call records; returns them and the whole-model FLOPs."""
    # describe() before the hooks: it refuses a conv with forward hooks, ours included
    rec = _Recorder({m: describe(m).conv_args for m in model.modules() if is_weight_module(m)})
    handles = []
    stored = weight_states(model)
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, always_call=True))
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter, rec:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    after = weight_states(model)
    for m, state in stored.items():  # a weight the model's own forward reassigns (re-parametrised blocks)
        if after.get(m) != state:
            rec.recs.setdefault(m, _Record(len(rec.recs))).weight_set_at_run_time = True
    return rec.recs, int(counter.get_total_flops())


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every child module is a leaf, so children keep running as themselves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace_own_forward(owner: nn.Module, rec: _Record) -> Tuple[fx.GraphModule, ProbeProp]:
    """The owner's forward as a graph (children as leaves), shape-propagated on its recorded inputs. Attributes
    the forward sets while traced (caches that would hold fx proxies) are put back afterwards."""
    undo = ModelSnapshot(owner, values=False)
    try:
        gm = trace(owner, len(rec.args), tracer=_ChildrenAsLeaves())
    finally:
        undo.restore()
    prop = ProbeProp(gm)
    # ShapeProp prints a traceback before re-raising: a forward that does not run traced is reported, not printed
    with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        prop.propagate(*rec.args)
    gm.training = owner.training
    return gm, prop


def _untraced_sites(q: str, owner: nn.Module, rec: _Record, why: str, names: Dict[int, str]) -> List[ConvSite]:
    """One skipped site per conv-function call of a forward that could not be traced, with the reason."""
    sites = []
    for i, call in enumerate(rec.functional):
        dims = call["dims"]
        shape = call["shape"] or (0, 0) + (1,) * dims
        if dims == 0 and len(shape) != 2:  # F.linear on a weight that is not a matrix
            shape = (0, 0)
        name = names.get(call["weight_id"])
        name = name.rsplit(".", 1)[0] if name and "." in name else (name or f"{q or type(owner).__name__}.conv{i}")
        s = call["settings"]
        groups = s["groups"] if isinstance(s["groups"], int) else 1
        out = call["out"]
        spec = ConvSpec(name=name, in_channels=int(shape[1]) * groups, out_channels=int(shape[0]),
                        kernel=tuple(shape[2:]), groups=groups, bias=call["bias"],
                        stride=(1,) * dims, dilation=(1,) * dims,
                        out_spatial=tuple(out[-dims:]) if out and dims else None,
                        batch=math.prod(out[:-dims - 1]) if out and len(out) > dims + 1 else 1,
                        origin="function", extra={"unsupported": why})
        sites.append(ConvSite(spec, None, None, FxHandle("function", name, [])))
    return sites


def _paths(model: nn.Module) -> Dict[nn.Module, List[str]]:
    """Every path at which each module is registered (a module shared under two names has two)."""
    paths: Dict[nn.Module, List[str]] = {}
    for q, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(m, []).append(q)
    return paths


def rewrite_untraceable(model: nn.Module, args: Sequence[Any], inputs: PlanInputs, *, backend: str,
                        notes: Optional[List[str]] = None) -> Tuple[nn.Module, List[Decision], int, List[str]]:
    """Rewrite ``model`` in place: conv modules swapped, conv-function callers given a rewritten forward.

    ``inputs`` are the planner's (:class:`~dsrewrite.plan.planner.PlanInputs`; budgets are fractions of the whole
    model, whose FLOPs and parameters are counted here); its notes go to ``notes``.
    Returns ``(model, decisions, whole-model FLOPs of the original, notes)``.
    """
    recs, flops = _record(model, args)
    paths = _paths(model)
    names = {id(p): q for q, p in model.named_parameters(remove_duplicate=False)}
    keyed: List[Tuple[Tuple[int, int], ConvSite]] = []  # (first-call order, position in its graph), site
    traced: List[Tuple[nn.Module, fx.GraphModule, List[ConvSite]]] = []
    untraced: List[str] = []
    unseen = len(recs) + 1
    halves = {id(getattr(m, h)) for m in paths if isinstance(m, _PAIRS) for h in _halves(m)}
    halves |= {id(m.out_proj) for m in paths if isinstance(m, nn.MultiheadAttention)}  # reported with its owner
    for m, where in paths.items():
        q = where[0]
        rec = recs.get(m)
        order = rec.order if rec else unseen
        if isinstance(m, _PAIRS):
            for half in _halves(m):  # a pair from an earlier rewrite: reported, never rewritten
                site = module_site(f"{q}.{half}", getattr(m, half), [], out_shapes=rec.out_shapes if rec else [])
                site.spec.extra["unsupported"] = "part of a pair from an earlier rewrite"
                keyed.append(((order, 0), site))
            continue
        if isinstance(m, nn.MultiheadAttention):
            keyed.extend(((order, i), s) for i, s in enumerate(attention_sites(q, m, [], in_shapes=rec.in_shapes if rec
                                                                                       else [])))
            continue
        own_forward = has_unknown_forward(m) and rec is not None and bool(rec.functional)
        if is_weight_module(m) and not own_forward and id(m) not in halves:
            keyed.append(((order, 0), _conv_module_site(q, m, rec)))
        elif rec is not None and rec.functional:
            sites, gm = _caller_sites(q, m, rec, own_forward, names)
            keyed.extend(((order, i + 1), s) for i, s in enumerate(sites))
            if gm is None:
                untraced.append(q or "(the model)")
            else:
                traced.append((m, gm, sites))
    ordered = [s for _, s in sorted(keyed, key=lambda t: t[0])]

    decisions = plan_sites(ordered, inputs.of_whole_model(flops, count_params(model)), notes)
    check_note = self_check(decisions, lambda d, f: pair_for(d, backend="torch", factors=f))
    by_site = {id(d.site): d for d in decisions}

    forwards = []
    for owner, gm, sites in traced:
        mine = [by_site[id(s)] for s in sites]
        if apply_decisions(gm, mine, backend=backend, namespace=owner):  # the new pairs, named where owner has room
            for d in mine:
                if d.module is not None:
                    set_submodule(owner, _path_of(gm, d.module), d.module)
            owner.forward = GraphForward(owner, gm.graph)
            forwards.append(paths[owner][0] or "(the model)")
    swapped = 0
    for s in ordered:
        d = by_site[id(s)]
        if d.rewritten and s.handle.kind == "swap":
            d.module = carry_attributes(s.handle.module, pair_for(d, backend=backend))
            for path in paths[s.handle.module]:
                set_submodule(model, path, d.module)
            swapped += 1
    notes = [f"swapped {swapped} layer module(s) in place; FLOPs from hooks on the real forward"]
    if forwards or untraced:
        more = lambda xs: ", ".join(xs[:6]) + (", ..." if len(xs) > 6 else "")  # noqa: E731
        notes[0] += (f"; functional convs rewritten in the forward of {len(forwards)} module(s)"
                     + (f" ({more(forwards)}), which keep their class" if forwards else ""))
        if untraced:
            notes[0] += f"; functional convs left dense in {len(untraced)} forward(s) torch.fx cannot trace ({more(untraced)})"
    notes.append(check_note)
    return model, decisions, flops, notes


def _conv_module_site(q: str, m: nn.Module, rec: Optional[_Record]) -> ConvSite:
    """A conv module's site from its record: shapes, the sample (moved, not copied), a weight assigned at run time."""
    site = module_site(q, m, [], out_shapes=rec.out_shapes if rec else [], in_shapes=rec.in_shapes if rec else [])
    if rec is None:
        return site
    if rec.weight_set_at_run_time and not site.spec.extra.get("unsupported"):
        site.spec.extra["unsupported"] = ("its weight is assigned by the model's forward (e.g. re-parametrised "
                                          "from other layers at every call): a pair would not follow it")
    site.probe, rec.probe = rec.probe, None  # the site takes the sample: nothing else keeps it
    return site


def _caller_sites(q: str, m: nn.Module, rec: _Record, own_forward: bool, names: Dict[int, str]
                  ) -> Tuple[List[ConvSite], Optional[fx.GraphModule]]:
    """The functional-conv sites of a module whose own forward calls conv functions, and the graph of that forward
    (``None`` when it is not traced: then every site carries the reason)."""
    label = f"{type(m).__name__} ({q})" if q else f"{type(m).__name__} (the model)"
    if rec.calls != 1 or rec.has_kwargs or rec.args is None:
        why = "called more than once" if rec.calls != 1 else "called with keyword arguments"
        return _untraced_sites(q, m, rec, f"functional conv in the forward of {label}, {why}: not traced", names), None
    try:
        gm, prop = _trace_own_forward(m, rec)
    except Exception as e:  # noqa: BLE001 - a forward fx cannot trace keeps its convs, with the reason
        why = f"functional conv in the forward of {label}, which torch.fx cannot trace ({first_line(e, 120, typed=True)})"
        if own_forward:  # a conv subclass: reported as the conv it is, with why it stays
            why = f"{describe(m).unsupported}; its forward does not trace ({first_line(e, 120, typed=True)})"
        return _untraced_sites(q, m, rec, why, names), None
    finally:
        rec.args = None  # the inputs were only kept for this
    sites = [s for s in collect_sites(gm, prop.probes) if s.handle.kind == "function"]
    for s in sites:  # named as the fx route names it on the whole model: the module that owns the weight
        w = s.handle.weight_target
        s.spec.name = owner_name(f"{q}.{w}" if q else w) if w else (f"{q}.{s.spec.name}" if q else s.spec.name)
    return sites, gm


def _path_of(gm: nn.Module, module: nn.Module) -> str:
    return next(q for q, m in gm.named_modules() if m is module)


def breaking_swap(model: nn.Module, args: Sequence[Any], decisions: List[Decision]) -> Optional[str]:
    """The first swapped conv whose pair makes ``model`` fail on ``args`` (code around it that the pair cannot
    satisfy, e.g. a type check), found by bisection over the swaps in order: about log2(n) forwards. ``None``
    when the model fails with no swap in place (the cause is elsewhere). Leaves every pair in place."""
    swaps = [d for d in decisions if d.rewritten and d.site.handle.kind == "swap" and d.module is not None]
    paths = _paths(model)
    where = [(d, paths.get(d.module, [])) for d in swaps]

    def runs_with(k: int) -> bool:  # the first k swaps in place, the rest back to their convs
        for i, (d, ps) in enumerate(where):
            for p in ps:
                set_submodule(model, p, d.module if i < k else d.site.handle.module)
        try:
            with eval_mode(model), torch.no_grad():
                model(*args)
            return True
        except Exception:  # noqa: BLE001 - failing is what is being searched for
            return False

    try:
        if not swaps or not runs_with(0):
            return None
        lo, hi = 0, len(swaps)  # runs with lo swaps; fails with hi (as the caller saw)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if runs_with(mid) else (lo, mid)
        return swaps[hi - 1].site.spec.name
    finally:
        for d, ps in where:
            for p in ps:
                set_submodule(model, p, d.module)
