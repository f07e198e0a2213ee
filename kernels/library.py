"""The custom op ``torch.ops.dsrewrite.separable_conv2d``: schema, fake implementation, autograd, FLOP formula;
and its backward, ``torch.ops.dsrewrite.separable_conv2d_backward`` (Triton kernels, with a fake implementation).

Registered when ``dsrewrite.kernels`` is imported, so ``torch.ops.dsrewrite.separable_conv2d`` exists (for
``torch.library.opcheck``, ``torch.export``/``torch.load`` of a graph that calls it) before any call. This
module imports none of the kernels and needs no GPU: the real implementation (:func:`.dispatch.run_kernels`)
and the backward kernels are imported on their first call (torch's own ``torch.utils.flop_counter``,
imported for the FLOP formula, imports Triton if installed). The public entry points, which check the
arguments and call these ops, are in :mod:`.ops`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..plan.cost_model import separable_pair_flops  # plain integer maths; dsrewrite.plan.cost_model imports no torch
from .env import interpreting
from .shapes import out_size, output_memory_format

__all__ = ["separable_conv2d_op", "separable_conv2d_backward_op", "separable_flops"]


def separable_flops(x_shape, dw_shape, pw_shape, out_shape) -> int:
    """FLOPs (2 per multiply-add) of the op from its shapes (:func:`dsrewrite.plan.cost_model.separable_pair_flops`);
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
    from . import dispatch  # lazily: Triton and the kernels load on the first call, not at registration

    return dispatch.run_kernels(x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, path,
                                precision, channel_index)


@separable_conv2d_op.register_fake
def _(x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, path, precision, channel_index=None):
    n, _, h, w = x.shape
    _, _, kh, kw = dw_weight.shape
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    return torch.empty((n, pw_weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


@torch.library.custom_op("dsrewrite::separable_conv2d_backward", mutates_args=())
def separable_conv2d_backward_op(grad: torch.Tensor, x: torch.Tensor, dw_weight: torch.Tensor,
                                 pw_weight: torch.Tensor, bias: Optional[torch.Tensor], y: Optional[torch.Tensor],
                                 stride: List[int], padding: List[int], dilation: List[int], activation: str,
                                 precision: str, channel_index: Optional[torch.Tensor], needs: List[bool]
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward with the Triton kernels: ``(gx, gdw, gpw, gb)``, an empty tensor for each one ``needs``
    does not ask for. An op of its own so ``torch.compile`` traces the backward through its fake implementation."""
    from .separable_backward import separable_conv2d_backward  # lazily: Triton loads on the first backward

    outs = separable_conv2d_backward(grad, x, dw_weight, pw_weight, bias, y, stride, padding, dilation, activation,
                                     channel_index, needs, precision=precision)
    return tuple(o if o is not None else x.new_empty(0) for o in outs)


@separable_conv2d_backward_op.register_fake
def _(grad, x, dw_weight, pw_weight, bias, y, stride, padding, dilation, activation, precision, channel_index, needs):
    shapes = (None, dw_weight.shape, pw_weight.shape, (pw_weight.shape[0],) if bias is not None else (0,))
    outs = []
    for i, (need, shape) in enumerate(zip(needs, shapes)):
        if not need or (i == 3 and bias is None):
            outs.append(x.new_empty(0))
        elif i == 0:
            outs.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x)))
        else:  # the real backward gives each weight gradient its weight's dtype
            outs.append((dw_weight, pw_weight, bias)[i - 1].new_empty(shape))
    return tuple(outs)


def _setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, _path, precision, *rest = inputs
    index = rest[0] if rest else None
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.activation = activation
    ctx.precision = precision
    ctx.has_bias = bias is not None
    y = output if activation in ("relu", "relu6") else None  # their gradient masks read the output
    ctx.save_for_backward(x, dw_weight, pw_weight, bias, y, index)


def _triton_backward(x: torch.Tensor) -> bool:
    """Whether the backward runs the Triton kernels: on CUDA, or on the CPU under the interpreter. Not while
    building a graph of the backward itself (``create_graph=True``, double backward): the torch-ops formula
    below is differentiable, the kernels are not."""
    if torch.is_grad_enabled():
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


def _backward(ctx, grad):
    x, dw_weight, pw_weight, bias, y, index = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    need_x, need_dw, need_pw, need_b = ctx.needs_input_grad[:4]
    if _triton_backward(x):
        needs = [need_x, need_dw, need_pw, need_b and ctx.has_bias]
        outs = separable_conv2d_backward_op(grad, x, dw_weight, pw_weight, bias, y, stride, padding, dilation,
                                            ctx.activation, ctx.precision, index, needs)
        gx, gdw, gpw, gb = (o if need else None for o, need in zip(outs, needs))
        return gx, gdw, gpw, gb, None, None, None, None, None, None, None
    # fallback (a device Triton cannot run on, or double backward): torch ops, z recomputed with F.conv2d
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


