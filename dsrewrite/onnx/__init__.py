"""ONNX frontend and backend: rewrite the ``Conv`` (and ``Gemm`` / ``MatMul``) nodes of ``.onnx`` models by
editing the protobuf.

The frontend (:mod:`.frontend`) turns convolution nodes and weight layers, subgraphs included (:mod:`.scopes`),
into framework-neutral :class:`~dsrewrite.ir.ConvSite` objects, the shared :func:`dsrewrite.plan.planner.plan_sites`
chooses ranks and factorises, the backend (:mod:`.backend`) replaces just those nodes by depthwise + pointwise
``Conv`` pairs or low-rank pairs (two ``Conv`` / ``Gemm`` / ``MatMul`` nodes), and :mod:`.flops` counts
whole-model FLOPs and parameters with the torch report's conventions.
Calibration data (:mod:`.calib_data`) is refitted on in onnxruntime (:mod:`.calibrate`) with the PyTorch
route's maths.
"""
from __future__ import annotations

try:
    import onnx  # noqa: F401
except ImportError as _e:  # one line for the CLI, with the fix
    from ..errors import DsrewriteError

    raise DsrewriteError(f"the ONNX route needs the {_e.name!r} package: pip install 'dsrewrite[onnx]'") from None

from .api import OnnxRewriteResult, apply_plan, rewrite
from .calib_data import as_feeds, image_feeds
from .cli import cli_rewrite
from .flops import count_flops, count_params, infer_shapes
from .frontend import collect_sites
from .model_io import load_model, save_model

__all__ = ["rewrite", "apply_plan", "OnnxRewriteResult", "as_feeds", "image_feeds", "cli_rewrite", "collect_sites", "count_flops",
           "count_params", "infer_shapes", "load_model", "save_model", "SeparableConvPass"]


def __getattr__(name: str):
    """``SeparableConvPass`` (the onnx_ir pass) loads on first use: only it needs the onnx_ir package."""
    if name == "SeparableConvPass":
        from .ir_pass import SeparableConvPass  # optional dependency: onnx_ir, for this pass only

        return SeparableConvPass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
