"""Bounded self-check probes (``frontends.fx.bounded_probe``): each window is exactly what the conv computes on the
whole input at those positions, and the self-check on the windows reaches the same verdict as on the whole item,
for right and misread layers alike (padding, stride, dilation, padding mode, dynamic 'same' padding, weight)."""
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import dsrewrite
from dsrewrite.plan.factorize import exact_factors
from dsrewrite.frontends import fx as fx_frontend
from dsrewrite.frontends.fx import PROBE_WINDOW, Probe, bounded_probe
from dsrewrite.modules import SeparableConv1d, SeparableConv2d
from dsrewrite.plan.selfcheck import _compare, tolerance

MODES = ["zeros", "reflect", "replicate", "circular"]
EXACT = 1e-10  # float64 on both sides: only summation order differs


def tf_same(x: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """TensorFlow 'SAME' padding written out here (the reference for dynamic 'same' convs): output
    ceil(n / s) per dim, the odd pixel on the bottom/right."""
    pads = []
    for n, k, s, d in zip(x.shape[2:], kernel, stride, dilation):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, [p for pair in reversed(pads) for p in pair])


class Conv:
    """One conv's settings and the independent reference for them: ``nn.Conv*d`` (or TF padding then
    ``F.conv*d`` for dynamic 'same'), weights drawn from ``gen``."""

    def __init__(self, dims, cin, cout, kernel, stride, padding, dilation, mode, dynamic, gen):
        self.dims, self.kernel, self.stride, self.dilation = dims, kernel, stride, dilation
        self.padding, self.mode, self.dynamic = padding, mode, dynamic
        self.weight = torch.randn(cout, cin, *kernel, generator=gen, dtype=torch.float64)
        self.bias = torch.randn(cout, generator=gen, dtype=torch.float64)

    @property
    def args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, padding_mode=self.mode,
                    dynamic_same=self.dynamic)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        if self.dynamic:
            return conv(tf_same(x, self.kernel, self.stride, self.dilation), self.weight, self.bias, self.stride, 0,
                        self.dilation)
        cls = nn.Conv1d if self.dims == 1 else nn.Conv2d
        m = cls(self.weight.shape[1], self.weight.shape[0], self.kernel, stride=self.stride, padding=self.padding,
                dilation=self.dilation, padding_mode=self.mode, dtype=torch.float64)
        with torch.no_grad():
            m.weight.copy_(self.weight)
            m.bias.copy_(self.bias)
            return m(x)

    def pair(self, weight=None, **change) -> nn.Module:
        """The exact separable pair with these settings (or the changed ones), as the self-check builds it."""
        a = dict(self.args, **change)
        cls = SeparableConv1d if self.dims == 1 else SeparableConv2d
        f = exact_factors(self.weight if weight is None else weight, self.bias)
        return cls.from_factors(f, stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                                padding_mode=a["padding_mode"], dynamic_same=a["dynamic_same"], backend="torch")


def fits(dims, size, kernel, stride, padding, dilation, mode, dynamic) -> bool:
    """Settings torch accepts on an input of ``size`` (one value per dim)."""
    if dynamic:
        return True
    pads = ([0] * dims if padding == "valid" else None if padding == "same"
            else [padding] * dims if isinstance(padding, int) else list(padding))
    for i, (n, k, d) in enumerate(zip(size, kernel, dilation)):
        total = d * (k - 1) if pads is None else 2 * pads[i]
        if n + total < d * (k - 1) + 1 or (mode == "reflect" and total and total - total // 2 >= n):
            return False
        if mode == "circular" and total - total // 2 > n:
            return False
    return True


@st.composite
def conv_case(draw, *, big=False):
    """Random conv settings and input size (smaller and larger than the window)."""
    dims = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 7)) for _ in range(dims))
    if kernel == (1,) * dims:
        kernel = (2,) + kernel[1:]
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dynamic = dims == 2 and draw(st.integers(0, 5)) == 0
    mode = "zeros" if dynamic else draw(st.sampled_from(MODES))
    if dynamic:
        padding = 0
    else:
        options = [st.integers(0, 3), st.tuples(*[st.integers(0, 3)] * dims), st.just("valid")]
        if stride == (1,) * dims:
            options.append(st.just("same"))
        padding = draw(st.one_of(options))
    top = 170 if dims == 2 else 600
    size = tuple(draw(st.integers(1, top if big else 40)) for _ in range(dims))
    return dims, kernel, stride, padding, dilation, mode, dynamic, size


def make(case, gen, batch=2, cin=2, cout=3):
    dims, kernel, stride, padding, dilation, mode, dynamic, size = case
    conv = Conv(dims, cin, cout, kernel, stride, padding, dilation, mode, dynamic, gen)
    x = torch.randn(batch, cin, *size, generator=gen, dtype=torch.float64)
    return conv, x


