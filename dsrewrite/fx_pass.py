"""The torch.fx pass: ``SeparableRewritePass(example_inputs, rank=...)(gm) -> PassResult``.

Usable on its own or inside ``torch.fx.passes.infra.pass_manager.PassManager``. After it runs,
``pass.decisions`` holds one decision (with its report entry) per convolution found.
"""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Any, List, Optional, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.flop_counter import FlopCounterMode

from .backends.fx import apply_decisions, pair_for
from .frontends.fx import ProbeProp, collect_sites
from .timing.measure import count_params, eval_mode, seeded
from .modules import BACKENDS
from .plan.planner import Decision, Selector, plan_sites
from .plan.policy import RankArg, check_rank
from .plan.selfcheck import self_check

__all__ = ["SeparableRewritePass"]


class SeparableRewritePass(PassBase):
    """Replace eligible convs of a GraphModule by rank-``rank`` depthwise-separable pairs.

    Args:
        example_inputs: positional inputs used to propagate shapes (output sizes give the FLOPs).
        rank: int, ``"auto"`` or ``"full"`` (see :mod:`dsrewrite.plan.policy`).
        include / exclude: glob patterns over qualified names, or a callable ``name -> bool``.
        backend: ``SeparableConv2d`` backend (``"auto"``, ``"triton"``, ``"torch"``).
        mirror: a module tree that gets the same module swaps (``rewrite(..., inplace=True)``).
        plan_kwargs: extra keyword arguments of :func:`dsrewrite.plan.planner.plan_sites` (budgets, timer,
            calibration statistics); the whole-graph FLOPs and parameters are the budget totals.
        kinds: layer kinds to rewrite (``"kxk"``, ``"pointwise"``, ``"linear"``, ``"all"``; default: all under a
            budget, KxK for a rank): 1x1 convs and linear layers become ``LowRank*`` pairs.
    """

    def __init__(self, example_inputs: Sequence[Any], rank: RankArg = "auto", include: Selector = None,
                 exclude: Selector = None, backend: str = "auto", mirror: Optional[nn.Module] = None,
                 progress: bool = False, plan_kwargs: Optional[dict] = None, kinds=None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            from .errors import DsrewriteError

            raise DsrewriteError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.example_inputs = tuple(example_inputs)
        self.rank = check_rank(rank)
        self.include, self.exclude = include, exclude
        self.backend = backend
        self.mirror = mirror
        self.progress = progress
        # budgets etc. for plan_sites (target_flops=..., timer=..., stats=...); whole-model totals filled in call()
        self.plan_kwargs = dict(plan_kwargs or {})
        if kinds is not None:
            from .ir import check_kinds

            self.plan_kwargs["kinds"] = check_kinds(kinds)
        self.decisions: List[Decision] = []
        self.flops_before: int = 0
        self.self_check_note: Optional[str] = None  # what the per-layer self-check found
        # the traced graph's output on the example inputs, before the rewrite (random draws seeded by seeded()):
        # rewrite() compares it with the model's own to know the trace is faithful
        self.traced_output: Any = None

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not isinstance(graph_module, fx.GraphModule):
            raise TypeError(f"SeparableRewritePass runs on a torch.fx.GraphModule, got {type(graph_module).__name__}")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        # one forward gives both the output shapes and the original's whole-graph FLOPs
        # ShapeProp prints a traceback before re-raising: keep stderr for the real error or replay it on success
        captured = io.StringIO()
        prop = ProbeProp(graph_module)
        try:
            with eval_mode(graph_module), torch.no_grad(), FlopCounterMode(display=False) as counter, \
                    contextlib.redirect_stderr(captured), seeded():
                self.traced_output = prop.propagate(*self.example_inputs)
        except RuntimeError as e:
            if e.__cause__ is not None:
                raise e.__cause__ from None
            raise
        if captured.getvalue():
            sys.stderr.write(captured.getvalue())
        self.flops_before = int(counter.get_total_flops())
        sites = collect_sites(graph_module, prop.probes)
        del prop  # its probe dict and last values: the sites now hold the probes, and self_check drops them
        kw = dict(self.plan_kwargs)  # budgets are fractions of the whole model (plan_sites ignores these without one)
        kw.setdefault("total_flops", self.flops_before)
        kw.setdefault("total_params", count_params(graph_module))
        self.decisions = plan_sites(sites, self.rank, self.include, self.exclude, progress=self.progress, **kw)
        self.self_check_note = self_check(self.decisions, lambda d, f: pair_for(d, backend="torch", factors=f))
        modified = apply_decisions(graph_module, self.decisions, backend=self.backend, also=self.mirror)
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()
