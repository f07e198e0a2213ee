"""dsrewrite: rewrite standard convolutions into low-rank depthwise-separable pairs.

Frontends (:mod:`dsrewrite.frontends`) find convs, the middle (:mod:`dsrewrite.eligibility`,
:mod:`dsrewrite.policy`, :mod:`dsrewrite.factorize`, :mod:`dsrewrite.cost`, :mod:`dsrewrite.pipeline`)
decides and factorises, backends (:mod:`dsrewrite.backends`) write the result back, and
:mod:`dsrewrite.report` describes it.
"""
from .api import RewriteResult, rewrite
from .config import RewriteConfig
from .dynamo_backend import compile  # noqa: A004 - dsrewrite.compile(model, **options)
from .errors import DsrewriteError
from .factorize import Factors, factorize
from .fx_pass import SeparableRewritePass
from .ir import ConvSite, ConvSpec
from .modules import SeparableConv1d, SeparableConv2d
from .plan import Plan, apply_plan
from .report import LayerReport, Report

__version__ = "0.1.0"

__all__ = [
    "rewrite", "RewriteResult", "SeparableRewritePass", "SeparableConv1d", "SeparableConv2d",
    "factorize", "Factors", "Report", "LayerReport", "ConvSpec", "ConvSite", "DsrewriteError",
    "compile", "RewriteConfig", "Plan", "apply_plan",
]
