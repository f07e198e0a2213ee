"""Conv subclasses and run-time weights: rewritten exactly where their semantics are known, refused by name
otherwise, and caught by the per-layer self-check when a declaration is wrong (issue 11)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
import dsrewrite.api as api
from dsrewrite.frontends import conv_modules
from dsrewrite.modules import SeparableConv2d
from dsrewrite.plan.selfcheck import check_runs

timm_layers = pytest.importorskip("timm.layers")

TOL = 1e-4  # relative error at rank="full" (float32 arithmetic; the reference is the original model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class TimmConvs(nn.Module):
    """Every registered timm conv class, stride 2 where it matters (TF 'same' padding then depends on size)."""

    def __init__(self):
        super().__init__()
        L = timm_layers
        self.same = L.Conv2dSame(3, 8, 3, stride=2)
        self.std = L.StdConv2d(8, 8, 3, padding=1)
        self.std_same = L.StdConv2dSame(8, 8, 5, stride=2, padding="same")
        self.scaled = L.ScaledStdConv2d(8, 8, 3, padding=1)
        self.scaled_same = L.ScaledStdConv2dSame(8, 6, 3, stride=2, padding="same")

    def forward(self, x):
        x = F.relu(self.same(x))
        x = F.relu(self.std(x))
        x = F.relu(self.std_same(x))
        x = F.relu(self.scaled(x))
        return self.scaled_same(x)


def test_timm_conv_subclasses_exact_on_both_routes(route):
    torch.manual_seed(0)
    model = TimmConvs().eval()
    assert model.std_same.same_pad and model.scaled_same.same_pad  # the dynamic variants are exercised
    with torch.no_grad():  # non-trivial gains so that a dropped scale would show
        model.scaled.gain.uniform_(0.5, 2.0)
        model.scaled_same.gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 47, 47)  # odd size: TF 'same' pads asymmetrically
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == route
    assert {L.name for L in res.report.rewritten} == {"same", "std", "std_same", "scaled", "scaled_same"}
    with torch.no_grad():
        for size in (47, 64, 33):  # the padding follows each input's size, as the original's does
            xi = torch.randn(2, 3, size, size)
            y0, y1 = model(xi), res.model(xi)
            assert y1.shape == y0.shape
            assert rel_err(y1, y0) <= TOL, size
    notes = {L.name: L.note or "" for L in res.report.rewritten}
    for name in ("std", "std_same", "scaled", "scaled_same"):
        assert "weight folded (inference only)" in notes[name]
    assert "folded" not in notes["same"]
    assert any(n.startswith("self-check: 5 rewritten") for n in res.report.notes), res.report.notes


def test_run_time_weights_refused_in_train_mode(route):
    model = TimmConvs().train()
    res = dsrewrite.rewrite(model, torch.randn(2, 3, 32, 32), rank="full", measure_time=False)
    reasons = {L.name: L.reason or "" for L in res.report.skipped}
    for name in ("std", "std_same", "scaled", "scaled_same"):
        assert "train mode" in reasons[name] and "eval mode" in reasons[name], reasons[name]
    assert "same" in {L.name for L in res.report.rewritten}  # a stored weight needs no folding


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        P = nn.utils.parametrizations
        self.wn1d = P.weight_norm(nn.Conv1d(4, 6, 5, padding=2))
        self.sn = P.spectral_norm(nn.Conv2d(4, 6, 3, padding=1))
        self.old_wn = nn.utils.weight_norm(nn.Conv2d(6, 5, 3, padding=1))

    def forward(self, x1, x2):
        return self.wn1d(x1), self.old_wn(F.relu(self.sn(x2)))


def test_parametrized_and_hooked_weights_folded_in_eval(route):
    torch.manual_seed(1)
    model = Norms()
    with torch.no_grad():  # move the weight norm's g away from ||v|| so that folding matters
        model.wn1d.parametrizations.weight.original0.mul_(3.0)
        model.old_wn.weight_g.mul_(0.3)
    model.train()
    for _ in range(3):  # a few power iterations for spectral norm's u, v
        model(torch.randn(2, 4, 16), torch.randn(2, 4, 12, 12))
    model.eval()
    args = (torch.randn(2, 4, 16), torch.randn(2, 4, 12, 12))
    res = dsrewrite.rewrite(model, args, rank="full", measure_time=False)
    assert {L.name for L in res.report.rewritten} == {"wn1d", "sn", "old_wn"}, [(L.name, L.reason) for L in res.report.skipped]
    for L in res.report.rewritten:
        assert "weight folded (inference only)" in L.note
    with torch.no_grad():
        for a, b in zip(model(*args), res.model(*args)):
            assert rel_err(b, a) <= TOL
    # train mode: the pair would freeze what the original recomputes at each step
    res = dsrewrite.rewrite(model.train(), args, rank="full", measure_time=False)
    assert not res.report.rewritten
    assert all("train mode" in L.reason for L in res.report.skipped)


class OwnForward(nn.Conv2d):
    """A subclass whose forward is not a plain conv."""

    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = OwnForward(3, 8, 3, padding=1)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.plain(self.conv(x))


def test_unknown_subclass_traced_through_its_own_forward_on_swap_route(monkeypatch):
    """On the module-swap route the subclass keeps its class; its own forward, traced alone, is rewritten."""
    monkeypatch.setattr(api, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no tracing")))
    model = WithSubclass().eval()
    x = torch.randn(2, 3, 10, 10)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == "fx-submodules+module-swap"
    assert {L.name for L in res.report.rewritten} == {"conv", "plain"}
    assert res.report.layer("conv").origin == "function" and type(res.model.conv) is OwnForward
    with torch.no_grad():
        assert rel_err(res.model(x), model(x)) <= TOL


class UntraceableOwnForward(nn.Conv2d):
    """A subclass whose own forward does not trace: it stays dense, its class named in the reason."""

    def forward(self, x):
        if x.sum() > -1e30:
            return super().forward(x) * 2.0


def test_unknown_subclass_that_does_not_trace_skipped_by_name_on_swap_route(monkeypatch):
    monkeypatch.setattr(api, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no tracing")))
    model = WithSubclass().eval()
    model.conv = UntraceableOwnForward(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 10, 10)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    reason = res.report.layer("conv").reason
    assert "UntraceableOwnForward" in reason and "semantics are unknown" in reason and "does not trace" in reason
    assert [L.name for L in res.report.rewritten] == ["plain"]
    with torch.no_grad():
        assert rel_err(res.model(x), model(x)) <= TOL


def test_unknown_subclass_traced_through_on_fx_route():
    """On the fx route the subclass's forward is traced: its inner F.conv2d is what gets rewritten."""
    model = WithSubclass().eval()
    x = torch.randn(2, 3, 10, 10)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == "fx"
    assert {L.name for L in res.report.rewritten} == {"conv", "plain"}
    assert res.report.layer("conv").origin == "function"
    with torch.no_grad():
        assert rel_err(res.model(x), model(x)) <= TOL


