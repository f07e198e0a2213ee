"""Data-aware low rank (issue 22 item 4): a 1x1 conv's or linear layer's low-rank pair calibrated as the separable
pair of its one-channel view (whitened SVD by the input covariance, ridge refit of the expansion), checked against
the original layer's outputs in float64; budgets with calibration= allocate and refit the low-rank layers on the
torch routes; fit's feature distillation and parameter groups see the low-rank pairs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.calib.solve import calibrate_conv
from dsrewrite.calib.run import collect_patch_stats
from dsrewrite.plan.factorize import factorize_layer
from dsrewrite.finetune import Distiller, fit, pair_layers, param_groups, select_parameters
from dsrewrite.modules import LOWRANK_TYPES

CIN, COUT, RANK = 24, 20, 4


def _inputs(kind: str, gen: torch.Generator, decay: float, batches: int = 3):
    """Inputs whose channels are correlated: a random rotation of channels with variances falling by ``decay``
    orders of magnitude (``decay=0``: isotropic), plus an offset. Linear: ``[8, 5, Cin]``; conv: ``[4, Cin, 9, 9]``."""
    q = torch.linalg.qr(torch.randn(CIN, CIN, generator=gen))[0]
    scale = torch.logspace(0, -decay, CIN)
    out = []
    for _ in range(batches):
        if kind == "linear":
            out.append((torch.randn(8, 5, CIN, generator=gen) * scale) @ q.T + 0.2)
        else:
            z = torch.randn(4, 9, 9, CIN, generator=gen) * scale
            out.append((z @ q.T).permute(0, 3, 1, 2).contiguous() + 0.2)
    return out


def _layer(kind: str, gen: torch.Generator) -> nn.Module:
    layer = nn.Linear(CIN, COUT) if kind == "linear" else nn.Conv2d(CIN, COUT, 1, stride=2, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / math.sqrt(CIN))
        layer.bias.copy_(torch.randn(COUT, generator=gen))
    return layer


def _output_error(layer: nn.Module, f, xs) -> float:
    """``||pair(X) - layer(X)|| / ||layer(X)||`` in float64, both sides with F.linear / F.conv2d from the weights."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    red, exp = f.depthwise.double(), f.pointwise.double()
    fb = None if f.bias is None else f.bias.double()
    num = den = 0.0
    for x in xs:
        x = x.double()
        if isinstance(layer, nn.Linear):
            ref, out = F.linear(x, w, b), F.linear(F.linear(x, red), exp, fb)
        else:
            s, p = layer.stride, layer.padding
            ref, out = F.conv2d(x, w, b, s, p), F.conv2d(F.conv2d(x, red, None, s, p), exp, fb)
        num += float(((out - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_whitened_refit_beats_plain_svd_and_is_exact_at_full_rank(gen, kind):
    layer = _layer(kind, gen)
    plain = factorize_layer(layer.weight.detach(), RANK, layer.bias.detach(), lowrank=True)
    errs = {}
    for decay in (0.0, 3.0):
        xs = _inputs(kind, gen, decay)
        res = calibrate_conv(layer, RANK, xs, lowrank=True)
        f = res.factors
        assert f.lowrank and f.rank == RANK and f.channel_index is None
        assert f.depthwise.shape == (RANK, CIN) + ((1, 1) if kind == "conv" else ())
        assert f.pointwise.shape == (COUT, RANK) + ((1, 1) if kind == "conv" else ())
        after, before = _output_error(layer, f, xs), _output_error(layer, plain, xs)
        # the solver's Gram objectives agree with the direct float64 evaluation
        assert res.error_before == pytest.approx(before, rel=1e-5)
        assert res.error_after == pytest.approx(after, rel=1e-5)
        assert after <= before * (1 + 1e-6)
        errs[decay] = (before, after, res.method)
    before, after, method = errs[3.0]
    assert after < 0.8 * before and method.endswith("+refit"), errs  # strongly anisotropic inputs
    xs = _inputs(kind, gen, 3.0)
    full = calibrate_conv(layer, min(CIN, COUT), xs, lowrank=True)
    assert _output_error(layer, full.factors, xs) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_statistics_of_a_low_rank_layer_are_the_row_autocorrelation(gen, kind):
    """collect_patch_stats: ``[1, Cin, Cin]`` of a linear layer's input rows, of a 1x1 conv's input after its
    stride and padding (zero rows where it pads)."""
    model = nn.Sequential(nn.Identity(), _layer(kind, gen))
    xs = _inputs(kind, gen, 2.0, batches=2)
    stats = collect_patch_stats(model, [(x,) for x in xs], ["1"])
    rows = []
    for x in xs:
        if kind == "conv":
            x = F.pad(x.double(), (1, 1, 1, 1))[..., ::2, ::2].permute(0, 2, 3, 1)
        rows.append(x.double().reshape(-1, CIN))
    r = torch.cat(rows)
    assert stats["1"].shape == (1, CIN, CIN)
    torch.testing.assert_close(stats["1"][0], r.T @ r / r.shape[0], rtol=1e-9, atol=1e-12)
    assert collect_patch_stats(model, [(x,) for x in xs], ["1"], kinds=("kxk",)) == {}


class MlpConv(nn.Module):
    """A 3x3 conv, a strided padded 1x1 conv, and a two-layer MLP on its channels-last features: every layer kind,
    each with a share of the FLOPs a 0.6 budget spends on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 64, 1, stride=2, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        x = self.pw(self.conv(x)).permute(0, 2, 3, 1)
        return self.fc2(F.relu(self.fc1(F.relu(x)))).mean((1, 2))


def _smooth(gen, n):
    return F.avg_pool2d(torch.randn(n, 3, 8, 8, generator=gen), 3, 1, 1) + 0.1


def test_budget_with_calibration_refits_the_low_rank_layers(gen, route):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = MlpConv().eval()
    cal = _smooth(gen, 32)
    res = dsrewrite.rewrite(model, cal[:2], target_flops=0.6, calibration=cal.split(16), measure_time=False)
    assert res.report.route == route
    low = [L for L in res.report.rewritten if L.kind in ("pointwise", "linear")]
    assert {L.name for L in low} >= {"pw", "fc1"}, [(L.name, L.kind, L.reason) for L in res.report.layers]
    by_name = {d.report.name: d for d in res.decisions}
    for L in low:
        assert by_name[L.name].calibrated
        assert L.calib_error_after is not None and L.calib_error_after <= L.calib_error_before * (1 + 1e-9)
        assert isinstance(res.model.get_submodule(L.name), LOWRANK_TYPES)
    assert any("calibrated" in n for n in res.report.notes)


def test_fit_distils_and_trains_the_low_rank_pairs(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    teacher = MlpConv().eval()
    x = _smooth(gen, 6)
    res = dsrewrite.rewrite(teacher, x, target_flops=0.5, kinds=("pointwise", "linear"), measure_time=False)
    names = sorted(L.name for L in res.report.rewritten)
    assert names and set(names) <= {"pw", "fc1", "fc2"}
    student = res.model
    assert sorted(pair_layers(student)) == names  # found by structure: .reduce / .expand
    with Distiller(student, teacher, None) as d:  # None: every pair of the student
        d.teacher_forward(x)
        student(x)
        assert sorted(d.feature_losses()) == names
    select_parameters(student, "separable")
    assert {g["name"] for g in param_groups(student, 1e-3)} == {"reduce", "expand"}
    before = {n: (m.reduce.weight.detach().clone(), m.expand.weight.detach().clone())
              for n, m in pair_layers(student).items()}
    data = [(_smooth(gen, 6), None) for _ in range(2)]
    h = fit(student, teacher, data, steps=2, lr=1e-2, logit_weight=0.0, progress=False)
    assert h.steps == 2 and all(math.isfinite(v) for v in h.losses) and "feature" in h.epochs[0]
    for n, m in pair_layers(student).items():
        assert not torch.equal(m.reduce.weight, before[n][0]) and not torch.equal(m.expand.weight, before[n][1])
