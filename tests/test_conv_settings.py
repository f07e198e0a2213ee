"""Property tests over conv settings at full rank: the rewritten layer equals the original (float64)."""
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dsrewrite
from tests.conftest import rel_err

KERNELS_2D = [(3, 3), (5, 5), (1, 7), (7, 1), (2, 2), (3, 1), (1, 3), (4, 3)]


@st.composite
def conv2d_case(draw):
    kh, kw = draw(st.sampled_from(KERNELS_2D))
    stride = draw(st.sampled_from([1, 2, (2, 1)]))
    dilation = draw(st.sampled_from([1, 2, (1, 2)]))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if stride == 1:
        padding = draw(st.sampled_from([0, 1, (1, 2), "same", "valid"]))
    else:
        padding = draw(st.sampled_from([0, 1, (2, 1), "valid"]))
    if padding_mode != "zeros" and padding == "same":
        padding = 1
    cin = draw(st.integers(1, 6))
    cout = draw(st.integers(1, 10))
    bias = draw(st.booleans())
    return dict(in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, padding_mode=padding_mode, bias=bias)


@settings(max_examples=60, deadline=None)
@given(case=conv2d_case(), seed=st.integers(0, 2**31 - 1))
def test_conv2d_full_rank_exact(case, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(**case).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=torch.float64))
    # large enough for the widest dilated kernel (1 + 2*(7-1) = 13 taps) without padding
    x = torch.randn(2, case["in_channels"], 17, 16, generator=g, dtype=torch.float64)
    res = dsrewrite.rewrite(nn.Sequential(conv), x, rank="full", measure_time=False)
    assert res.report.layers[0].rewritten
    assert rel_err(res.model(x), conv(x)) < 1e-10


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 7), stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 2, "valid"]),
       dilation=st.sampled_from([1, 3]), bias=st.booleans(), functional=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_conv1d_full_rank_exact(k, stride, padding, dilation, bias, functional, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv1d(4, 6, k, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))

    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = conv.weight, conv.bias

        def forward(self, x):
            return torch.nn.functional.conv1d(x, self.weight, self.bias, stride, padding, dilation)

    model = Fn() if functional else nn.Sequential(conv)
    x = torch.randn(2, 4, 40, generator=g, dtype=torch.float64)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    assert res.report.layers[0].rewritten and res.report.layers[0].origin == ("function" if functional else "module")
    assert rel_err(res.model(x), model(x)) < 1e-10


def test_dtype_and_device_kept():
    conv = nn.Conv2d(3, 5, 3).to(torch.bfloat16)
    sep = dsrewrite.SeparableConv2d.from_conv(conv, 2)
    assert sep.depthwise.weight.dtype == torch.bfloat16 and sep.pointwise.bias.dtype == torch.bfloat16
    assert sep.depthwise.weight.device == conv.weight.device
