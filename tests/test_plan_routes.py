"""One planner for every route: the fx route, the module-swap fallback, the torch.compile backend and the ONNX
route give the same plan (rank per layer, skip or not, factors) for the same model and options (issue 12)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
import dsrewrite.api as api

onnx = pytest.importorskip("onnx")
from dsrewrite.onnx import rewrite as onnx_rewrite  # noqa: E402
from dsrewrite.dynamo.backend import last_report  # noqa: E402
from tests.conftest import derived_seed, np_rng  # noqa: E402


class Net(nn.Module):
    """Five convs the planner treats differently: rewritten at various ranks, 1x1, depthwise, 1-D-free."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.c3 = nn.Conv2d(24, 32, 5, padding=2)
        self.pw = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.dw(x))
        return self.pw(F.relu(self.c3(x)))


SHAPE = (2, 3, 16, 16)
OPTIONS = [dict(rank=2), dict(rank="auto"), dict(energy=0.8), dict(target_params=0.6), dict(rank=3, ragged=True)]


def plan_of(report):
    """(rewritten?, rank, channel ranks) per conv in execution order."""
    return [(L.rewritten, L.rank, tuple(L.channel_ranks or ())) for L in report.layers]


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory):
    torch.manual_seed(derived_seed("model_and_onnx"))  # the same model whichever test builds it first
    model = Net().eval()
    path = str(tmp_path_factory.mktemp("routes") / "net.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*SHAPE),), path, dynamo=False, opset_version=17)
    return model, path


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_same_plan_on_every_route(model_and_onnx, opts, monkeypatch):
    model, path = model_and_onnx
    x = torch.randn(*SHAPE)
    fx = dsrewrite.rewrite(model, x, measure_time=False, **opts)
    assert fx.report.route == "fx"
    plan = plan_of(fx.report)
    assert any(r for r, _, _ in plan) and not all(r for r, _, _ in plan)  # the options are not trivial here

    onnx_res = onnx_rewrite(path, **opts)
    assert plan_of(onnx_res.report) == plan
    # same factors: the ONNX pair's weights are the fx pair's (one factorisation)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx_res.model.graph.initializer}
    for L, node in zip([L for L in fx.report.layers if L.rewritten],
                       [n for n in onnx_res.model.graph.node if n.op_type == "Conv" and "depthwise" in n.name]):
        dw = fx.model.get_submodule(L.name).depthwise.weight.detach().numpy()
        np.testing.assert_allclose(inits[node.input[1]], dw, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        torch.compile(model, backend="dsrewrite", options=dict(opts, compiler="eager"))(x)
    assert plan_of(last_report()) == plan

    def untraceable(*a, **k):
        raise RuntimeError("tracing disabled by the test")
    monkeypatch.setattr(api, "trace", untraceable)
    swap = dsrewrite.rewrite(model, x, measure_time=False, **opts)
    assert swap.report.route == "fx-submodules+module-swap"
    assert plan_of(swap.report) == plan


def test_config_object_and_keywords_give_the_same_plan(model_and_onnx):
    model, path = model_and_onnx
    x = torch.randn(*SHAPE)
    cfg = dsrewrite.RewriteConfig(energy=0.8, measure_time=False)
    a = dsrewrite.rewrite(model, x, cfg)
    b = dsrewrite.rewrite(model, x, energy=0.8, measure_time=False)
    c = dsrewrite.rewrite(model, x, dsrewrite.RewriteConfig(rank=2), rank="auto", energy=0.8, measure_time=False)
    assert plan_of(a.report) == plan_of(b.report) == plan_of(c.report)
    assert plan_of(onnx_rewrite(path, cfg).report) == plan_of(a.report)
    with pytest.raises(dsrewrite.DsrewriteError, match="option 'memory_format' is not supported by the ONNX route"):
        onnx_rewrite(path, cfg, memory_format="channels_last")
    with pytest.raises(dsrewrite.DsrewriteError, match=r"unknown option 'ranks' for dsrewrite.rewrite \(options: "):
        dsrewrite.rewrite(model, x, ranks=2)


def test_a_registered_budget_kind_reaches_every_route(model_and_onnx, taps):
    """A budget kind is one provider + one register_budget call (the ``taps`` fixture); rewrite() and the ONNX
    route take it by name."""
    model, path = model_and_onnx
    x = torch.randn(*SHAPE)
    res = dsrewrite.rewrite(model, x, budget=(taps, 0.6), measure_time=False)
    plan = plan_of(res.report)
    layers = res.report.layers  # the budget is a fraction of every conv's cost, as the provider counts it
    after = sum(L.in_channels * (L.rank if L.rewritten else L.out_channels) for L in layers)
    assert after <= 0.6 * sum(L.in_channels * L.out_channels for L in layers)
    assert all(L.policy == taps for L in res.report.rewritten) and res.report.rewritten
    assert plan_of(onnx_rewrite(path, budget=(taps, 0.6)).report) == plan
    with pytest.raises(dsrewrite.DsrewriteError, match="unknown budget 'target_nothing'"):
        dsrewrite.rewrite(model, x, budget=("target_nothing", 0.3))


def test_array_options_are_compared_as_data(model_and_onnx):
    """An array given as an option (calibration data) is never compared element-wise with a default."""
    model, path = model_and_onnx
    data = np_rng().standard_normal((4, *SHAPE[1:])).astype(np.float32)
    report = onnx_rewrite(path, calibration=data, rank=2).report
    assert any(n.startswith("calibrated 3 layer(s) on 2 feed(s)") for n in report.notes), report.notes
    with pytest.raises(dsrewrite.DsrewriteError, match="option 'sequential' is not supported by the PyTorch route"):
        dsrewrite.rewrite(model, torch.from_numpy(data[:2]), calibration=torch.from_numpy(data), sequential=False)


def test_calibrated_plans_and_factors_agree_across_routes(model_and_onnx):
    """Calibration under a budget on the PyTorch route and in onnxruntime on the ONNX route: the same data-aware
    plan, the same calibration errors and the same factors (one implementation of the maths)."""
    from onnx import numpy_helper

    model, path = model_and_onnx
    data = torch.randn(8, *SHAPE[1:])
    a = dsrewrite.rewrite(model, data[:2], target_params=0.6, calibration=data, measure_time=False)
    new, b = onnx_rewrite(path, target_params=0.6, calibration=data.numpy(), sequential=True)
    assert plan_of(b) == plan_of(a.report) and any(L.rewritten for L in b.layers)
    for La, Lb in zip(a.report.layers, b.layers):
        if La.rewritten:
            assert Lb.calib_error_after <= Lb.calib_error_before + 1e-12
            assert Lb.calib_error_before == pytest.approx(La.calib_error_before, rel=1e-4, abs=1e-6)
            assert Lb.calib_error_after == pytest.approx(La.calib_error_after, rel=1e-4, abs=1e-6)
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    seps = {n: m for n, m in a.model.named_modules() if hasattr(m, "factors")}
    assert seps
    for name, sep in seps.items():
        f = sep.factors()
        stem = f"{name}.weight"
        for got, want in ((inits[f"{stem}.depthwise"], f.depthwise), (inits[f"{stem}.pointwise"], f.pointwise)):
            want = want.detach().numpy()
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), name
