"""The module-swap route runs on the user's model: pairs answer the conv interface, user modules keep their class,
a failing fx rewrite falls back, a layer that breaks the model is left dense, and ``inplace=True`` is atomic."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite import api
from dsrewrite.modules import SeparableConv1d, SeparableConv2d
from tests.conftest import rel_err

SWAP = "fx-submodules+module-swap"


def _untraceable(x: torch.Tensor) -> bool:
    return bool(x.sum() > -1e30)  # data-dependent control flow: symbolic_trace cannot take it


class CausalConv1d(nn.Module):
    """encodec's SConv1d pattern: the parent reads its conv's kernel, stride and dilation to pad at run time."""

    def __init__(self, cin, cout, k, stride=1, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride=stride, dilation=dilation)

    def forward(self, x):
        k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
        x = F.pad(x, ((k - 1) * d - (s - 1), 0), mode="reflect")
        return self.conv(x)


class WhisperLike(nn.Module):
    """transformers' WhisperEncoder pattern: reads ``conv.stride`` and ``weight.dtype`` around the call."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(6, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1)
        self.block = CausalConv1d(16, 12, 5, stride=2, dilation=2)

    def forward(self, x):
        x = x.to(self.conv1.weight.dtype)
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        scale = self.conv1.stride[0] * self.conv2.stride[0] * self.conv1.in_channels / self.conv2.out_channels
        return self.block(y) * scale


def test_pairs_answer_the_conv_interface(gen):
    for conv in (nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect"),
                 nn.Conv1d(3, 5, 7, stride=3, padding="valid", bias=False)):
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        cls = SeparableConv2d if isinstance(conv, nn.Conv2d) else SeparableConv1d
        pair = cls.from_conv(conv, rank=min(conv.out_channels, conv.weight[0, 0].numel()))
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            assert getattr(pair, attr) == getattr(conv, attr), attr
        assert (pair.bias is None) == (conv.bias is None)
        w = pair.weight
        assert w.shape == conv.weight.shape and w.dtype == conv.weight.dtype and w.device == conv.weight.device
        assert rel_err(w, conv.weight) < 1e-5
        w.sum().backward()  # the computed weight back-propagates into the factors
        assert pair.depthwise.weight.grad is not None and pair.pointwise.weight.grad is not None
        for attr, value in (("stride", (1, 1)), ("kernel_size", 3), ("weight", nn.Parameter(conv.weight.clone())),
                            ("in_channels", 2)):
            with pytest.raises(AttributeError, match="read-only"):
                setattr(pair, attr, value)
        with pytest.raises(AttributeError, match="cannot be assigned"):
            pair.weight.data = conv.weight.detach().clone()


def test_parent_code_reading_conv_attributes_rewrites_on_both_routes(route, gen):
    model = WhisperLike().eval()
    x = torch.randn(2, 6, 37, generator=gen)
    ref = model(x)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == route
    assert {L.name for L in res.report.rewritten} == {"conv1", "conv2", "block.conv"}
    x2 = torch.randn(3, 6, 53, generator=gen)  # fresh data, another length
    assert rel_err(res.model(x2), model(x2)) < 1e-5
    assert rel_err(model(x), ref) == 0  # the original is untouched


class Encoder(nn.Module):
    """A user module with a functional conv, a property and attributes its parent reads."""

    def __init__(self):
        super().__init__()
        self.stem_weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.stem_bias = nn.Parameter(torch.randn(8))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
        self._stride = 2

    @property
    def output_stride(self):
        return self._stride

    def channels(self):
        return self.body[0].out_channels

    def forward(self, x):
        return self.body(F.relu(F.conv2d(x, self.stem_weight, self.stem_bias, stride=2, padding=1)))


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Conv2d(8, 5, 3, padding=1)
        self.head.is_head = True  # a plain attribute user code set on a conv
        self.same_head = self.head  # one conv registered at two paths

    def forward(self, x):
        if _untraceable(x):
            f = self.encoder(x)
        assert self.encoder.output_stride == 2 and self.encoder.channels() == 8 and self.head.is_head
        return self.same_head(f) + self.head(f)


