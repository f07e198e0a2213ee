"""dsrewrite: rewrite standard convolutions into low-rank depthwise-separable pairs.

Frontends (:mod:`dsrewrite.frontends`) find convs, the middle (:mod:`dsrewrite.plan.eligibility`,
:mod:`dsrewrite.plan.policy`, :mod:`dsrewrite.plan.factorize`, :mod:`dsrewrite.plan.cost_model`, :mod:`dsrewrite.plan.planner`)
decides and factorises, backends (:mod:`dsrewrite.backends`) write the result back, and
:mod:`dsrewrite.report` describes it.
"""
from .api import RewriteResult, apply_plan, rewrite
from .config import RewriteConfig
from .dynamo.backend import compile  # noqa: A004 - dsrewrite.compile(model, **options)
from .errors import DsrewriteError
from .plan.factorize import Factors, factorize
from .fx_pass import SeparableRewritePass
from .ir import ConvSite, ConvSpec
from .modules import SeparableConv1d, SeparableConv2d
from .plan import Plan
from .report import LayerReport, Report
from .version import __version__  # noqa: F401 - dsrewrite.__version__

__all__ = [
    "rewrite", "RewriteResult", "SeparableRewritePass", "SeparableConv1d", "SeparableConv2d",
    "factorize", "Factors", "Report", "LayerReport", "ConvSpec", "ConvSite", "DsrewriteError",
    "compile", "RewriteConfig", "Plan", "apply_plan",
]
