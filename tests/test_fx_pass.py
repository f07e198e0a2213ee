"""The torch.fx pass: which convs it rewrites, names it keeps, exactness at full rank, FLOP totals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager
from torch.utils.flop_counter import FlopCounterMode

import dsrewrite
from dsrewrite import DsrewriteError, SeparableConv1d, SeparableConv2d, SeparableRewritePass
from tests.conftest import rel_err


def flops(model, *args):
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(*args)
    return c.get_total_flops()


class Mixed(nn.Module):
    """Module convs, a shared conv called twice, a functional conv, a 1-D conv, and convs to skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fw = nn.Parameter(torch.randn(10, 12, 3, 3) * 0.1)
        self.fb = nn.Parameter(torch.randn(10) * 0.1)
        self.c1 = nn.Conv1d(10, 8, 5, padding=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        x = self.stem(x).relu()
        x = self.shared(self.shared(x))
        x = self.pw(self.dw(x))
        x = F.conv2d(x, self.fw, self.fb, stride=1, padding=1)
        n, c, h, w = x.shape
        y = self.c1(x.reshape(n, c, h * w)).reshape(n, 8, h, w)
        return self.up(y)


def test_mixed_model_rules_fire_and_full_rank_is_exact(gen):
    torch.manual_seed(gen.initial_seed() % 2**31)
    model = Mixed().double().eval()
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    rep = res.report
    names = {L.name: L for L in rep.layers}
    assert {n for n, L in names.items() if L.rewritten} == {"stem", "shared", "fw", "c1"}
    assert names["fw"].origin == "function"
    assert not names["dw"].rewritten and "depthwise" in names["dw"].reason
    assert not names["pw"].rewritten and "1x1" in names["pw"].reason
    assert not names["up"].rewritten and "transposed" in names["up"].reason
    # rules fired: module types, names kept, functional conv turned into a module
    assert isinstance(res.model.get_submodule("stem"), SeparableConv2d)
    assert isinstance(res.model.get_submodule("shared"), SeparableConv2d)
    assert isinstance(res.model.get_submodule("c1"), SeparableConv1d)
    assert "fw_separable.depthwise.weight" in res.model.state_dict()
    assert "fw" not in dict(res.model.named_parameters())
    assert sum(1 for n in res.model.graph.nodes if n.op == "call_module" and n.target == "shared") == 2
    # exact at full rank (float64 reference = the original model)
    assert rel_err(res.model(x), model(x)) < 1e-10
    # the shared conv is counted for both calls
    assert names["shared"].flops_before == 2 * 2 * (16 * 16 * 9) * 2 * 64


def test_flop_and_param_totals_match_flopcounter(gen):
    model = Mixed().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    for rank in (1, 2, "auto", "full"):
        res = dsrewrite.rewrite(model, x, rank=rank, measure_time=False)
        assert res.report.flops_before == flops(model, x)
        assert res.report.flops_after == flops(res.model, x), rank
        assert res.report.params_before == sum(p.numel() for p in model.parameters())
        assert res.report.params_after == sum(p.numel() for p in res.model.parameters())


def test_input_model_is_not_mutated_unless_inplace(gen):
    model = Mixed().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8, generator=gen)
    res = dsrewrite.rewrite(model, x, rank=2, measure_time=False)
    assert isinstance(model.stem, nn.Conv2d) and model.training and model.stem.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    res = dsrewrite.rewrite(model, x, rank=2, inplace=True, measure_time=False)
    assert isinstance(model.stem, SeparableConv2d) and model.stem is res.model.stem


def test_include_exclude_reasons(gen):
    model = Mixed().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    rep = dsrewrite.rewrite(model, x, rank=2, include=["stem", "shared"], exclude="shared",
                            measure_time=False).report
    got = {L.name: (L.rewritten, L.reason) for L in rep.layers}
    assert got["stem"] == (True, None)
    assert got["shared"] == (False, "matched by exclude")
    assert got["c1"] == (False, "not matched by include")
    rep = dsrewrite.rewrite(model, x, rank=2, include=lambda n: n == "c1", measure_time=False).report
    assert [L.name for L in rep.rewritten] == ["c1"]


