"""The torch.compile route rewrites linear layers and 1x1 convs as low-rank pairs (issue 22): Dynamo's
``torch._C._nn.linear`` calls on parameter inputs (``nn.Linear`` modules and ``F.linear`` on a parameter) are
lifted into ``nn.Linear`` modules like convs; ``kinds=`` is a backend option; a weight changed after compile is
refactorised as a low-rank pair; a recompile for a new shape replays the plan's ``LowRank*`` modules.

Tolerance: 1e-4 relative error of the output against the eager original on fresh random inputs (at full rank the
float32 factors of a float64 SVD reproduce a layer to about 1e-6; Inductor's reordering adds about 1e-7).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.dynamo.backend import DsrewriteBackend
from dsrewrite.modules import LowRankConv2d, LowRankLinear
from tests.conftest import rel_err

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: a fresh Dynamo and plan cache per test


class Net(nn.Module):
    """A 3x3 conv, a strided 1x1 conv, an ``nn.Linear`` on ``[B, L, C]`` tokens, ``F.linear`` on a parameter
    (no bias), and ``F.linear`` on a weight computed at run time (left dense, with its reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.pw = nn.Conv2d(12, 20, 1, stride=2)
        self.fc = nn.Linear(20, 24)
        self.head_w = nn.Parameter(torch.randn(10, 24) / 5)
        self.gate = nn.Parameter(torch.ones(10, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.conv(x).relu())  # [B, 20, H/2, W/2]
        t = self.fc(y.flatten(2).transpose(1, 2)).relu()  # [B, L, 24]
        return F.linear(t, self.head_w) + F.linear(t, self.head_w * self.gate).mean()


def test_compile_rewrites_linear_and_pointwise_layers_exactly_at_full_rank():
    torch.manual_seed(0)
    model = Net().eval()
    backend = DsrewriteBackend(rank="full", kinds="all")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for batch in (2, 3):  # the second batch size recompiles and replays the plan
            x = torch.randn(batch, 3, 8, 8)
            assert rel_err(compiled(x), model(x)) <= TOL
    report = backend.reports[0]
    by = {L.name: L for L in report.layers}
    assert by["conv"].rewritten and by["conv"].kind == "kxk"
    assert by["pw"].rewritten and by["pw"].kind == "pointwise" and by["pw"].rank == 12
    assert by["fc"].rewritten and by["fc"].kind == "linear" and by["fc"].rank == 20
    assert by["head_w"].rewritten and by["head_w"].kind == "linear" and by["head_w"].rank == 10
    computed = [L for L in report.layers if L.kind == "linear" and not L.rewritten]
    assert len(computed) == 1 and "computed at run time" in computed[0].reason
    assert "recompile: ranks and factors reused" in " ".join(backend.reports[-1].notes)
    modules = [m for p in backend.plans._plans.values() for m in p.modules if m is not None]
    assert sum(isinstance(m, LowRankLinear) for m in modules) == 2
    assert sum(isinstance(m, LowRankConv2d) for m in modules) == 1


def test_kinds_is_a_backend_option_and_the_default_rank_keeps_lowrank_layers_dense():
    torch.manual_seed(1)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    backend = DsrewriteBackend(rank="full", compiler="eager")  # a uniform rank: KxK convs only by default
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend=backend)(x), model(x)) <= TOL
    by = {L.name: L for L in backend.reports[0].layers}
    assert by["conv"].rewritten and not by["pw"].rewritten and not by["fc"].rewritten
    assert "not chosen" in by["fc"].reason and "not chosen" in by["pw"].reason
    torch._dynamo.reset()
    backend = DsrewriteBackend(rank="full", kinds=("linear",), compiler="eager")
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend=backend)(x), model(x)) <= TOL
    by = {L.name: L for L in backend.reports[0].layers}
    assert by["fc"].rewritten and by["head_w"].rewritten and not by["pw"].rewritten and not by["conv"].rewritten


def test_a_changed_linear_weight_is_refactorised_as_a_lowrank_pair():
    torch.manual_seed(2)
    model = Net().eval()
    compiled = torch.compile(model, backend=DsrewriteBackend(rank="full", kinds="all", compiler="eager"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
        model.fc.weight.mul_(-1.5)
        model.pw.weight.add_(0.3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = compiled(x)
        assert rel_err(y, model(x)) <= TOL
    assert any("weights changed since compile" in str(w.message) for w in caught)
