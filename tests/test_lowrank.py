"""Low-rank pairs for 1x1 convs and linear layers (issue 22): the factorisation, the modules, the planner's kinds,
and both torch routes, checked against F.linear / F.conv2d in float64 and FlopCounterMode."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsrewrite
from dsrewrite.plan import cost_model as cost
from dsrewrite.errors import DsrewriteError
from dsrewrite.plan.factorize import exact_factors, factorize_layer, rank_errors
from dsrewrite.ir import ConvSpec
from dsrewrite.modules import LowRankConv2d, LowRankLinear
from dsrewrite.report import Report

from tests.conftest import rel_err


class Mixed(nn.Module):
    """A 3x3 conv, a strided padded 1x1 conv, a linear module and F.linear on a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 24, 1, stride=2, padding=1)
        self.fc = nn.Linear(24, 40)
        self.head_w = nn.Parameter(torch.randn(10, 40) / 7)
        self.head_b = nn.Parameter(torch.randn(10))

    def forward(self, x):
        x = F.relu(self.pw(F.relu(self.conv(x))))
        x = x.mean((2, 3))
        return F.linear(F.relu(self.fc(x)), self.head_w, self.head_b)


def _flops(model, x) -> int:
    with FlopCounterMode(display=False) as c, torch.no_grad():
        model(x)
    return c.get_total_flops()


def test_lowrank_factors_are_the_truncated_svd(gen):
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    x = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for k in (1, 5, 20):
        f = factorize_layer(w, k, b, lowrank=True)
        assert f.lowrank and f.depthwise.shape == (k, 20) and f.pointwise.shape == (30, k)
        best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young: the best rank-k fit
        got = F.linear(F.linear(x, f.depthwise), f.pointwise, f.bias)
        assert rel_err(got, F.linear(x, best, b)) <= 1e-10
        assert f.error == pytest.approx(float(s[k:].square().sum().sqrt() / s.square().sum().sqrt()), abs=1e-12)
        assert rank_errors(w, lowrank=True)[k] == pytest.approx(f.error, abs=1e-12)
    ex = exact_factors(w, b, lowrank=True)
    assert rel_err(F.linear(F.linear(x, ex.depthwise), ex.pointwise, ex.bias), F.linear(x, w, b)) <= 1e-12


def test_lowrank_costs_come_from_the_one_channel_view():
    lin = ConvSpec("fc", 384, 1536, (), stride=(), dilation=(), bias=True, pixels=8 * 197)
    pw = ConvSpec("pw", 64, 256, (1, 1), bias=False, out_spatial=(28, 28), batch=8)
    for spec, rows in ((lin, 8 * 197), (pw, 8 * 28 * 28)):
        cin, cout = spec.in_channels, spec.out_channels
        assert spec.lowrank and spec.full_rank == min(cin, cout)
        assert cost.dense_flops(spec) == 2 * rows * cin * cout
        assert cost.separable_flops(spec, 7) == 2 * rows * 7 * (cin + cout)
        assert cost.separable_params(spec, 7) == 7 * (cin + cout) + (cout if spec.bias else 0)
        assert cost.breakeven_rank(spec) == pytest.approx(cin * cout / (cin + cout))
    assert lin.kind == "linear" and pw.kind == "pointwise" and ConvSpec("c", 3, 8, (3, 3)).kind == "kxk"


def test_lowrank_modules_answer_the_layer_interface(gen):
    lin = nn.Linear(12, 9).double()
    pair = LowRankLinear.from_factors(factorize_layer(lin.weight, 9, lin.bias, lowrank=True))
    x = torch.randn(4, 3, 12, generator=gen, dtype=torch.float64)
    assert rel_err(pair(x), lin(x)) <= 1e-10
    assert (pair.in_features, pair.out_features, pair.rank) == (12, 9, 9)
    assert rel_err(pair.weight, lin.weight) <= 1e-10 and pair.bias is pair.expand.bias
    assert set(pair.state_dict()) == {"reduce.weight", "expand.weight", "expand.bias"}
    with pytest.raises(AttributeError, match="read-only"):
        pair.in_features = 3
    conv = nn.Conv2d(8, 6, 1, stride=2, padding=1, padding_mode="reflect").double()
    cp = LowRankConv2d.from_factors(factorize_layer(conv.weight, 6, conv.bias, lowrank=True), stride=2, padding=1,
                                    padding_mode="reflect")
    xc = torch.randn(2, 8, 7, 5, generator=gen, dtype=torch.float64)
    assert rel_err(cp(xc), conv(xc)) <= 1e-10
    assert (cp.kernel_size, cp.stride, cp.padding, cp.groups, cp.weight.shape) == ((1, 1), (2, 2), (1, 1), 1,
                                                                                   conv.weight.shape)


def test_full_rank_all_kinds_is_exact_on_both_routes(route):
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 12, 12)
    r = dsrewrite.rewrite(model, x, rank="full", kinds="all", measure_time=False)
    assert r.report.route == route
    kinds = {L.name: L.kind for L in r.report.rewritten}
    assert kinds == {"conv": "kxk", "pw": "pointwise", "fc": "linear", "head_w": "linear"}
    assert r.report.layer("head_w").origin == "function"
    assert isinstance(r.model.fc, LowRankLinear) and isinstance(r.model.pw, LowRankConv2d)
    with torch.no_grad():
        assert rel_err(r.model(x), model(x)) <= 1e-4
    assert isinstance(model.fc, nn.Linear)  # the user's model is untouched


