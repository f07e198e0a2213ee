"""The torch.fx pass: ``SeparableRewritePass(example_inputs, config=None, **options)(gm) -> PassResult``.

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
from .config import RewriteConfig
from .plan.planner import Decision, PlanInputs, plan_sites
from .plan.selfcheck import self_check

__all__ = ["SeparableRewritePass"]


class SeparableRewritePass(PassBase):
    """Replace eligible convs of a GraphModule by depthwise-separable (and low-rank) pairs.

    Args:
        example_inputs: positional inputs used to propagate shapes (output sizes give the FLOPs).
        config: a :class:`~dsrewrite.RewriteConfig`; ``**options`` are its fields, applied on top (``rank``,
            ``include`` / ``exclude``, ``kinds``, ``ragged``, ``backend``, a budget: ``target_flops``,
            ``target_params``, ``energy``, ...). Options that need the whole model (``target_latency``,
            ``calibration``, ``measure_time``) are :func:`dsrewrite.rewrite`'s and refused here by name.
        inputs: the planner's inputs as :func:`dsrewrite.rewrite` made them (its layer timer, calibration
            statistics); instead of planning from ``config`` alone.
        mirror: a module tree that gets the same module swaps (``rewrite(..., inplace=True)``).
        notes: a list the planner's notes (a budget not met) are appended to.
    """

    def __init__(self, example_inputs: Sequence[Any], config: Optional[RewriteConfig] = None, *,
                 inputs: Optional[PlanInputs] = None, mirror: Optional[nn.Module] = None,
                 notes: Optional[List[str]] = None, **options: Any) -> None:
        super().__init__()
        cfg = RewriteConfig.build(config, options, route=None if inputs is not None else "fx pass",
                                  words=" for SeparableRewritePass")
        self.example_inputs = tuple(example_inputs)
        self.inputs = inputs if inputs is not None else PlanInputs.from_config(cfg)
        self.backend = cfg.backend
        self.mirror = mirror
        self.notes = notes
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
        inputs = self.inputs.of_whole_model(self.flops_before, count_params(graph_module))  # the whole graph
        self.decisions = plan_sites(sites, inputs, self.notes)
        self.self_check_note = self_check(self.decisions, lambda d, f: pair_for(d, backend="torch", factors=f))
        modified = apply_decisions(graph_module, self.decisions, backend=self.backend, also=self.mirror)
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()
