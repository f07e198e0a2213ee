"""The ``torch.ops.dsrewrite.separable_conv2d`` custom op: gradients, fake tensors / torch.compile,
FlopCounterMode, the fused-vs-split dispatcher and bad input.

Gradient tolerance: fp32 Triton forward + torch-op backward vs float64 autograd of the reference,
``max|g - g_ref| <= 1e-5 * max|g_ref|`` (the backward is fp32 torch convs on CPU).
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import dsrewrite.kernels as K  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402

from tests._kernel_ref import assert_matches, reference  # noqa: E402


def _inputs(gen, n=2, c=6, r=2, m=10, h=7, w=6, k=(3, 3), channels_last=False, bias=True):
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dw = torch.randn(c * r, 1, *k, generator=gen)
    pw = torch.randn(m, c * r, 1, 1, generator=gen) / (c * r) ** 0.5
    b = torch.randn(m, generator=gen) if bias else None
    return x, dw, pw, b


@pytest.mark.parametrize("activation,path,channels_last", [
    (None, "fused", False), ("relu", "split", True), ("relu6", "fused", True), ("silu", "fused", False),
])
def test_gradients_match_float64_autograd(activation, path, channels_last, gen):
    x, dw, pw, b = _inputs(gen, channels_last=channels_last)
    if activation == "relu6":  # spread pre-activations over both kinks (0 and 6)
        pw = pw * 4
    stride, pad, dil = (2, 1), (1, 2), (1, 2)
    leaves = [t.clone().requires_grad_() for t in (x, dw, pw, b)]
    y = K.separable_conv2d(*leaves, stride=stride, padding=pad, dilation=dil, activation=activation, path=path)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, dw, pw, b)]
    ref = reference(*ref_leaves, stride, pad, dil, activation)
    ref.backward(gy.double())
    assert_matches(y.detach(), ref.detach(), 1e-5)
    if activation == "relu6":
        assert (ref == 6).any() and ((ref > 0) & (ref < 6)).any() and (ref == 0).any()
    for name, got, want in zip(("x", "dw", "pw", "bias"), leaves, ref_leaves):
        assert got.grad is not None, name
        assert_matches(got.grad, want.grad, 1e-5)


def test_only_some_inputs_need_grad(gen):
    x, dw, pw, _ = _inputs(gen, bias=False)
    pw = pw.requires_grad_()
    y = K.separable_conv2d(x, dw, pw, None, padding=1, activation="silu")
    (g,) = torch.autograd.grad(y.sum(), pw)
    pw64 = pw.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(reference(x, dw, pw64, None, 1, 1, 1, "silu").sum(), pw64)
    assert_matches(g, g_ref, 1e-5)


def test_opcheck_schema_fake_and_autograd_registration(gen):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, aot dispatch."""
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    x, dw, pw, b = _inputs(gen, n=1, c=3, r=2, m=5, h=5, w=5, channels_last=True)
    for t in (x, dw, pw, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.dsrewrite.separable_conv2d.default,
                          (x, dw, pw, b, [1, 1], [1, 1], [1, 1], "relu6", "auto", "ieee"))


def test_torch_compile_fullgraph_forward_and_backward(gen):
    x, dw, pw, b = _inputs(gen, n=1, c=4, r=1, m=5, h=6, w=6)
    leaves = [t.clone().requires_grad_() for t in (x, dw, pw, b)]

    def f(x, dw, pw, b):
        return K.separable_conv2d(x, dw, pw, b, padding="same", activation="silu")

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    y.sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, dw, pw, b)]
    ref = reference(*ref_leaves, 1, 1, 1, "silu")
    ref.sum().backward()
    assert_matches(y.detach(), ref.detach(), 1e-5)
    for got, want in zip(leaves, ref_leaves):
        assert_matches(got.grad, want.grad, 1e-5)