def test_auto_rank_saves_and_skips_tiny_layers(gen):
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 64, 3), nn.Conv2d(64, 64, 3)).eval()
    x = torch.randn(1, 3, 16, 16, generator=gen)
    rep = dsrewrite.rewrite(model, x, measure_time=False).report
    first = rep.layer("0")
    assert not first.rewritten and "saves nothing" in first.reason
    for L in rep.rewritten:
        assert L.flops_after < L.flops_before and L.policy == "auto"
    assert rep.layer("2").rewritten and rep.layer("2").flops_ratio < 0.6


def test_runtime_weight_conv_is_skipped_with_reason(gen):
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w * 2.0)

    rep = dsrewrite.rewrite(Dyn(), torch.randn(1, 3, 6, 6, generator=gen), rank=2, measure_time=False).report
    assert len(rep.layers) == 1 and not rep.layers[0].rewritten
    assert "computed at run time" in rep.layers[0].reason


def test_pass_works_in_pass_manager(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 10, 10, generator=gen)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    p = SeparableRewritePass((x,), rank="full")
    result = PassManager(passes=[p])(gm)
    assert result.modified
    assert isinstance(result.graph_module.get_submodule("0"), SeparableConv2d)
    assert rel_err(result.graph_module(x), model(x)) < 1e-5
    assert len(p.decisions) == 2 and p.flops_before == flops(model, x)


def test_pass_takes_the_options_object_and_refuses_whole_model_options(gen):
    """SeparableRewritePass takes a RewriteConfig (or its fields): the same plan as rewrite() on the same options,
    budgets included; what needs the whole model (calibration, target_latency) is refused in one line."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    cfg = dsrewrite.RewriteConfig(target_flops=0.5, kinds="kxk")
    p = SeparableRewritePass((x,), cfg)
    gm = p(fx.symbolic_trace(copy.deepcopy(model))).graph_module
    ref = dsrewrite.rewrite(model, x, cfg, measure_time=False)
    assert [d.report.rank for d in p.decisions] == [L.rank for L in ref.report.layers]
    assert sum(d.report.flops_after for d in p.decisions) <= 0.5 * flops(model, x)
    assert rel_err(gm(x), ref.model(x)) < 1e-6  # the same factors
    q = SeparableRewritePass((x,), rank="full", backend="torch")  # keyword options build the config
    assert rel_err(q(fx.symbolic_trace(copy.deepcopy(model))).graph_module(x), model(x)) < 1e-5
    for bad, word in ((dict(calibration=x), "calibration"), (dict(target_latency=0.5), "target_latency")):
        with pytest.raises(DsrewriteError, match=f"option '{word}' is not supported by SeparableRewritePass"):
            SeparableRewritePass((x,), **bad)
    with pytest.raises(DsrewriteError, match="unknown option 'rnak' for SeparableRewritePass"):
        SeparableRewritePass((x,), rnak=2)


def test_rewritten_model_can_be_rewritten_again(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 10, 10, generator=gen)
    once = dsrewrite.rewrite(model, x, rank=2, include="2", measure_time=False)
    twice = dsrewrite.rewrite(once.model, x, rank=2, measure_time=False)
    reasons = {L.name: L.reason for L in twice.report.layers}
    assert twice.report.layer("0").rewritten
    assert "already depthwise" in reasons["2.depthwise"] and "earlier rewrite" in reasons["2.pointwise"]
    # the earlier pair stays one module (traced as a leaf), with its parameters untouched
    pair = twice.model.get_submodule("2")
    assert isinstance(pair, SeparableConv2d) and pair.rank == 2
    assert torch.equal(pair.depthwise.weight, once.model.get_submodule("2").depthwise.weight)
    assert isinstance(twice.model.get_submodule("0"), SeparableConv2d)
    assert rel_err(twice.model(x), once.model(x)) < 0.999  # still runs, approximation of the approximation


@pytest.mark.parametrize("bad, msg", [
    (dict(model="not a model"), "must be a torch.nn.Module"),
    (dict(rank=0), "rank must be >= 1"),
    (dict(rank=-3), "rank must be >= 1"),
    (dict(rank="half"), "rank must be"),
    (dict(rank=2.5), "rank must be"),
    (dict(backend="cuda"), "backend must be"),
    (dict(x=torch.randn(1, 5, 8, 8)), "example inputs do not run"),
])
def test_bad_input_one_line_errors(bad, msg):
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    args = dict(model=model, x=torch.randn(1, 3, 8, 8))
    args.update(bad)
    kw = {k: v for k, v in bad.items() if k not in ("model", "x")}
    with pytest.raises(DsrewriteError, match=msg) as e:
        dsrewrite.rewrite(args["model"], args["x"], measure_time=False, **kw)
    assert "\n" not in str(e.value)


def test_no_conv_is_not_an_error():
    rep = dsrewrite.rewrite(nn.Sequential(nn.ReLU()), torch.randn(2, 4), measure_time=False).report
    assert rep.layers == [] and any("no convolution or linear layer found" in n for n in rep.notes)
    # a linear layer under a rank policy (KxK only by default) is listed, with the kinds that would take it
    rep = dsrewrite.rewrite(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4), measure_time=False).report
    assert "kinds='all'" in rep.layer("0").reason and any("no eligible layer" in n for n in rep.notes)


def test_time_is_measured_next_to_flops(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    rep = dsrewrite.rewrite(model, torch.randn(1, 3, 12, 12, generator=gen), rank=2).report
    assert rep.time_before_ms > 0 and rep.time_after_ms > 0 and "cpu" in rep.time_device
    assert "measured time" in rep.table()


class OptionalArg(nn.Module):
    """``forward(x, scale=None)``: a branch on an optional argument, as in ``mask=None`` / ``labels=None``."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, scale=None):
        y = self.c(x)
        if scale is not None:
            y = y * scale
        return y


