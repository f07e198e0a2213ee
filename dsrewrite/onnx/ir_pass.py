"""``SeparableConvPass``: the ONNX rewrite as an ``onnx_ir`` pass, so it composes with onnxscript's optimizer and
other IR passes in one ``onnx_ir.passes.Sequential`` / ``PassManager``.

It runs :func:`dsrewrite.onnx.rewrite` itself on the serialised model and reads the result back, so the pass and
the function give the same graph (one implementation). It is a functional pass: the input model is not changed.
``pass.report`` holds the :class:`~dsrewrite.report.Report` of the last run.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import onnx_ir as ir

from ..ir import check_kinds
from ..plan.planner import Selector, matcher
from ..plan.policy import RankArg, check_rank
from ..report import Report
from .api import rewrite
from .model_io import uses_external_data

__all__ = ["SeparableConvPass"]


class SeparableConvPass(ir.passes.FunctionalPass):
    """Replace eligible ``Conv`` nodes by low-rank depthwise + pointwise ``Conv`` pairs (:func:`dsrewrite.onnx.rewrite`).

    Args:
        rank: int, ``"auto"`` or ``"full"``.
        include / exclude: glob patterns over node names (``"/layer4/*"``) or a callable ``name -> bool``.
        kinds: layer kinds to rewrite (``"kxk"``, ``"pointwise"``, ``"linear"`` or ``"all"``; default ``"kxk"``).
        input_shapes: static shapes by input name for the FLOP count in the report.
        progress: show a progress bar while factorising.
        name: model name for the report.
    """

    def __init__(self, rank: RankArg = "auto", *, include: Selector = None, exclude: Selector = None,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None, progress: bool = False,
                 name: Optional[str] = None, kinds=None) -> None:
        super().__init__()
        self.rank = check_rank(rank)  # bad arguments fail here, not in the middle of a pipeline
        self.kinds = None if kinds is None else check_kinds(kinds)
        matcher(include, "include")
        matcher(exclude, "exclude")
        self.include, self.exclude = include, exclude
        self.input_shapes, self.progress, self.name = input_shapes, progress, name
        self.report: Optional[Report] = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = ir.serde.serialize_model(model)
        if uses_external_data(proto):  # the rewrite reads weights: bring them in memory, on a copy
            inside = model.clone()
            ir.external_data.load_to_model(inside)
            proto = ir.serde.serialize_model(inside)
        new, self.report = rewrite(proto, rank=self.rank, include=self.include, exclude=self.exclude,
                                   input_shapes=self.input_shapes, progress=self.progress, name=self.name,
                                   kinds=self.kinds)
        return ir.passes.PassResult(ir.serde.deserialize_model(new), modified=bool(self.report.rewritten))