def test_swap_route_keeps_user_modules_and_reaches_functional_convs(gen):
    model = Segmenter().eval()
    types = {q: type(m) for q, m in model.named_modules()}
    x = torch.randn(2, 3, 16, 16, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == SWAP
    new = res.model
    assert type(new) is Segmenter and type(new.encoder) is Encoder and new.encoder.output_stride == 2
    assert not any(isinstance(m, torch.fx.GraphModule) for m in new.modules())
    assert {L.name for L in res.report.rewritten} == {"encoder", "encoder.body.0", "head"}
    assert isinstance(new.head, SeparableConv2d) and new.same_head is new.head and new.head.is_head
    grouped = next(L for L in res.report.layers if L.name == "encoder.body.2")
    assert grouped.reason
    x2 = torch.randn(1, 3, 24, 20, generator=gen)
    assert rel_err(new(x2), model(x2)) < 1e-5
    assert {q: type(m) for q, m in model.named_modules()} == types  # the original is untouched
    # the rewritten forward survives copies and pickling, and still runs with the module as `self`
    for clone in (copy.deepcopy(new), _reloaded(new)):
        assert type(clone.encoder) is Encoder
        assert rel_err(clone(x2), model(x2)) < 1e-5


def _reloaded(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        if _untraceable(x):  # the forward holding the functional conv does not trace either
            x = F.conv2d(x, self.w, padding=1)
        return self.conv(x)


def test_functional_conv_in_an_untraceable_forward_is_skipped_with_the_reason(gen):
    model = Untraceable().eval()
    x = torch.randn(1, 3, 10, 10, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    skipped = {L.name: L.reason for L in res.report.layers if L.reason}
    assert "torch.fx cannot trace" in skipped["w"] and "Untraceable" in skipped["w"]
    assert [L.name for L in res.report.rewritten] == ["conv"]
    assert rel_err(res.model(x), model(x)) < 1e-5


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_rewritten_graph_that_fails_its_checks_falls_back_to_module_swap(gen, monkeypatch):
    import dsrewrite.fx_pass as fx_pass

    real = fx_pass.apply_decisions

    def broken(gm, *a, **k):  # the graph breaks after planning (as one with stray tensor constants fails lint)
        real(gm, *a, **k)
        raise RuntimeError("Node _tensor_constant0 target _tensor_constant0 references nonexistent attribute")

    monkeypatch.setattr(fx_pass, "apply_decisions", broken)
    model = Plain().eval()
    x = torch.randn(2, 3, 9, 9, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == SWAP
    assert any(n.startswith("the rewritten graph fails its checks (RuntimeError: Node _tensor_constant0") for n in res.report.notes)
    assert len(res.report.rewritten) == 2
    assert rel_err(res.model(x), model(x)) < 1e-5


class TypeCheckingParent(nn.Module):
    """Code that insists on the conv's class: with the pair in place the model fails, so that layer stays dense."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if not isinstance(self.b, nn.Conv2d):
            raise TypeError(f"expected a Conv2d, got {type(self.b).__name__}")
        if _untraceable(x):
            return self.b(F.relu(self.a(x)))


def test_layer_whose_pair_breaks_the_model_is_left_dense_with_the_reason(gen):
    model = TypeCheckingParent().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    reasons = {L.name: L.reason for L in res.report.layers}
    assert reasons["a"] is None
    assert reasons["b"].startswith("left dense: the model fails with this layer rewritten (TypeError: expected a Conv2d")
    assert isinstance(res.model.a, SeparableConv2d) and type(res.model.b) is nn.Conv2d
    assert rel_err(res.model(x), model(x)) < 1e-5


def _state(model: nn.Module):
    return ({q: (m, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), m.__dict__.get("forward"))
             for q, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("where", ["fx", "swap"])
def test_failed_inplace_rewrite_leaves_the_model_as_it_was(where, gen):
    model = Segmenter() if where == "swap" else Plain()
    model.eval()
    model.head.train() if where == "swap" else model.b.train()  # a mixed training flag must come back too
    model.register_forward_hook(lambda m, a, o: None)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        ref = model(x)
    modules, state = _state(model)
    # calibration data the model cannot run: the rewrite fails after the pairs were installed in place
    with pytest.raises(dsrewrite.DsrewriteError, match="calibration"):
        dsrewrite.rewrite(model, x, rank="full", measure_time=False, inplace=True,
                          calibration=torch.randn(4, 5, 16, 16, generator=gen))
    modules_after, state_after = _state(model)
    assert modules_after.keys() == modules.keys()
    for q, (m, training, hooks, pre, fwd) in modules.items():
        m2, training2, hooks2, pre2, fwd2 = modules_after[q]
        assert m2 is m and training2 == training and hooks2 == hooks and pre2 == pre and fwd2 is fwd, q
    assert state_after.keys() == state.keys() and all(torch.equal(state[k], state_after[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_successful_inplace_swap_rewrite_changes_the_model(gen):
    model = Segmenter().eval()
    x = torch.randn(1, 3, 16, 16, generator=gen)
    ref = model(x)
    params = sum(p.numel() for p in model.parameters())
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False, inplace=True)
    assert res.report.params_before == params  # counted before the model changed
    assert res.report.params_after == sum(p.numel() for p in model.parameters())
    assert res.model is model and isinstance(model.head, SeparableConv2d) and type(model.encoder) is Encoder
    assert rel_err(model(x), ref) < 1e-5


class StaticSamePadConv(nn.Conv2d):
    """efficientnet's Conv2dStaticSamePadding pattern: a conv subclass with its own forward that pads through a
    child module, then calls ``F.conv2d`` on its own weight."""

    def __init__(self, cin, cout, k, stride):
        super().__init__(cin, cout, k, stride=stride, bias=True)
        self.static_padding = nn.ZeroPad2d((k // 2 - 1, k // 2, k // 2 - 1, k // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class WithStaticPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StaticSamePadConv(3, 8, 4, 2)
        self.conv = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        if _untraceable(x):
            return self.conv(F.relu(self.stem(x)))


def test_conv_subclass_with_its_own_forward_is_rewritten_through_its_traced_forward(gen):
    model = WithStaticPad().eval()
    x = torch.randn(2, 3, 20, 20, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert {L.name for L in res.report.rewritten} == {"stem", "conv"}
    assert type(res.model.stem) is StaticSamePadConv and isinstance(res.model.conv, SeparableConv2d)
    assert rel_err(res.model(x), model(x)) < 1e-5


class Reparametrised(nn.Module):
    """SPAN's Conv3XC pattern: in eval, the forward recomputes its conv's weight from other layers at every call."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 1)
        self.eval_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.after = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if self.training:
            return self.after(self.branch(x) + self.skip(x))
        w = self.branch.weight.detach().clone() + F.pad(self.skip.weight.detach(), (1, 1, 1, 1))
        self.eval_conv.weight.data = w
        self.eval_conv.bias.data = self.branch.bias.detach() + self.skip.bias.detach()
        if _untraceable(x):
            return self.after(self.eval_conv(x))


def test_conv_whose_weight_the_forward_assigns_is_left_dense_with_the_reason(gen):
    model = Reparametrised().eval()
    x = torch.randn(1, 4, 9, 9, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert "assigned by the model's forward" in res.report.layer("eval_conv").reason
    assert [L.name for L in res.report.rewritten] == ["after"]
    with torch.no_grad():  # the rewritten model still follows the other layers' weights
        model.branch.weight.mul_(0.5)
        res.model.branch.weight.mul_(0.5)
    assert rel_err(res.model(x), model(x)) < 1e-5


class CachesInForward(nn.Module):
    """HAT's pattern: the forward caches a tensor attribute (``self.mean = self.mean.type_as(x)``) before code fx
    cannot trace. The failed trace must not leave a proxy in the model the module-swap route then runs."""

    def __init__(self):
        super().__init__()
        self.mean = torch.zeros(1, 3, 1, 1)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        self.mean = self.mean.type_as(x)
        x = x - self.mean
        if _untraceable(x):
            return self.conv(x)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_failed_trace_leaves_no_proxy_behind(inplace, gen):
    model = CachesInForward().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    ref = model(x)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False, inplace=inplace)
    assert res.report.route == SWAP and [L.name for L in res.report.rewritten] == ["conv"]
    assert isinstance(res.model.mean, torch.Tensor) and isinstance(model.mean, torch.Tensor)
    assert rel_err(res.model(x), ref) < 1e-5


def test_transposed_conv_rows_count_flops_as_flop_counter_mode_does(route, gen):
    """A transposed conv's row counts its work over its input positions, FlopCounterMode's convention."""
    from torch.utils.flop_counter import FlopCounterMode

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)

        def forward(self, x):
            return self.up(self.conv(x))

    model = Up().eval()
    x = torch.randn(2, 3, 10, 12, generator=gen)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.up(torch.randn(2, 8, 10, 12, generator=gen))
    res = dsrewrite.rewrite(model, x, rank=2, measure_time=False)
    assert res.report.layer("up").flops_before == counter.get_total_flops()
    assert sum(L.flops_before for L in res.report.layers) == res.report.flops_before


class AssignsThenTraces(nn.Module):
    """Traces whole, but its forward assigns a conv's weight, which the traced graph would freeze."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.eval_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        self.eval_conv.weight.data = self.conv.weight.detach() * 1.0
        return self.out(self.eval_conv(x))


def test_a_traced_graph_that_freezes_assigned_weights_is_not_trusted(gen):
    model = AssignsThenTraces().eval()
    x = torch.randn(1, 8, 12, 12, generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == SWAP
    assert any("assigns conv weights (eval_conv)" in n for n in res.report.notes)
    assert [L.name for L in res.report.rewritten] == ["out"]
    assert rel_err(res.model(x), model(x)) < 1e-5


class NoisyButTraceable(nn.Module):
    """A forward that draws random numbers: the fx route's faithfulness check draws the same ones."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x + 0.1 * torch.randn_like(x))


def test_faithfulness_check_draws_the_same_random_numbers(gen):
    res = dsrewrite.rewrite(NoisyButTraceable().eval(), torch.randn(1, 3, 8, 8, generator=gen), rank="full",
                            measure_time=False)
    assert res.report.route == "fx" and len(res.report.rewritten) == 1


def test_traced_graph_that_differs_from_the_model_falls_back(gen, monkeypatch):
    """Whatever a trace misses (simulated here by a graph whose weights differ from the model's), the graph's output
    is compared with the model's before the graph is trusted."""
    model = Plain().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    real = api.trace

    def stale(work, *a, **k):  # a graph of other weights: as if the trace had frozen something the model changes
        gm = real(copy.deepcopy(work), *a, **k)
        with torch.no_grad():
            gm.a.weight.mul_(2.0)
        return gm

    monkeypatch.setattr(api, "trace", stale)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == SWAP
    assert any(n.startswith("the traced graph does not reproduce the model (output 0: relative error") for n in res.report.notes)
    assert rel_err(res.model(x), model(x)) < 1e-5


def test_running_out_of_memory_is_not_a_layer_verdict(gen, monkeypatch):
    """An allocation failure in the self-check is said as one, not a layer left dense as 'failed' (nor a model
    whose inputs do not run)."""
    import dsrewrite.plan.selfcheck as selfcheck

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(selfcheck, "_meta_shape", oom)
    with pytest.raises(dsrewrite.DsrewriteError, match="^ran out of memory while rewriting .*can't allocate memory"):
        dsrewrite.rewrite(Plain().eval(), torch.randn(1, 3, 8, 8, generator=gen), rank="full", measure_time=False)