def compared(module: nn.Module, window) -> torch.Tensor:
    out = module(window.x)
    return out[(..., *(slice(s, s + n) for s, n in zip(window.start, window.y.shape[2:])))]


def valid(case) -> bool:
    return fits(case[0], case[7], case[1], case[2], case[3], case[4], case[5], case[6])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=conv_case(big=True).filter(valid), seed=st.integers(0, 2**31 - 1), window=st.sampled_from([1, 2, 16]))
def test_windows_are_the_full_conv_at_their_positions(case, seed, window):
    """The conv on each input crop gives, at the window's positions, the whole input's output there (checked
    against slices of the reference's output, not the probe's own copy); the first window is the top-left
    corner, another the bottom-right end, and the crops stay bounded whatever the input size."""
    conv, x = make(case, torch.Generator().manual_seed(seed))
    y = conv(x)
    probe = bounded_probe(x, y, conv.kernel, conv.args, window=window)
    assert probe.in_shape == (1,) + tuple(x.shape[1:]) and probe.out_shape == (1,) + tuple(y.shape[1:])
    full = y[:1]
    out_size = full.shape[2:]
    if len(probe.windows) == 1 and probe.windows[0].start == ():  # the whole item: smaller than the windows
        (w,) = probe.windows
        assert torch.equal(w.x, x[:1]) and torch.equal(w.y, full)
        span = [d * (k - 1) + 1 for k, d in zip(conv.kernel, conv.dilation)]
        bound = [(min(L, window) + 2) * s + sp + 12 for L, s, sp in zip(out_size, conv.stride, span)]
        windows = 3 * (x.shape[1] * math.prod(bound) + y.shape[1] * math.prod(min(L, window) for L in out_size))
        assert x[:1].numel() + full.numel() <= windows  # and it was no bigger than the windows
        return
    corner = probe.windows[0]
    assert corner.start == corner.at == (0,) * conv.dims
    # the top-left and the bottom-right output positions are compared
    assert any(all(a + n == L for a, n, L in zip(w.at, w.y.shape[2:], out_size)) for w in probe.windows)
    span = [d * (k - 1) + 1 for k, d in zip(conv.kernel, conv.dilation)]
    for w in probe.windows:
        # the values are the reference's at the positions the window claims, and the conv on the crop gives them
        assert torch.equal(w.y, full[(..., *(slice(a, a + n) for a, n in zip(w.at, w.y.shape[2:])))])
        assert (compared(conv, w) - w.y).abs().max() <= EXACT * max(1.0, w.y.abs().max().item())
        assert w.x.untyped_storage().nbytes() == w.x.numel() * w.x.element_size()  # copies, not views
        for n, c, k, L, s, sp in zip(x.shape[2:], w.x.shape[2:], w.y.shape[2:], out_size, conv.stride, span):
            assert k == min(L, window) or c == n  # all positions are compared only where the whole input is kept
            assert c <= (min(L, window) + 2) * s + sp + 12  # a window's worth of input, its padding, stride steps


@st.composite
def misread(draw):
    """A conv and a way the frontend may misread it (or not: ``None``)."""
    case = draw(conv_case().filter(valid))
    dims, kernel, stride, padding, dilation, mode, dynamic, size = case
    what = draw(st.sampled_from([None, "padding", "stride", "dilation", "padding_mode", "dynamic_same", "weight"]))
    change = {}
    if what == "padding":
        change["padding"] = draw(st.sampled_from([0, 1, 2, "same", "valid", (1, 2)[:dims], (2, 1)[:dims]]))
    elif what == "stride":
        change["stride"] = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    elif what == "dilation":
        change["dilation"] = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    elif what == "padding_mode":
        change["padding_mode"] = draw(st.sampled_from(MODES))
    elif what == "dynamic_same" and dims == 2:
        change.update(dynamic_same=not dynamic, padding=0, padding_mode="zeros")
    wrong = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=mode, dynamic_same=dynamic)
    wrong.update(change)
    if wrong["padding"] == "same" and wrong["stride"] != (1,) * dims:
        wrong["padding"] = 0
    if wrong["dynamic_same"]:
        wrong.update(padding=0, padding_mode="zeros")
    return case, wrong, what == "weight"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(m=misread(), seed=st.integers(0, 2**31 - 1), big=st.booleans(), window=st.sampled_from([1, 2, 16]))
