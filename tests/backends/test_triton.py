"""``SeparableConv2d(backend=...)`` and ``dsrewrite.rewrite(..., backend=...)`` on the Triton kernels.

``backend="triton"`` runs the kernels on CPU here through the Triton interpreter; ``"auto"`` must keep CPU
tensors on torch ops. Tolerance vs float64 torch ops: ``max|y - ref| <= 1e-5 * max|ref|`` (fp32).
"""
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import dsrewrite  # noqa: E402
import dsrewrite.backends as backends  # noqa: E402
from dsrewrite import SeparableConv2d  # noqa: E402
from dsrewrite.backends import triton_supports  # noqa: E402

from tests._kernel_ref import assert_matches  # noqa: E402


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the modules run through ``triton_forward`` (the Triton path of ``SeparableConv2d``)."""
    calls = []
    real = backends.triton_forward

    def counting(module, x):
        calls.append(module)
        return real(module, x)

    monkeypatch.setattr(backends, "triton_forward", counting)
    return calls


def _module(gen, backend, cin=5, cout=7, k=(3, 3), rank=2, **conv):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return SeparableConv2d(cin, cout, k, rank, backend=backend, **conv).eval()


def _reference(mod, x):
    ref = _module_copy(mod, "torch").double()
    return ref(x.double())


def _module_copy(mod, backend):
    import copy

    m = copy.deepcopy(mod)
    m.backend = backend
    return m


@pytest.mark.parametrize("conv,channels_last", [
    (dict(padding=1), False),
    (dict(padding="same", dilation=2), True),
    (dict(padding="valid", stride=2), True),
    (dict(padding=(2, 0), stride=(1, 2), bias=False), False),
])
def test_triton_backend_matches_torch_ops(conv, channels_last, gen, triton_calls):
    mod = _module(gen, "triton", k=(5, 1) if conv.get("padding") == (2, 0) else (3, 3), **conv)
    x = torch.randn(2, 5, 8, 7, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = mod(x)
    assert triton_calls == [mod]
    assert_matches(y, _reference(mod, x), 1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


def test_triton_backend_trains(gen, triton_calls):
    mod = _module(gen, "triton").train()
    x = torch.randn(2, 5, 6, 6, generator=gen)
    mod(x).square().mean().backward()
    ref = _module_copy(mod, "torch").double()
    ref(x.double()).square().mean().backward()
    assert triton_calls
    for (name, p), p_ref in zip(mod.named_parameters(), ref.parameters()):
        assert_matches(p.grad, p_ref.grad, 1e-5)


def test_supports_gives_reasons(gen):
    x = torch.randn(1, 5, 8, 8, generator=gen)
    assert triton_supports(_module(gen, "triton", padding=1), x) == (True, "ok")
    ok, why = triton_supports(_module(gen, "auto", padding=1), x)
    assert not ok and "cpu" in why  # auto: Triton only on CUDA tensors
    ok, why = triton_supports(_module(gen, "triton", padding=1, padding_mode="reflect"), x)
    assert not ok and "padding_mode" in why
    ok, why = triton_supports(_module(gen, "triton", k=(2, 2), padding="same"), x)
    assert not ok and "asymmetric" in why
    ok, why = triton_supports(_module(gen, "triton", padding=1), x.double())
    assert not ok and "float64" in why
    ok, why = triton_supports(_module(gen, "triton", padding=1), x[:, :4])
    assert not ok and "channels" in why


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unsupported_case_with_backend_triton_raises_and_auto_falls_back(gen, triton_calls):
    x = torch.randn(1, 5, 8, 8, generator=gen)
    with pytest.raises(RuntimeError, match="padding_mode"):
        _module(gen, "triton", padding=1, padding_mode="reflect")(x)
    auto = _module(gen, "auto", k=(2, 2), padding="same")
    with torch.no_grad():
        assert_matches(auto(x), _reference(auto, x), 1e-6)
    assert triton_calls == []


def test_module_compiles_fullgraph(gen, triton_calls):
    """The backend checks and the custom op trace without graph breaks (Dynamo + AOT autograd)."""
    mod = _module(gen, "triton", padding=1).train()
    x = torch.randn(1, 5, 6, 6, generator=gen)
    y = torch.compile(mod, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    assert triton_calls  # traced through triton_forward
    ref = _module_copy(mod, "torch").double()
    ref(x.double()).sum().backward()
    assert_matches(y.detach(), ref(x.double()).detach(), 1e-5)
    for p, p_ref in zip(mod.parameters(), ref.parameters()):
        assert_matches(p.grad, p_ref.grad, 1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 10, (3, 1), stride=2, padding=(1, 0))

    def forward(self, x):
        return self.b(self.a(x).relu())


class _Untraceable(_Net):
    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: symbolic_trace fails
            x = self.a(x).relu()
        return self.b(x)


@pytest.mark.parametrize("net_cls,route", [(_Net, "fx"), (_Untraceable, "fx-submodules+module-swap")])
def test_rewrite_passes_backend_through(net_cls, route, gen, triton_calls):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = net_cls().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    res = dsrewrite.rewrite(net, x, rank=2, backend="triton", measure_time=False)
    assert res.report.route == route
    pairs = [m for m in res.model.modules() if isinstance(m, SeparableConv2d)]
    assert len(pairs) == 2 and all(m.backend == "triton" for m in pairs)
    triton_calls.clear()
    with torch.no_grad():
        y = res.model(x)
    assert sorted(map(id, triton_calls)) == sorted(map(id, pairs))
    torch_model = res.model
    for m in pairs:
        m.backend = "torch"
    with torch.no_grad():
        ref = torch_model.double()(x.double())
    assert_matches(y, ref, 1e-5)
