"""int8_friendly (issue 25): each pair's filters and columns rescaled to equal ranges, the function unchanged.

References are independent of dsrewrite.plan.balance: the dense weight of a pair is rebuilt by einsum from its factors,
and whole models are compared with the same rewrite without ``int8_friendly`` on fresh random inputs."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dsrewrite import DsrewriteError, RewriteConfig, rewrite
from dsrewrite.plan.balance import balance_scales, balanced
from dsrewrite.plan.factorize import factorize, factorize_layer
from dsrewrite.modules import LOWRANK_TYPES, SeparableConv2d
from tests.conftest import rel_err

TOL = 1e-5  # float32 rounding of a rescaled product (relative, whole tensors)


def dense_of(f) -> torch.Tensor:
    """The weight a pair computes, from its factors alone (float64): separable or low rank."""
    a, b = f.depthwise.double(), f.pointwise.double()
    if f.lowrank:
        return torch.einsum("ok,ki->oi", b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))
    cout, filters = b.shape[0], a.shape[0]
    cin = filters // f.rank if f.channel_index is None else int(f.channel_index.max()) + 1
    index = (torch.arange(filters) // f.rank) if f.channel_index is None else f.channel_index
    w = torch.zeros(cout, cin, a[0].numel(), dtype=torch.float64)
    w.index_add_(1, index, b.reshape(cout, filters, 1) * a.reshape(1, filters, -1))
    return w.reshape(cout, cin, *a.shape[2:])


def ranges(f):
    a = f.depthwise.double().reshape(f.depthwise.shape[0], -1).abs().amax(1)
    b = f.pointwise.double().transpose(0, 1).reshape(f.pointwise.shape[1], -1).abs().amax(1)
    return a, b


@pytest.mark.parametrize("kind", ["kxk", "ragged", "pointwise", "linear"])
def test_balanced_factors_compute_the_same_weight_with_equal_ranges(kind, gen):
    if kind in ("kxk", "ragged"):
        w = torch.randn(24, 6, 3, 3, generator=gen) * torch.logspace(-2, 1, 6)[None, :, None, None]
        f = factorize(w, 3, ragged=kind == "ragged")
    else:
        w = torch.randn(20, 16, *((1, 1) if kind == "pointwise" else ()), generator=gen)
        f = factorize_layer(w, 5, lowrank=True)
    f.pointwise = f.pointwise * torch.logspace(-1.5, 1.5, f.pointwise.shape[1]).reshape(1, -1, *([1] * (f.pointwise.dim() - 2)))
    f.depthwise = f.depthwise / torch.logspace(-1.5, 1.5, f.depthwise.shape[0]).reshape(-1, *([1] * (f.depthwise.dim() - 1)))
    before = ranges(f)
    assert float((before[0] / before[1]).log().abs().max()) > 1.0  # unbalanced to start with
    g = balanced(f)
    assert rel_err(dense_of(g), dense_of(f)) < TOL
    a, b = ranges(g)
    assert torch.allclose(a, b, rtol=1e-5)
    assert torch.allclose(a, (before[0] * before[1]).sqrt(), rtol=1e-5)  # the geometric mean of the two ranges
    assert g.rank == f.rank and g.error == f.error and g.lowrank == f.lowrank
    assert (g.channel_index is None) == (f.channel_index is None)


def test_zero_filters_keep_scale_one(gen):
    w = torch.randn(8, 3, 3, 3, generator=gen)
    w[:, 1] = 0  # channel 1: all-zero filters and columns
    f = factorize(w, 2)
    s = balance_scales(f.depthwise, f.pointwise)
    assert torch.all(torch.isfinite(s)) and torch.all(s[2:4] == 1)
    assert rel_err(dense_of(balanced(f)), w) == pytest.approx(rel_err(dense_of(f), w), abs=1e-6)


class Net(nn.Module):
    """KxK convs, a 1x1 conv and a linear layer, with scales spread so that the factors start unbalanced."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.c2.weight.mul_(torch.logspace(-2, 1, 16)[None, :, None, None])

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def _pairs(model):
    return [m for m in model.modules() if isinstance(m, (SeparableConv2d,) + tuple(LOWRANK_TYPES))]


