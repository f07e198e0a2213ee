"""Ragged ranks (factorize(..., ragged=True), rewrite(ragged=True)): the Cin*r largest singular values over
all channels (whitened ones with calibration). Checked against a brute-force search over per-channel ranks
with numpy SVDs, against F.conv2d with the reconstructed dense weight, and in onnxruntime."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.cli import main
from dsrewrite.calib.solve import PatchStats, calibrate_conv, patch_conv, whitened_factors, whitened_rank_errors
from dsrewrite.plan.factorize import factorize, full_rank, rank_errors
from dsrewrite.modules import SeparableConv1d, SeparableConv2d

from tests.conftest import rel_err


def _uneven(gen, cout, cin, *kernel):
    """A weight whose input channels carry very different energies (as in trained nets), float64."""
    scale = torch.rand(cin, generator=gen, dtype=torch.float64) ** 3 * 4 + 0.01
    return torch.randn(cout, cin, *kernel, generator=gen, dtype=torch.float64) * scale.reshape(1, cin, *[1] * len(kernel))


def _dense_from_factors(f, cin):
    """The dense weight the ragged factors compute, summed term by term (independent of the module)."""
    cout = f.pointwise.shape[0]
    dw = f.depthwise.reshape(f.depthwise.shape[0], -1)
    pw = f.pointwise.reshape(cout, -1)
    w = torch.zeros(cout, cin, dw.shape[1], dtype=dw.dtype)
    for j, c in enumerate(f.channel_index.tolist()):
        w[:, c] += pw[:, j, None] * dw[j][None, :]
    return w.reshape(cout, cin, *f.depthwise.shape[2:])


def _uniform_dense(f, cin):
    """The dense weight of uniform factors (filter ``c*r + j`` reads channel ``c``)."""
    cout, r = f.pointwise.shape[0], f.rank
    dw = f.depthwise.reshape(cin, r, -1)
    pw = f.pointwise.reshape(cout, cin, r)
    return torch.einsum("ocr,crk->ock", pw, dw).reshape(cout, cin, *f.depthwise.shape[2:])


def _brute_force_error(w: np.ndarray, terms: int) -> float:
    """Least relative error over every split of ``terms`` filters between the channels (numpy SVDs)."""
    cout, cin = w.shape[:2]
    slices = [w[:, c].reshape(cout, -1) for c in range(cin)]
    svals = [np.linalg.svd(s, compute_uv=False) for s in slices]
    q = len(svals[0])
    best = np.inf
    for split in itertools.product(range(q + 1), repeat=cin):
        if sum(split) != terms:
            continue
        best = min(best, sum(float((s[r:] ** 2).sum()) for s, r in zip(svals, split)))
    return float(np.sqrt(best / (w**2).sum()))


@pytest.mark.parametrize("cout,kernel", [(5, (2, 2)), (3, (3, 1)), (6, (2, 3))])
def test_ragged_is_the_best_split_and_reconstructs(gen, cout, kernel):
    w = _uneven(gen, cout, 3, *kernel)
    for r in range(1, full_rank(w.shape) + 1):
        f = factorize(w, r, ragged=True)
        uniform = factorize(w, r)
        assert f.depthwise.shape == uniform.depthwise.shape and f.pointwise.shape == uniform.pointwise.shape
        if r < full_rank(w.shape):
            assert int(f.channel_ranks.sum()) == 3 * r
            assert f.error == pytest.approx(_brute_force_error(w.numpy(), 3 * r), rel=1e-9, abs=1e-12)
            assert rel_err(_dense_from_factors(f, 3), w) == pytest.approx(f.error, rel=1e-9, abs=1e-12)
        else:  # full rank: every term kept, exact (the uniform layout)
            assert f.error == 0.0 and rel_err(_uniform_dense(uniform, 3), w) < 1e-12
        assert f.error <= uniform.error + 1e-12
        assert rank_errors(w, ragged=True)[r] == pytest.approx(f.error, rel=1e-9, abs=1e-12)


def test_ragged_beats_uniform_on_uneven_channels(gen):
    w = _uneven(gen, 32, 16, 3, 3)
    w[:, :4] *= 1e-3  # four nearly dead channels: their filters are better spent elsewhere
    f, u = factorize(w, 2, ragged=True), factorize(w, 2)
    assert f.error < u.error
    assert f.channel_ranks[:4].sum() < 8  # the dead channels give filters away


@pytest.mark.parametrize("cls,kernel,kw", [
    (SeparableConv2d, (3, 3), dict(stride=2, padding=1)),
    (SeparableConv2d, (3, 5), dict(padding="same", dilation=2, padding_mode="reflect")),
    (SeparableConv1d, (5,), dict(stride=1, padding=2, padding_mode="circular")),
])
def test_ragged_module_matches_dense_conv(gen, cls, kernel, kw):
    conv_cls = nn.Conv2d if cls is SeparableConv2d else nn.Conv1d
    conv = conv_cls(6, 10, kernel, bias=True, **kw).double()
    with torch.no_grad():
        conv.weight.copy_(_uneven(gen, 10, 6, *kernel).reshape(conv.weight.shape))
    f = factorize(conv.weight, 2, conv.bias, ragged=True)
    sep = cls.from_conv(conv, 2, factors=f, backend="torch")
    assert sep.ragged and "channel_index" in dict(sep.named_buffers())
    x = torch.randn(2, 6, *([11] * len(kernel)), generator=gen, dtype=torch.float64)
    ref = conv_cls(6, 10, kernel, bias=True, **kw).double()
    with torch.no_grad():
        ref.weight.copy_(_dense_from_factors(f, 6))
        ref.bias.copy_(conv.bias)
    assert rel_err(sep(x), ref(x)) < 1e-12
    assert rel_err(sep.dense_weight(), ref.weight) < 1e-12
    with pytest.raises(ValueError, match="ragged factors need a ragged pair"):
        cls.from_conv(conv, 2, backend="torch").load_factors(f)


def test_rewrite_ragged_same_cost_lower_error(gen):
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval().double()
    with torch.no_grad():
        m[0].weight.copy_(_uneven(gen, 16, 8, 3, 3))
        m[2].weight.copy_(_uneven(gen, 16, 16, 3, 3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 8, 10, 10, generator=gen, dtype=torch.float64)
    u = dsrewrite.rewrite(m, x, rank=2, measure_time=False)
    g = dsrewrite.rewrite(m, x, rank=2, ragged=True, measure_time=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    assert g.report.flops_after == u.report.flops_after and g.report.params_after == u.report.params_after
    for Lu, Lg in zip(u.report.layers, g.report.layers):
        assert Lg.rewritten and sum(Lg.channel_ranks) == Lg.in_channels * 2
        assert Lg.error <= Lu.error + 1e-12
        assert "ragged" in Lg.rank_text
    assert sum(Lg.error for Lg in g.report.layers) < sum(Lu.error for Lu in u.report.layers)
    # the rewritten model computes the convs with the reconstructed weights
    y = F.relu(F.conv2d(x, g.model.get_submodule("0").dense_weight(), m[0].bias, padding=1))
    y = F.conv2d(y, g.model.get_submodule("2").dense_weight(), m[2].bias, padding=1)
    assert rel_err(g.model(x), y) < 1e-12
    assert dsrewrite.Report.from_json(g.report.to_json()).layers[0].channel_ranks == g.report.layers[0].channel_ranks
    full = dsrewrite.rewrite(m, x, rank="full", ragged=True, measure_time=False)
    assert rel_err(full.model(x), m(x)) < 1e-10


def test_ragged_budget_and_calibration(gen):
    m = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 8, 12, 12, generator=gen)
    r = dsrewrite.rewrite(m, x, target_flops=0.5, ragged=True, measure_time=False)
    assert r.report.flops_after <= 0.5 * r.report.flops_before
    assert all(L.channel_ranks for L in r.report.rewritten)
    cal = F.avg_pool2d(torch.randn(8, 8, 12, 12, generator=gen), 3, 1, 1)
    c = dsrewrite.rewrite(m, x, target_flops=0.5, ragged=True, calibration=cal, measure_time=False)
    assert c.report.flops_after <= 0.5 * c.report.flops_before
    for L in c.report.rewritten:
        assert L.channel_ranks and L.calib_error_after <= L.calib_error_before + 1e-9
    with torch.no_grad():
        assert torch.isfinite(c.model(x)).all()


def _direct_error(conv, f, xs, ys) -> float:
    """||Y - pw(dw(X[:, index]))|| / ||Y|| with F.conv2d in float64 (independent of the Gram objective)."""
    num = den = 0.0
    for x, y in zip(xs, ys):
        xg = x.double() if f.channel_index is None else x.double()[:, f.channel_index]
        groups = conv.in_channels if f.channel_index is None else xg.shape[1]
        z = F.conv2d(xg, f.depthwise.double(), None, conv.stride, conv.padding, conv.dilation, groups=groups)
        out = F.conv2d(z, f.pointwise.double(), None if f.bias is None else f.bias.double())
        num += float(((out - y.double()) ** 2).sum())
        den += float((y.double() ** 2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ragged_calibration_never_worse_than_ragged_svd(gen, rank):
    conv = nn.Conv2d(6, 10, 3, padding=1, stride=2).double()
    with torch.no_grad():
        conv.weight.copy_(_uneven(gen, 10, 6, 3, 3))
    xs = []
    for _ in range(2):
        x = F.avg_pool2d(torch.randn(3, 6, 9, 9, generator=gen, dtype=torch.float64), 3, 1, 1)
        x = x * torch.rand(6, generator=gen, dtype=torch.float64)[None, :, None, None] * 5  # uneven input scales
        x[:, 1] = 0.0  # a dead channel
        xs.append(x)
    with torch.no_grad():
        ys = [conv(x) for x in xs]
        res = calibrate_conv(conv, rank, xs, ys, ragged=True)
    f = res.factors
    assert f.channel_index is not None and int(f.channel_ranks.sum()) == 6 * rank
    assert res.error_after <= res.error_before + 1e-9
    plain = factorize(conv.weight, rank, conv.bias, ragged=True)
    assert res.error_before == pytest.approx(_direct_error(conv, plain, xs, ys), rel=1e-6)
    assert res.error_after == pytest.approx(_direct_error(conv, f, xs, ys), rel=1e-6)
    # the whitened split: never more whitened error than uniform, the dead channel gets no filter
    stats = PatchStats(6, 9)
    pc = patch_conv(conv)
    for x in xs:
        stats.update(pc(x))
    a = stats.autocorr()
    wr, wu = whitened_factors(conv.weight, rank, a, ragged=True), whitened_factors(conv.weight, rank, a)
    assert wr.error <= wu.error + 1e-12 and int(wr.channel_ranks[1]) == 0
    assert whitened_rank_errors(conv.weight, a, ragged=True)[rank] == pytest.approx(wr.error, rel=1e-9, abs=1e-12)


def test_ragged_onnx_matches_torch_and_checks(gen, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import dsrewrite.onnx as ds_onnx

    m = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, stride=2)).eval()
    with torch.no_grad():
        m[0].weight.copy_(_uneven(gen, 12, 6, 3, 3).float())
    x = torch.randn(2, 6, 14, 14, generator=gen)
    src, dst = tmp_path / "m.onnx", tmp_path / "m_ds.onnx"
    torch.onnx.export(m, (x,), str(src), dynamo=False)
    res = ds_onnx.rewrite(src, dst, rank=2, ragged=True)
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("Gather") == 2
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch_side = dsrewrite.rewrite(m, x, rank=2, ragged=True, measure_time=False)
    with torch.no_grad():
        want = torch_side.model(x)
    assert rel_err(torch.from_numpy(got), want) < 1e-5
    assert [L.channel_ranks for L in res.report.layers] == [L.channel_ranks for L in torch_side.report.layers]
    cli_out = tmp_path / "cli.onnx"
    assert main(["rewrite", str(src), "-o", str(cli_out), "--rank", "2", "--ragged", "--no-time", "-q"]) == 0
    assert [n.op_type for n in onnx.load(str(cli_out)).graph.node] == [n.op_type for n in proto.graph.node]


def test_cli_ragged(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--rank", "2", "--ragged",
                 "--no-time", "-q", "--report", str(out)]) == 0
    rep = dsrewrite.Report.from_json(str(out))
    assert rep.rewritten and all(L.channel_ranks for L in rep.rewritten)
    cal = tmp_path / "cal.pt"
    torch.save(torch.randn(2, 3, 32, 32), cal)
    assert main(["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--ragged", "--calibration",
                 str(cal), "--no-time", "-q", "--report", str(out)]) == 0
    rep = dsrewrite.Report.from_json(str(out))
    assert all(L.channel_ranks and L.calib_error_after is not None for L in rep.rewritten)


def test_compile_backend_ragged_equals_rewrite_and_refactorises_ragged(gen):
    """dsrewrite.compile(ragged=True) runs the same ragged plan; a weight changed after compile is
    refactorised ragged again (the compiled pair keeps its index buffer, refreshed in place)."""
    m = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1)).eval()
    with torch.no_grad():
        m[0].weight.copy_(_uneven(gen, 12, 6, 3, 3).float())
    x = torch.randn(2, 6, 10, 10, generator=gen)
    with torch.no_grad():
        compiled = dsrewrite.compile(m, rank=2, ragged=True, compiler="eager")
        want = dsrewrite.rewrite(m, x, rank=2, ragged=True, measure_time=False)
        assert rel_err(compiled(x), want.model(x)) < 1e-5
        rep = compiled.dsrewrite_reports[0]
        assert [L.channel_ranks for L in rep.layers] == [L.channel_ranks for L in want.report.layers]
        m[0].weight.copy_(_uneven(gen, 12, 6, 3, 3).float())  # a new spectrum: a new ragged split
        with pytest.warns(UserWarning, match="recomputed at the compiled ranks"):
            got = compiled(x)
        again = dsrewrite.rewrite(m, x, rank=2, ragged=True, measure_time=False).model(x)
    assert rel_err(got, again) < 1e-5


def test_progressive_ragged_keeps_pairs_ragged_across_stages(gen):
    from dsrewrite.finetune import progressive

    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 8, 8, generator=gen)
    data = [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen))]
    res = progressive(teacher, x, data, stages=2, rank=2, epochs_per_stage=1, progress=False, ragged=True)
    assert sorted(L.name for L in res.report.rewritten) == ["0", "2"]
    assert all(L.channel_ranks for L in res.report.rewritten)
    assert all(m.ragged for m in res.model.modules() if isinstance(m, SeparableConv2d))
    skipped = {L.name: L.reason for L in res.stage_reports[1].skipped}
    assert skipped["2.depthwise"].startswith("already depthwise")  # a ragged depthwise conv is still depthwise
