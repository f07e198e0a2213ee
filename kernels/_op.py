"""The custom op ``torch.ops.dsrewrite.separable_conv2d``: schema, fake implementation, autograd, FLOP formula.

Registered when ``dsrewrite.kernels`` is imported, so ``torch.ops.dsrewrite.separable_conv2d`` exists (for
``torch.library.opcheck``, ``torch.export``/``torch.load`` of a graph that calls it) before any call. This
module imports none of the kernels and needs no GPU: the real implementation imports them on its first
call (torch's own ``torch.utils.flop_counter``, imported for the FLOP formula, imports Triton if installed).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..cost import separable_pair_flops  # plain integer maths; dsrewrite.cost imports no torch
from ._shapes import out_size, output_memory_format

__all__ = ["separable_conv2d_op", "separable_flops"]


def separable_flops(x_shape, dw_shape, pw_shape, out_shape) -> int:
    """FLOPs (2 per multiply-add) of the op from its shapes (:func:`dsrewrite.cost.separable_pair_flops`);
    bias and activation not counted, as ``FlopCounterMode`` counts ``aten.convolution``."""
    n, m, oh, ow = out_shape
    cr, _, kh, kw = dw_shape
    return sum(separable_pair_flops(cr, m, kh * kw, n * oh * ow))


@torch.library.custom_op("dsrewrite::separable_conv2d", mutates_args=())
def separable_conv2d_op(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                        bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                        dilation: List[int], activation: str, path: str, precision: str,
                        channel_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.dsrewrite.separable_conv2d``; the public entry point is :func:`dsrewrite.kernels.separable_conv2d`."""
    from . import ops  # Triton and the kernels load on the first call, not at registration

    return ops.run_kernels(x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, path, precision,
                           channel_index)


@separable_conv2d_op.register_fake
def _(x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, path, precision, channel_index=None):
    n, _, h, w = x.shape
    _, _, kh, kw = dw_weight.shape
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    return torch.empty((n, pw_weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, _path, _prec, *rest = inputs
    index = rest[0] if rest else None
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.activation = activation
    ctx.has_bias = bias is not None
    y = output if activation in ("relu", "relu6") else None  # their gradient masks read the output
    ctx.save_for_backward(x, dw_weight, pw_weight, bias, y, index)


def _backward(ctx, grad):
    x, dw_weight, pw_weight, bias, y, index = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    need_x, need_dw, need_pw, need_b = ctx.needs_input_grad[:4]
    conv_bw = torch.ops.aten.convolution_backward
    xin = x if index is None else x.index_select(1, index)  # ragged: the depthwise conv reads gathered channels
    groups = xin.shape[1]
    z = F.conv2d(xin, dw_weight, None, stride, padding, dilation, groups)
    if ctx.activation == "relu":
        grad = grad * (y > 0)
    elif ctx.activation == "relu6":
        grad = grad * ((y > 0) & (y < 6))
    elif ctx.activation == "silu":
        u = F.conv2d(z, pw_weight, bias)
        s = torch.sigmoid(u)
        grad = grad * s * (1 + u * (1 - s))
    need_z = need_x or need_dw
    gz, gpw, gb = conv_bw(grad, z, pw_weight, [pw_weight.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0],
                          [1, 1], False, [0, 0], 1, [need_z, need_pw, need_b and ctx.has_bias])
    gx = gdw = None
    if need_z:
        gx, gdw, _ = conv_bw(gz, xin, dw_weight, None, stride, padding, dilation, False, [0, 0], groups,
                             [need_x, need_dw, False])
        if index is not None and gx is not None:
            gx = torch.zeros_like(x).index_add_(1, index, gx)
    return gx, gdw, gpw, gb, None, None, None, None, None, None, None


separable_conv2d_op.register_autograd(_backward, setup_context=_setup_context)

try:  # FlopCounterMode support (the decorator exists in torch >= 2.4; guard older or changed APIs)
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.dsrewrite.separable_conv2d)
    def _separable_conv2d_flop(x_shape, dw_shape, pw_shape, *args, out_shape=None, **kwargs) -> int:
        return separable_flops(x_shape, dw_shape, pw_shape, out_shape)
except (ImportError, AttributeError, ValueError, RuntimeError):  # pragma: no cover - depends on torch
    pass