def test_default_kinds_kxk_for_a_rank_all_under_a_budget():
    torch.manual_seed(1)
    model = Mixed().eval()
    x = torch.randn(2, 3, 12, 12)
    r = dsrewrite.rewrite(model, x, rank="auto", measure_time=False)
    assert {L.kind for L in r.report.rewritten} == {"kxk"}
    assert "kind 'linear' not chosen" in r.report.layer("fc").reason
    assert "kind 'pointwise' not chosen" in r.report.layer("pw").reason
    r = dsrewrite.rewrite(model, x, target_flops=0.6, measure_time=False)
    assert {r.report.layer(n).policy for n in ("conv", "pw", "fc", "head_w")} == {"target_flops"}  # all allocated
    assert _flops(r.model, x) <= 0.6 * _flops(model, x) + 1
    r = dsrewrite.rewrite(model, x, target_params=0.9, kinds=["linear"], measure_time=False)
    assert {L.kind for L in r.report.rewritten} == {"linear"}


@pytest.mark.parametrize("bad", ["conv", ["kxk", "dense"], 3, []])
def test_bad_kinds_is_a_one_line_error(bad):
    with pytest.raises(DsrewriteError, match="kinds must be") as e:
        dsrewrite.rewrite(Mixed(), torch.randn(1, 3, 8, 8), kinds=bad, measure_time=False)
    assert "\n" not in str(e.value)


def test_pairs_of_an_earlier_rewrite_are_not_rewritten_again():
    torch.manual_seed(2)
    model = Mixed().eval()
    x = torch.randn(1, 3, 12, 12)
    once = dsrewrite.rewrite(model, x, rank="full", kinds="all", measure_time=False).model
    twice = dsrewrite.rewrite(once, x, rank=1, kinds="all", measure_time=False)
    halves = [L for L in twice.report.layers if L.reason == "part of a pair from an earlier rewrite"]
    assert {L.name for L in halves} >= {"fc.reduce", "fc.expand", "pw.reduce", "pw.expand", "conv.pointwise"}
    assert not twice.report.rewritten


def test_report_json_says_the_kind_and_reads_schema_1(tmp_path):
    torch.manual_seed(3)
    r = dsrewrite.rewrite(Mixed().eval(), torch.randn(1, 3, 12, 12), rank="full", kinds="all", measure_time=False)
    back = Report.from_json(r.report.to_json())
    assert [L.kind for L in back.layers] == [L.kind for L in r.report.layers]
    assert "linear" in back.table() and "1 linear" not in back.table().splitlines()[0]
    old = json.loads(r.report.to_json())
    old["schema"] = 1
    for item in old["layers"]:
        item["kind"] = item.pop("origin")
        del item  # schema 1 had no origin field
    first = Report.from_dict(old)
    assert first.layer("head_w").origin == "function" and first.layer("conv").kind == "kxk"


@pytest.mark.parametrize("name, size", [("mobilenetv3_large_100", 64), ("convnext_atto", 64),
                                        ("vit_tiny_patch16_224", 64), ("resnet50", 64)])
def test_timm_models_exact_at_full_rank_and_meet_half_the_flops(name, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    kw = {"img_size": size} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(1, 3, size, size)
    full = dsrewrite.rewrite(model, x, rank="full", kinds="all", measure_time=False)
    assert {L.kind for L in full.report.rewritten} >= {"linear"}
    with torch.no_grad():
        assert rel_err(full.model(x), model(x)) <= 1e-4
    half = dsrewrite.rewrite(model, x, target_flops=0.5, measure_time=False)
    assert _flops(half.model, x) <= 0.5 * _flops(model, x) * (1 + 1e-9)


def test_transformers_conv1d_is_a_linear_layer():
    """GPT-2's layers are transformers' Conv1D (weight stored [Cin, Cout], addmm): registered as linear layers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50,
                                                           n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 10))
    r = dsrewrite.rewrite(model, ids, rank="full", kinds="all", measure_time=False)
    assert {L.name for L in r.report.rewritten} == {f"h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj")}
    assert isinstance(r.model.h[0].mlp.c_fc, LowRankLinear) and r.model.h[0].mlp.c_fc.nf == 128  # attributes carried
    with torch.no_grad():
        assert rel_err(r.model(ids).last_hidden_state, model(ids).last_hidden_state) <= 1e-4


class CastLinear(nn.Linear):
    """A Linear subclass with its own forward (as timm's Linear): traced through, its F.linear rewritten."""

    def forward(self, x):
        return F.linear(x.contiguous(), self.weight, self.bias)


def test_linear_subclass_with_its_own_forward_is_rewritten_through_it(route):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), CastLinear(24, 12)).eval()
    x = torch.randn(5, 16)
    r = dsrewrite.rewrite(model, x, rank="full", kinds="all", measure_time=False)
    assert r.report.route == route and {L.name for L in r.report.rewritten} == {"0", "2"}
    with torch.no_grad():
        assert rel_err(r.model(x), model(x)) <= 1e-5


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(self.att(x, x, x)[0])


def test_multihead_attention_projections_are_reported_not_silently_left(route):
    """nn.MultiheadAttention computes its projections inside F.multi_head_attention_forward: both are listed, left
    dense with that reason and their FLOPs (rows from the query), on both routes; the model stays exact."""
    torch.manual_seed(7)
    model = WithAttention().eval()
    x = torch.randn(2, 5, 32)
    r = dsrewrite.rewrite(model, x, rank="full", kinds="all", measure_time=False)
    assert r.report.route == route
    rows = {L.name: L for L in r.report.layers}
    assert set(rows) == {"att.in_proj", "att.out_proj", "fc"} and rows["fc"].rewritten
    for name, cout in (("att.in_proj", 96), ("att.out_proj", 32)):
        L = rows[name]
        assert not L.rewritten and "F.multi_head_attention_forward" in L.reason and L.kind == "linear"
        assert L.flops_before == 2 * 10 * 32 * cout  # 10 query rows
    with torch.no_grad():
        assert rel_err(r.model(x), model(x)) <= 1e-5