@pytest.mark.parametrize("ragged", [False, True])
def test_torch_route_same_outputs_balanced_pairs_and_a_note(route, ragged, gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = Net().eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    kw = dict(rank={"c1": 2, "c2": 3, "c3": 4, "fc": 5}, kinds="all", ragged=ragged, measure_time=False)
    plain = rewrite(model, x, **kw)
    friendly = rewrite(model, x, int8_friendly=True, **kw)
    assert friendly.report.route == route
    fresh = torch.randn(4, 3, 12, 12, generator=gen)
    with torch.no_grad():
        assert rel_err(friendly.model(fresh), plain.model(fresh)) < TOL
    pairs = _pairs(friendly.model)
    assert len(pairs) == 4
    for m in pairs:
        a, b = ranges(m.factors())
        assert torch.allclose(a, b, rtol=1e-5)
    assert any(n.startswith("int8_friendly: 4 pair(s) balanced") for n in friendly.report.notes)
    assert not any("int8_friendly" in n for n in plain.report.notes)


def test_torch_route_balances_after_calibration(gen):
    model = Net().eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    calib = torch.randn(8, 3, 12, 12, generator=gen)
    plain = rewrite(model, x, rank=2, measure_time=False, calibration=calib)
    friendly = rewrite(model, x, rank=2, measure_time=False, calibration=calib, int8_friendly=True)
    fresh = torch.randn(4, 3, 12, 12, generator=gen)
    with torch.no_grad():
        assert rel_err(friendly.model(fresh), plain.model(fresh)) < TOL
    for m in _pairs(friendly.model):  # the refitted pointwise weights were balanced too
        a, b = ranges(m.factors())
        assert torch.allclose(a, b, rtol=1e-5)


def test_onnx_route_same_outputs_and_a_note(tmp_path, gen):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    import dsrewrite.onnx as ds_onnx

    path = str(tmp_path / "net.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(1, 3, 12, 12),), path, dynamo=False, opset_version=17,
                          input_names=["x"])
    calib = torch.randn(8, 3, 12, 12, generator=gen).numpy()
    for cal in (None, calib):
        plain, _ = ds_onnx.rewrite(path, rank=3, kinds="all", calibration=cal, measure_time=False)
        friendly, rep = ds_onnx.rewrite(path, rank=3, kinds="all", calibration=cal, measure_time=False,
                                        int8_friendly=True)
        assert any(n.startswith("int8_friendly: 4 pair(s) balanced") for n in rep.notes), rep.notes
        x = torch.randn(1, 3, 12, 12, generator=gen).numpy()
        run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
        assert rel_err(torch.from_numpy(run(friendly)), torch.from_numpy(run(plain))) < TOL
        w = {t.name: numpy_helper.to_array(t) for t in friendly.graph.initializer}
        first = [n for n in friendly.graph.node if n.name.endswith(("_depthwise", "_reduce"))]
        assert len(first) == 4
        for n in first:
            nxt = next(m for m in friendly.graph.node if n.output[0] in m.input)
            a, b = w[n.input[1]], w[nxt.input[1]]
            if nxt.op_type == "MatMul" or (nxt.op_type == "Gemm" and a.shape[0] != b.shape[1]):
                a, b = a.T, b.T  # MatMul weights are [in, out]
            ra = np.abs(a.reshape(a.shape[0], -1)).max(1)
            rb = np.abs(np.swapaxes(b, 0, 1).reshape(b.shape[1], -1)).max(1)
            np.testing.assert_allclose(ra, rb, rtol=1e-5)
        onnx.checker.check_model(friendly)


def test_bad_value_and_routes_that_cannot_honour_it_say_so_in_one_line():
    with pytest.raises(DsrewriteError, match="int8_friendly must be True or False") as e:
        RewriteConfig(int8_friendly="yes")
    assert "\n" not in str(e.value)
    with pytest.raises(DsrewriteError, match="'int8_friendly' is not supported by the torch.compile backend"):
        RewriteConfig.build(options=dict(int8_friendly=True), route="torch.compile")


def test_cli_flag_reaches_the_config():
    from dsrewrite.cli import build_parser

    args = build_parser().parse_args(["rewrite", "model.onnx", "--rank", "2", "--int8-friendly"])
    assert RewriteConfig.from_cli(args).int8_friendly is True
    args = build_parser().parse_args(["rewrite", "model.onnx", "--rank", "2"])
    assert RewriteConfig.from_cli(args).int8_friendly is False