def test_flop_counter_counts_depthwise_plus_pointwise(gen):
    """FlopCounterMode counts the op as the two convs it replaces (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, dw, pw, b = _inputs(gen, c=5, r=3, m=7, k=(3, 1))
    with FlopCounterMode(display=False) as ours:
        K.separable_conv2d(x, dw, pw, b, stride=2, padding=(1, 0))
    with FlopCounterMode(display=False) as torch_pair:
        F.conv2d(F.conv2d(x, dw, None, 2, (1, 0), 1, 5), pw, b)
    assert ours.get_total_flops() == torch_pair.get_total_flops() > 0


def test_dispatcher_picks_each_path(gen, monkeypatch):
    """Small M fuses; a 7x7 kernel with M = 600 (3 blocks of 256: 2 depthwise recomputes) splits, one with
    M = 300 (one recompute) still fuses, and the op really runs the kernels the dispatcher names."""
    import dsrewrite.kernels.dispatch as dispatch

    assert K.choose_path(48, 24, 3, 3, 2) == "fused"
    assert K.choose_path(48, 300, 7, 7, 4) == "fused"
    assert K.choose_path(48, 600, 7, 7, 4) == "split"
    assert K.choose_path(48, 600, 7, 7, 4) == dispatch.choose_path(48, 600, 7, 7, 4)
    assert K.choose_path(48, 2048, 3, 3, 2) == "split"
    calls = []
    for name in ("separable_conv2d_forward", "depthwise_conv2d_forward", "pointwise_conv2d_forward"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for m, k, want in ((24, (3, 3), ["separable_conv2d_forward"]),
                       (600, (7, 7), ["depthwise_conv2d_forward", "pointwise_conv2d_forward"])):
        calls.clear()
        x, dw, pw, b = _inputs(gen, n=1, c=8, r=2, m=m, h=5, w=5, k=k)
        y = K.separable_conv2d(x, dw, pw, b, padding="same")
        assert calls == want
        assert_matches(y, reference(x, dw, pw, b, 1, (k[0] // 2, k[1] // 2), 1), 1e-5)


def test_standalone_depthwise_and_pointwise(gen):
    x, dw, pw, b = _inputs(gen, channels_last=True)
    z = K.depthwise_conv2d(x, dw, stride=2, padding=1, dilation=(2, 1))
    z_ref = F.conv2d(x.double(), dw.double(), None, 2, 1, (2, 1), groups=x.shape[1])
    assert_matches(z, z_ref, 1e-6)
    assert z.is_contiguous(memory_format=torch.channels_last)
    y = K.pointwise_conv2d(z, pw, b, activation="relu")
    assert_matches(y, F.relu(F.conv2d(z.double(), pw.double(), b.double())), 1e-5)


@pytest.mark.parametrize("bad", [
    dict(padding="same", k=(2, 2)),  # asymmetric 'same'
    dict(activation="gelu"),
    dict(path="fastest"),
    dict(pw_shape=(10, 5, 1, 1)),  # pointwise K does not match C*r
    dict(dw_shape=(7, 1, 3, 3)),  # C*r not a multiple of C
    dict(dtype=torch.float64),
    dict(h=2, w=2),  # input smaller than the kernel
])
def test_bad_input_raises_one_line_error(bad, gen):
    x, dw, pw, b = _inputs(gen, c=6, r=2, m=10, h=bad.get("h", 7), w=bad.get("w", 6), k=bad.get("k", (3, 3)))
    if "pw_shape" in bad:
        pw = torch.randn(bad["pw_shape"], generator=gen)
    if "dw_shape" in bad:
        dw = torch.randn(bad["dw_shape"], generator=gen)
    if "dtype" in bad:
        x, dw, pw, b = (t.to(bad["dtype"]) for t in (x, dw, pw, b))
    with pytest.raises(DsrewriteError) as e:
        K.separable_conv2d(x, dw, pw, b, padding=bad.get("padding", 0), activation=bad.get("activation"),
                           path=bad.get("path", "auto"))
    assert "\n" not in str(e.value)