def test_self_check_on_windows_agrees_with_the_whole_item(m, seed, big, window):
    """The frontend reads a layer as ``wrong`` (maybe right): the probe is cut with those settings, the pair built
    with them, the truth is the real layer. The verdict on the bounded probe is the verdict on the whole item:
    a right pair passes, and every misread that changes any output (value or shape, border or interior, even
    only on the bottom/right border) fails."""
    case, wrong, bad_weight = m
    gen = torch.Generator().manual_seed(seed)
    if big:  # inputs larger than the window, so the crops really crop
        case = case[:7] + (tuple(n + 3 * window * s for n, s in zip(case[7], case[2])),)
    conv, x = make(case, gen, batch=1)
    y = conv(x)
    dims = case[0]
    if not fits(dims, case[7], conv.kernel, wrong["stride"], wrong["padding"], wrong["dilation"],
                wrong["padding_mode"], wrong["dynamic_same"]):
        wrong = conv.args
    weight = conv.weight + 1e-3 * torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) \
        if bad_weight else None
    pair = conv.pair(weight, **wrong)
    probe = bounded_probe(x, y, conv.kernel, wrong, window=window)
    err_crop, why_crop = _compare(pair, probe)
    err_whole, why_whole = _compare(pair, (x, y))
    right_whole = err_whole is not None and err_whole <= 1e-9
    right_crop = err_crop is not None and err_crop <= 1e-9
    assert right_crop == right_whole, (wrong, err_crop, why_crop, err_whole, why_whole)
    if wrong == conv.args and not bad_weight:
        assert right_crop
    if bad_weight:
        assert not right_crop
    assert probe.nbytes <= (x.numel() + y.numel()) * 8  # never more than the whole item


@pytest.mark.parametrize("truth, wrong, shape_only", [
    (dict(padding=1), dict(padding=(1, 2)), False),                    # asymmetric in one dim
    (dict(kernel=(4, 4), padding="same"), dict(padding=1), True),       # 'same' pads 1 left, 2 right: 1 loses a row
    (dict(kernel=(4, 4), padding="same"), dict(padding=2), True),       # 2 left would show; here only the shape
    (dict(kernel=(3, 3), stride=2, dynamic=True), dict(dynamic_same=False, padding=0), True),  # TF pads bottom only
    (dict(kernel=(2, 2), padding="same", mode="reflect"), dict(padding_mode="zeros"), False),  # right border only
    (dict(kernel=(3, 3), padding=1), dict(padding=1, stride=(1, 2)), True),
])
def test_border_and_shape_misreads_are_caught(gen, truth, wrong, shape_only):
    """Misreads the top-left corner cannot see: the shape check on the whole input (meta device) or the
    bottom/right window catches them."""
    kernel = truth.get("kernel", (3, 3))
    stride = (truth.get("stride", 1),) * 2
    conv = Conv(2, 3, 4, kernel, stride, truth.get("padding", 0), (1, 1), truth.get("mode", "zeros"),
                truth.get("dynamic", False), gen)
    x = torch.randn(2, 3, 64, 80, generator=gen, dtype=torch.float64)
    y = conv(x)
    args = dict(conv.args, **wrong)
    probe = bounded_probe(x, y, kernel, args)
    assert probe.nbytes < (x[:1].numel() + y[:1].numel()) * 8 / 4
    err, why = _compare(conv.pair(**wrong), probe)
    assert err is None or err > 1e-3, (err, why)
    if shape_only:
        assert why.startswith("output shape"), why
    err, why = _compare(conv.pair(), bounded_probe(x, y, kernel, conv.args))
    assert err is not None and err < EXACT, why


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [1, 2, PROBE_WINDOW])
def test_padding_wider_than_the_receptive_field(gen, mode, window):
    """A 1-tap dim padded by 3: the crops stay longer than the padding (reflect and circular need it) and
    still give the whole conv's values."""
    conv = Conv(2, 2, 3, (1, 3), (1, 2), 3, (1, 1), mode, False, gen)
    x = torch.randn(1, 2, 40, 50, generator=gen, dtype=torch.float64)
    y = conv(x)
    probe = bounded_probe(x, y, conv.kernel, conv.args, window=window)
    assert len(probe.windows) == 3
    for w in probe.windows:
        assert (compared(conv, w) - w.y).abs().max() <= EXACT
    err, why = _compare(conv.pair(), probe)
    assert err is not None and err < EXACT, why


def test_a_window_reads_the_data_when_the_padding_is_wider_than_the_windows(gen):
    """Rows: 1 tap, stride 3, padding 4, 3 input rows: only output row 2 of 4 reads any input, and neither the
    corner, the end nor the row in the middle does; the probe still compares it, so a wrong weight is caught."""
    conv = Conv(2, 2, 3, (1, 3), (3, 1), 4, (1, 1), "zeros", False, gen)
    x = torch.randn(1, 2, 3, 60, generator=gen, dtype=torch.float64)
    y = conv(x)
    probe = bounded_probe(x, y, conv.kernel, conv.args, window=1)
    assert 2 in {w.at[0] for w in probe.windows}
    err, why = _compare(conv.pair(), probe)
    assert err is not None and err < EXACT, why
    # a wrong weight (here negated: most compared positions read only padding, so their bias dominates the norm
    # and a small change would hide under it) fails the self-check's own tolerance
    err, why = _compare(conv.pair(-conv.weight), probe)
    assert err is not None and err > tolerance(y), why


