"""Data-aware initialisation (dsrewrite/calibrate.py): never worse than plain SVD on the calibration objective,
no NaN on dead channels, objectives match a direct float64 evaluation, sequential calibration helps end to end."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dsrewrite
from dsrewrite.calib.run import as_batches
from dsrewrite.calib.solve import calibrate_conv, whiten_roots, whitened_factors, whitened_rank_errors
from dsrewrite.errors import DsrewriteError
from dsrewrite.plan.factorize import factorize, rank_errors

from tests.conftest import rel_err


def _direct_error(conv: nn.Conv2d, f, xs, ys) -> float:
    """||Y - pw(dw(X))|| / ||Y|| with F.conv2d in float64: an independent check of the Gram-based objective."""
    num = den = 0.0
    cin = conv.in_channels
    for x, y in zip(xs, ys):
        z = F.conv2d(x.double(), f.depthwise.double(), None, conv.stride, conv.padding, conv.dilation, groups=cin)
        out = F.conv2d(z, f.pointwise.double(), None if f.bias is None else f.bias.double())
        num += float(((out - y.double()) ** 2).sum())
        den += float((y.double() ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)  # all-zero targets: absolute error


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cin=st.integers(1, 6), cout=st.integers(1, 8), kh=st.integers(1, 3), kw=st.integers(2, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 1), bias=st.booleans(), rank=st.integers(1, 9),
       dead=st.integers(0, 6), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**31 - 1))
def test_never_worse_than_plain_svd(cin, cout, kh, kw, stride, padding, bias, rank, dead, scale, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g))
    xs = []
    for _ in range(2):
        x = F.avg_pool2d(torch.randn(3, cin, 7, 8, generator=g), 3, 1, 1) * scale + 0.3 * scale
        x[:, : min(dead, cin)] = 0.0  # dead channels: zero variance
        xs.append(x)
    with torch.no_grad():
        ys = [conv(x) for x in xs]
        res = calibrate_conv(conv, rank, xs, ys)
    f = res.factors
    for t in (f.depthwise, f.pointwise) + ((f.bias,) if f.bias is not None else ()):
        assert torch.isfinite(t).all()
    assert math.isfinite(res.error_before) and math.isfinite(res.error_after)
    assert res.error_after <= res.error_before + 1e-9
    # the objectives agree with a direct float64 evaluation of the candidates
    plain = factorize(conv.weight, rank, conv.bias)
    assert res.error_before == pytest.approx(_direct_error(conv, plain, xs, ys), rel=1e-5, abs=1e-7)
    assert res.error_after == pytest.approx(_direct_error(conv, f, xs, ys), rel=1e-5, abs=1e-7)


def test_all_zero_input_gives_plain_svd_and_no_nan(gen):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    xs = [torch.zeros(2, 4, 5, 5)]
    res = calibrate_conv(conv, 2, xs)
    assert torch.isfinite(res.factors.depthwise).all() and torch.isfinite(res.factors.pointwise).all()
    assert res.error_after <= res.error_before + 1e-12
    root, inv, live = whiten_roots(torch.zeros(4, 9, 9))
    assert not live.any() and torch.equal(root, torch.eye(9, dtype=root.dtype).expand(4, 9, 9))


def test_whiten_roots_are_damped_square_roots(gen):
    b = torch.randn(5, 9, 40, generator=gen, dtype=torch.float64)
    a = b @ b.transpose(1, 2) / 40
    a[2] = 0.0  # a dead channel
    root, inv, live = whiten_roots(a, damp=1e-2)
    assert live.tolist() == [True, True, False, True, True]
    lam = 1e-2 * float(torch.diagonal(a, dim1=1, dim2=2).mean(1).mean())
    eye = torch.eye(9, dtype=torch.float64)
    for c in (0, 1, 3, 4):
        assert rel_err(root[c] @ root[c], a[c] + lam * eye) < 1e-10
        assert rel_err(root[c] @ inv[c], eye) < 1e-10
    assert torch.equal(root[2], eye)


def test_whitening_with_white_inputs_is_plain_svd(gen):
    w = torch.randn(7, 3, 3, 3, generator=gen)
    eye = torch.eye(9, dtype=torch.float64).expand(3, 9, 9)
    assert whitened_rank_errors(w, eye) == pytest.approx(rank_errors(w), abs=1e-12)
    f = whitened_factors(w, 2, eye)
    p = factorize(w, 2)
    dense = lambda f: torch.einsum("ocr,crk->ock", f.pointwise.reshape(7, 3, 2).double(),  # noqa: E731
                                   f.depthwise.reshape(3, 2, 9).double())
    assert rel_err(dense(f), dense(p)) < 1e-5


def test_whitened_svd_beats_plain_on_correlated_inputs(gen):
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    xs = [F.avg_pool2d(torch.randn(4, 8, 12, 12, generator=gen), 5, 1, 2) for _ in range(2)]
    res = calibrate_conv(conv, 1, xs)
    assert res.method == "whitened+refit"
    assert res.error_after < 0.8 * res.error_before


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1)).eval()


def test_sequential_calibration_reduces_final_error_on_held_out_data(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    m = _cnn()
    smooth = lambda n: F.avg_pool2d(torch.randn(n, 3, 20, 20, generator=gen), 3, 1, 1)  # noqa: E731
    cal, test = smooth(64), smooth(32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    plain = dsrewrite.rewrite(m, cal[:1], rank=2, measure_time=False)
    calib = dsrewrite.rewrite(m, cal[:1], rank=2, measure_time=False, calibration=cal)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the user's model is untouched
    with torch.no_grad():
        y = m(test)
        e_plain, e_cal = rel_err(plain.model(test), y), rel_err(calib.model(test), y)
    assert e_cal < 0.7 * e_plain
    layers = calib.report.rewritten
    assert len(layers) == 4
    for L in layers:
        assert L.calib_error_after <= L.calib_error_before + 1e-9
    assert any("calibrated 4 layer(s)" in n for n in calib.report.notes)


def test_inplace_calibration_uses_a_copy_of_the_original(gen):
    """In place, the targets must still come from the original model: the result equals the copy-based
    rewrite of an identical model (float32 round-off: rel. error <= 1e-5; targets read from the model being
    rewritten give a different fit from the second layer on), and fits the calibration data better than
    plain SVD does."""
    m = _cnn()
    ref = _cnn()
    ref.load_state_dict(m.state_dict())
    cal = torch.randn(8, 3, 12, 12, generator=gen)
    batches = [cal[:4], cal[4:]]
    want = dsrewrite.rewrite(ref, cal[:1], rank=3, measure_time=False, calibration=batches)
    plain = dsrewrite.rewrite(ref, cal[:1], rank=3, measure_time=False)
    r = dsrewrite.rewrite(m, cal[:1], rank=3, measure_time=False, calibration=batches, inplace=True)
    with torch.no_grad():
        y = ref(cal)
        got = r.model(cal)
        assert rel_err(got, want.model(cal)) <= 1e-5
        assert rel_err(got, y) < rel_err(plain.model(cal), y)
    assert all(L.calib_error_after is not None for L in r.report.rewritten)


def test_calibration_argument_errors():
    with pytest.raises(DsrewriteError, match="empty"):
        as_batches(torch.empty(0, 3))
    with pytest.raises(DsrewriteError, match="iterable"):
        as_batches(3)
    with pytest.raises(DsrewriteError, match="no batches"):
        as_batches([])
    assert [b[0].shape[0] for b in as_batches(torch.randn(10, 2), batch_size=4)] == [4, 4, 2]


def test_calibration_data_that_does_not_fit_is_a_one_line_error(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    for bad in (torch.randn(3, 8, 8, generator=gen), torch.randn(4, 3, 10, 10, generator=gen)):
        with pytest.raises(DsrewriteError, match="calibration batches do not run through the model") as e:
            dsrewrite.rewrite(model, x, rank=2, calibration=bad, measure_time=False)
        assert "\n" not in str(e.value)


def test_list_batches_are_one_input_when_the_model_takes_a_list():
    imgs = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    assert as_batches([imgs, imgs], example_args=([torch.randn(3, 8, 8)],)) == [(imgs,), (imgs,)]
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    assert as_batches([[x, y]], example_args=(x,))[0][0] is x  # DataLoader pairs: inputs first
