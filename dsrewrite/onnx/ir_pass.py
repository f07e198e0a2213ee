"""``SeparableConvPass``: the ONNX rewrite as an ``onnx_ir`` pass, so it composes with onnxscript's optimizer and
other IR passes in one ``onnx_ir.passes.Sequential`` / ``PassManager``.

It runs :func:`dsrewrite.onnx.rewrite` itself on the serialised model and reads the result back, so the pass and
the function give the same graph (one implementation). It is a functional pass: the input model is not changed.
``pass.report`` holds the :class:`~dsrewrite.report.Report` of the last run.
"""
from __future__ import annotations

from typing import Any, Optional

import onnx_ir as ir

from ..config import RewriteConfig
from ..report import Report
from .api import rewrite
from .model_io import uses_external_data

__all__ = ["SeparableConvPass"]


class SeparableConvPass(ir.passes.FunctionalPass):
    """Replace eligible ``Conv`` nodes by low-rank depthwise + pointwise ``Conv`` pairs (:func:`dsrewrite.onnx.rewrite`;
    with ``kinds``, 1x1 ``Conv``, ``Gemm`` and ``MatMul`` weight layers by low-rank pairs).

    Args:
        config: a :class:`~dsrewrite.RewriteConfig`; ``**options`` are its fields, applied on top, with the
            meaning :func:`dsrewrite.onnx.rewrite` gives them (``rank``, ``include`` / ``exclude`` over node names
            such as ``"/layer4/*"``, ``kinds``, budgets, ``calibration``, ``input_shapes``, ``name``, ...). Options
            the ONNX route cannot honour are refused here, by name, before the pass runs in a pipeline.
    """

    def __init__(self, config: Optional[RewriteConfig] = None, **options: Any) -> None:
        super().__init__()
        # bad options fail here, not in the middle of a pipeline
        self.config = RewriteConfig.build(config, options, route="onnx", words=" for SeparableConvPass")
        self.report: Optional[Report] = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = ir.serde.serialize_model(model)
        if uses_external_data(proto):  # the rewrite reads weights: bring them in memory, on a copy
            inside = model.clone()
            ir.external_data.load_to_model(inside)
            proto = ir.serde.serialize_model(inside)
        new, self.report = rewrite(proto, None, self.config)
        return ir.passes.PassResult(ir.serde.deserialize_model(new), modified=bool(self.report.rewritten))