def test_unbatched_and_functional_settings(gen):
    """Unbatched inputs keep no batch dim; a functional conv's settings (no padding_mode key, list stride,
    'same' string) read with nn.Conv's defaults."""
    w = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 300, generator=gen, dtype=torch.float64)
    y = F.conv1d(x, w, None, [1], "same", [2])
    probe = bounded_probe(x, y, (5,), {"stride": [1], "padding": "same", "dilation": [2], "groups": 1})
    assert probe.in_shape == (3, 300) and len(probe.windows) == 3
    for win in probe.windows:
        assert win.x.dim() == 2 and win.x.shape[-1] < 60
        out = F.conv1d(win.x, w, None, 1, "same", 2)
        assert torch.allclose(out[..., win.start[0]:win.start[0] + win.y.shape[-1]], win.y, atol=1e-12)


def test_unreadable_settings_keep_the_whole_item(gen):
    x, y = torch.randn(2, 3, 40, 40, generator=gen), torch.randn(2, 4, 38, 38, generator=gen)
    probe = bounded_probe(x, y, (3, 3), {"padding": "odd"})
    (w,) = probe.windows
    assert torch.equal(w.x, x[:1]) and torch.equal(w.y, y[:1]) and w.start == ()


def test_tuple_probes_still_compare(gen):
    """Routes that keep a plain (input, output) tuple: compared whole, a wrong shape still refused."""
    conv = Conv(2, 2, 3, (3, 3), (1, 1), 1, (1, 1), "zeros", False, gen)
    x = torch.randn(1, 2, 20, 20, generator=gen, dtype=torch.float64)
    err, why = _compare(conv.pair(), (x, conv(x)))
    assert err is not None and err < EXACT, why
    err, why = _compare(conv.pair(padding=0), (x, conv(x)))
    assert err is None and why.startswith("output shape")
    assert isinstance(Probe.whole(x, conv(x)), Probe)


class Tall(nn.Module):
    """Convs at a resolution far above the window, a functional conv among them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.w = nn.Parameter(torch.randn(8, 8, 5, 5) * 0.1)
        self.c = nn.Conv1d(8, 4, 4, padding="same")

    def forward(self, x):
        h = F.conv2d(self.b(torch.relu(self.a(x))), self.w, None, 2, 2)
        return self.c(h.flatten(2))


def test_rewrite_checks_every_layer_on_bounded_probes_and_frees_them(monkeypatch):
    """The fx route: every conv's probe is bounded (not the activation), each layer is checked, and no probe
    survives the pass."""
    kept = []
    real = fx_frontend.bounded_probe

    def spy(x, y, kernel, conv_args):
        probe = real(x, y, kernel, conv_args)
        kept.append((probe.nbytes, x[:1].numel() * x.element_size(), [weakref.ref(w.x) for w in probe.windows]))
        return probe

    monkeypatch.setattr(fx_frontend, "bounded_probe", spy)
    model = Tall().eval()
    x = torch.randn(2, 3, 224, 224)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.route == "fx"
    assert len(res.report.rewritten) == 4
    assert any("self-check: 4 rewritten layer(s) reproduce" in n for n in res.report.notes), res.report.notes
    assert len(kept) == 4
    assert all(nbytes < item / 10 for nbytes, item, _ in kept), kept
    gc.collect()
    assert all(ref() is None for _, _, refs in kept for ref in refs)
    with torch.no_grad():
        assert torch.allclose(res.model(x), model(x), atol=1e-4, rtol=1e-4)


def test_misread_layer_fails_on_a_bounded_probe(monkeypatch):
    """A layer read with the wrong padding (as a buggy frontend would) fails the self-check on the fx route."""
    from dsrewrite.frontends import conv_modules

    real = conv_modules.describe

    def misread(mod):
        info = real(mod)
        if tuple(mod.kernel_size) == (3, 3) and mod.padding_mode == "reflect":
            info.conv_args["padding_mode"] = "replicate"
        return info

    monkeypatch.setattr(fx_frontend, "describe", misread)
    model = Tall().eval()
    res = dsrewrite.rewrite(model, torch.randn(1, 3, 80, 80), rank="full", measure_time=False)
    assert res.report.layer("b").reason.startswith("self-check failed (rel. error"), res.report.layer("b").reason
    assert res.report.layer("a").rewritten