def test_wrong_declaration_caught_by_self_check(route, monkeypatch):
    """A subclass declared as a plain conv although it is not: the self-check refuses it, the model stays right."""
    monkeypatch.setitem(conv_modules._REGISTRY, f"{OwnForward.__module__}.{OwnForward.__qualname__}",
                        conv_modules._Entry(None, lambda m: False, ""))
    model = WithSubclass().eval()
    x = torch.randn(2, 3, 10, 10)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.layer("conv").reason.startswith("self-check failed (rel. error")
    assert res.report.layer("plain").rewritten
    assert isinstance(res.model.get_submodule("conv"), OwnForward)
    assert any("1 failed and were left dense: conv" in n for n in res.report.notes), res.report.notes
    with torch.no_grad():
        assert rel_err(res.model(x), model(x)) <= TOL


def test_conv_with_forward_hook_is_skipped(route):
    model = WithSubclass().eval()
    model.plain.register_forward_hook(lambda m, a, out: out * 0.5)
    res = dsrewrite.rewrite(model, torch.randn(1, 3, 8, 8), rank="full", measure_time=False,
                            exclude="conv")
    assert "forward hooks" in res.report.layer("plain").reason
    assert not res.report.rewritten


def test_check_runs_names_the_failing_layer():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(5, 4, 3)  # wrong input channels: fails when called

        def forward(self, x):
            return self.b(self.a(x))

    m = Bad()
    with pytest.raises(dsrewrite.DsrewriteError, match=r"rewritten model fails .*\(last rewritten layer entered: b"):
        check_runs(m, (torch.randn(1, 3, 8, 8),), [("a", m.a), ("b", m.b)])


def test_dynamic_same_pair_matches_timm_padding():
    """SeparableConv2d(dynamic_same=True) pads like timm's pad_same for every size and stride."""
    from timm.layers import pad_same

    torch.manual_seed(2)
    for k, s, d in [(3, 2, 1), (5, 2, 1), (4, 3, 1), (3, 1, 2)]:
        conv = nn.Conv2d(3, 4, k, stride=s, dilation=d, bias=False)
        pair = SeparableConv2d.from_conv(conv, rank=min(4, k * k), backend="torch")
        pair.dynamic_same = True
        for size in (7, 8, 13):
            x = torch.randn(1, 3, size, size + 1)
            ref = F.conv2d(pad_same(x, (k, k), (s, s), (d, d)), conv.weight, None, s, 0, d)
            assert rel_err(pair(x), ref) <= TOL


@pytest.mark.parametrize("padding", [None, "SAME"])
def test_transformers_weight_standardized_conv_rewritten_on_both_routes(route, padding):
    """transformers' BiT convs (weight standardised, dynamic TF 'same' padding with global_padding='SAME')."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BitConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4,
                                 global_padding=padding, layer_type="bottleneck")
    model = transformers.BitModel(cfg).eval()
    x = torch.randn(1, 3, 33, 33)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    rewritten = {L.name: L.note or "" for L in res.report.rewritten}
    assert "embedder.convolution" in rewritten and "WeightStandardizedConv2d" in rewritten["embedder.convolution"]
    with torch.no_grad():
        for size in (33, 40):
            xi = torch.randn(2, 3, size, size)
            assert rel_err(res.model(xi).last_hidden_state, model(xi).last_hidden_state) <= TOL, size