def test_optional_forward_arguments_trace_with_their_defaults(gen):
    model = OptionalArg().eval()
    x = torch.randn(1, 3, 12, 12, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == "fx" and res.report.layer("c").rewritten
    assert rel_err(res.model(x), model(x)) < 1e-5


def test_graph_that_does_not_run_falls_back_to_module_swap(gen):
    """Given positionally as None, ``scale`` is a placeholder: the traced graph takes the ``scale`` branch and
    fails on the example inputs although the model runs. The pass falls back and says why."""
    model = OptionalArg().eval()
    x = torch.randn(1, 3, 12, 12, generator=gen)
    res = dsrewrite.rewrite(model, (x, None), rank="full", measure_time=False)
    assert res.report.route == "fx-submodules+module-swap"
    assert "traced graph does not run" in res.report.notes[0]
    assert res.report.layer("c").rewritten
    assert rel_err(res.model(x, None), model(x, None)) < 1e-5


def test_tied_conv_weights_are_left_alone_with_a_reason(gen):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 3))
    model[2].weight = model[0].weight  # two modules, one Parameter
    x = torch.randn(1, 4, 10, 10, generator=gen)
    res = dsrewrite.rewrite(model.eval(), x, rank=2, measure_time=False)
    for name, other in (("0", "2"), ("2", "0")):
        layer = res.report.layer(name)
        assert not layer.rewritten and f"weight shared with {other}" in layer.reason
    assert res.report.layer("3").rewritten


def test_frozen_conv_gives_a_frozen_pair(gen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    model[0].requires_grad_(False)
    res = dsrewrite.rewrite(model, torch.randn(1, 3, 9, 9, generator=gen), rank=2, measure_time=False)
    assert not any(p.requires_grad for p in res.model.get_submodule("0").parameters())
    assert all(p.requires_grad for p in res.model.get_submodule("1").parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_module_is_refused_with_a_clear_error():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(DsrewriteError, match="TorchScript modules cannot be rewritten"):
        dsrewrite.rewrite(scripted, torch.randn(1, 3, 8, 8))
