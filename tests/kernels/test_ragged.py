"""Ragged ranks in the Triton kernels: the depthwise channels read their input through ``channel_index``
(fused and split paths), against float64 ``F.conv2d`` on the gathered input; gradients against float64
autograd; the custom op's registration (opcheck); a ragged ``SeparableConv2d`` on the Triton backend.

Tolerances as in test_separable / test_ops: fp32 ``max|y - ref| <= 1e-5 * max|ref|``.
"""
import pytest
import torch

pytest.importorskip("triton")

import dsrewrite.kernels as K  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402
from dsrewrite.plan.factorize import factorize  # noqa: E402
from dsrewrite.modules import SeparableConv2d  # noqa: E402

from tests._kernel_ref import assert_matches, reference  # noqa: E402


def _ragged(gen, c, r, m, n=2, h=7, w=6, k=(3, 3), channels_last=False):
    """Random ragged inputs: ``c*r`` filters spread unevenly, one channel with none."""
    counts = torch.zeros(c, dtype=torch.int64)
    for _ in range(c * r):
        counts[int(torch.randint(1, c, (1,), generator=gen))] += 1  # channel 0 gets no filter
    index = torch.repeat_interleave(torch.arange(c), counts)
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dw = torch.randn(c * r, 1, *k, generator=gen)
    pw = torch.randn(m, c * r, 1, 1, generator=gen) / (c * r) ** 0.5
    b = torch.randn(m, generator=gen)
    return x, dw, pw, b, index


@pytest.mark.parametrize("path,channels_last,stride,act", [
    ("fused", False, (1, 1), None), ("fused", True, (2, 1), "relu"), ("split", False, (1, 2), "silu"),
    ("split", True, (2, 2), None),
])
def test_ragged_forward_matches_gathered_reference(gen, path, channels_last, stride, act):
    x, dw, pw, b, index = _ragged(gen, c=5, r=2, m=7, channels_last=channels_last)
    y = K.separable_conv2d(x, dw, pw, b, stride=stride, padding=1, activation=act, path=path, channel_index=index)
    assert_matches(y, reference(x, dw, pw, b, stride, 1, 1, act, channel_index=index), 1e-5)
    z = K.depthwise_conv2d(x, dw, stride=stride, padding=1, channel_index=index)
    assert_matches(z, reference(x, dw, torch.eye(dw.shape[0])[:, :, None, None], None, stride, 1, 1,
                                channel_index=index), 1e-5)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_ragged_gradients_match_float64_autograd(gen, path):
    x, dw, pw, b, index = _ragged(gen, c=4, r=3, m=6)
    leaves = [t.clone().requires_grad_() for t in (x, dw, pw, b)]
    y = K.separable_conv2d(*leaves, padding=1, activation="silu", path=path, channel_index=index)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, dw, pw, b)]
    reference(*ref_leaves, 1, 1, 1, "silu", channel_index=index).backward(gy.double())
    for name, got, want in zip(("x", "dw", "pw", "bias"), leaves, ref_leaves):
        assert_matches(got.grad, want.grad, 1e-5)
    assert (leaves[0].grad[:, 0] == 0).all()  # channel 0 has no filter: no gradient reaches it


def test_ragged_opcheck_and_bad_index(gen):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    x, dw, pw, b, index = _ragged(gen, c=3, r=2, m=4, n=1, h=5, w=5)
    for t in (x, dw, pw, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.dsrewrite.separable_conv2d.default,
                          (x, dw, pw, b, [1, 1], [1, 1], [1, 1], "none", "auto", "ieee", index))
    with pytest.raises(DsrewriteError, match=r"channel_index values must lie in \[0, 3\)"):
        K.separable_conv2d(x, dw, pw, b, padding=1, channel_index=index + 3)
    with pytest.raises(DsrewriteError, match="channel_index must be an integer tensor of shape"):
        K.separable_conv2d(x, dw, pw, b, padding=1, channel_index=index[:-1])


@pytest.mark.parametrize("path", ["fused", "split"])
def test_bad_index_is_masked_in_the_kernels(gen, path):
    """On CUDA the host checks the index only asynchronously, so the kernels themselves must not read out of
    bounds: called directly (no host check), a filter whose index lies outside [0, C) computes as zero."""
    from dsrewrite.kernels.depthwise import depthwise_conv2d_forward
    from dsrewrite.kernels.pointwise import pointwise_conv2d_forward
    from dsrewrite.kernels.separable_conv2d import separable_conv2d_forward

    c = 3
    x, dw, pw, b, index = _ragged(gen, c=c, r=2, m=4, n=1, h=5, w=5)
    bad = torch.tensor([0, 3, 5])
    index = index.clone()
    index[bad] = torch.tensor([-2, c, c + 1000])
    dw_ref = dw.clone()
    dw_ref[bad] = 0.0
    ref = reference(x, dw_ref, pw, b, 1, 1, 1, channel_index=index.clamp(0, c - 1))
    if path == "fused":
        y = separable_conv2d_forward(x, dw, pw, b, (1, 1), (1, 1), (1, 1), channel_index=index)
    else:
        z = depthwise_conv2d_forward(x, dw, (1, 1), (1, 1), (1, 1), channel_index=index)
        assert (z[:, bad] == 0).all()
        y = pointwise_conv2d_forward(z, pw, b, "none", "ieee")
    assert_matches(y, ref, 1e-5)


def test_index_check_without_a_sync(gen):
    """The check the wrapper runs on CUDA (``sync=False``: ``torch._assert_async``, no device sync) run on a
    CPU tensor, where the assert fires at once; and the CPU check (``sync=True``) with its one-line error."""
    from dsrewrite.kernels.ops import check_index_values

    good, low, high = torch.tensor([0, 2, 1, 2]), torch.tensor([0, -1, 1]), torch.tensor([2, 3])
    for sync in (True, False):
        check_index_values(good, 3, sync=sync)
        check_index_values(torch.empty(0, dtype=torch.int64), 3, sync=sync)
    for t in (low, high):
        with pytest.raises(DsrewriteError, match=r"channel_index values must lie in \[0, 3\)"):
            check_index_values(t, 3, sync=True)
        with pytest.raises(RuntimeError, match=r"channel_index values must lie in \[0, 3\)"):
            check_index_values(t, 3, sync=False)
    check_index_values(high, 4, sync=False)


def test_ragged_module_triton_backend_equals_torch_backend(gen):
    conv = torch.nn.Conv2d(6, 9, 3, padding=1, stride=2)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.01, 2, 6)[None, :, None, None])  # uneven channels: a ragged split
    f = factorize(conv.weight, 2, conv.bias, ragged=True)
    assert f.channel_ranks.max() > 2
    x = torch.randn(2, 6, 9, 9, generator=gen)
    tri = SeparableConv2d.from_conv(conv, 2, factors=f, backend="triton")
    ref = SeparableConv2d.from_conv(conv, 2, factors=f, backend="torch")
    with torch.no_grad():
        assert_matches(tri(x), ref(x).double(), 1e-5)
