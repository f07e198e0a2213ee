"""Float64 reference for the kernel tests: two ``F.conv2d`` calls on upcast inputs (shared by tests/kernels/ and
tests/backends/test_triton.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu}


def reference(x, dw, pw, bias, stride, padding, dilation, activation=None, channel_index=None):
    """act(pointwise(depthwise(x))) in float64; ``padding`` as ints. ``channel_index`` (ragged ranks): the
    depthwise conv runs on the gathered channels ``x[:, channel_index]``, one filter each."""
    x64, dw64, pw64 = x.double(), dw.double(), pw.double()
    if channel_index is not None:
        x64 = x64[:, channel_index]
    b64 = bias.double() if bias is not None else None
    z = F.conv2d(x64, dw64, None, stride, padding, dilation, groups=x64.shape[1])
    return ACTS[activation](F.conv2d(z, pw64, b64))


def assert_matches(y: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Every element finite and ``max|y - ref| <= tol * max|ref|`` (scale-free, so fresh data of any size)."""
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert torch.isfinite(y).all(), "non-finite output"
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"
