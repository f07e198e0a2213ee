"""The public entry points: argument checks, then the custom op (or, for the two halves alone, one kernel).

:func:`separable_conv2d` checks and normalises its arguments, then calls ``torch.ops.dsrewrite.separable_conv2d``
(:mod:`.library`: a ``torch.library`` custom op with a fake implementation for ``torch.compile``, an autograd
formula and a FLOP formula), whose implementation is :func:`.dispatch.run_kernels`. :func:`depthwise_conv2d` and
:func:`pointwise_conv2d` run one kernel each (forward only). Importing this module imports Triton, so
``dsrewrite.kernels`` imports it only on the first call of one of these functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import DsrewriteError
from .common import ACTIVATIONS
from .depthwise import depthwise_conv2d_forward
from .env import interpreting
from .dispatch import PATHS
from .library import separable_conv2d_op
from .pointwise import pointwise_conv2d_forward
from .shapes import out_size, resolve_padding

__all__ = ["separable_conv2d", "depthwise_conv2d", "pointwise_conv2d", "check_index_values", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise DsrewriteError(f"{name} must be an int or a pair of ints, got {v!r}")


def _precision(x: torch.Tensor, precision: Optional[str]) -> str:
    """The ``tl.dot`` input precision. It only matters for fp32 operands; 16-bit operands always take
    tensor cores, so they get Triton's default ("tf32")."""
    if precision not in (None, "ieee", "tf32"):
        raise DsrewriteError(f"precision must be 'ieee', 'tf32' or None, got {precision!r}")
    if x.dtype != torch.float32:
        return "tf32"
    if precision is None:  # same precision class as the torch convs this replaces (cuDNN allows tf32)
        return "tf32" if (x.is_cuda and torch.backends.cudnn.allow_tf32) else "ieee"
    return precision


def check_index_values(index: torch.Tensor, channels: int, *, sync: Optional[bool] = None) -> None:
    """Check that every ``channel_index`` value lies in ``[0, channels)`` without a device sync.

    ``sync`` (default: whether ``index`` is on the CPU) reads the values and raises :class:`DsrewriteError`.
    Otherwise (CUDA) it queues ``torch._assert_async``: the device raises on a bad value when the stream
    reaches it, and the kernels mask such an index meanwhile (no out-of-bounds read). Under tracing
    (``torch.compile``, fake tensors) nothing is checked: the values are data-dependent there;
    ``SeparableConv2d`` checks its index once, when it is built.
    """
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    if index.numel() == 0 or compiling or isinstance(index, FakeTensor):
        return
    msg = f"channel_index values must lie in [0, {channels})"
    if sync is None:
        sync = index.device.type == "cpu"
    if sync:
        if int(index.min()) < 0 or int(index.max()) >= channels:
            raise DsrewriteError(msg)
    else:
        torch._assert_async(((index >= 0) & (index < channels)).all(), msg)


def _check_tensors(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                   bias: Optional[torch.Tensor], channel_index: Optional[torch.Tensor] = None,
                   check_index: bool = True) -> None:
    if x.dim() != 4:
        raise DsrewriteError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    ragged = channel_index is not None
    if dw_weight.dim() != 4 or dw_weight.shape[1] != 1 or c == 0 or (dw_weight.shape[0] % c and not ragged):
        raise DsrewriteError(f"dw_weight must be [C*r, 1, kh, kw] with C={c}, got {tuple(dw_weight.shape)}")
    cr = dw_weight.shape[0]
    if ragged:
        if channel_index.dtype not in (torch.int32, torch.int64) or tuple(channel_index.shape) != (cr,):
            raise DsrewriteError(f"channel_index must be an integer tensor of shape [{cr}], got "
                                 f"{channel_index.dtype} {tuple(channel_index.shape)}")
        if channel_index.device != x.device:
            raise DsrewriteError(f"channel_index is on {channel_index.device}, x is on {x.device}: they must match")
        if check_index:
            check_index_values(channel_index, c)
    if pw_weight.dim() != 4 or pw_weight.shape[1] != cr or tuple(pw_weight.shape[2:]) != (1, 1):
        raise DsrewriteError(f"pw_weight must be [M, {cr}, 1, 1], got {tuple(pw_weight.shape)}")
    if bias is not None and tuple(bias.shape) != (pw_weight.shape[0],):
        raise DsrewriteError(f"bias must be [{pw_weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("x", x), ("dw_weight", dw_weight), ("pw_weight", pw_weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise DsrewriteError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}: they must match")
    if x.dtype not in DTYPES:
        raise DsrewriteError(f"dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if x.device.type != "cuda" and not interpreting():
        raise DsrewriteError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, *, stride=1, padding=0, dilation=1,
                     activation: Optional[str] = None, path: str = "auto",
                     precision: Optional[str] = None, channel_index: Optional[torch.Tensor] = None,
                     check_index: bool = True) -> torch.Tensor:
    """``act(pointwise(depthwise(x)))`` with Triton kernels; see :mod:`dsrewrite.kernels`.

    ``channel_index`` (ragged ranks): the input channel each of the ``dw_weight.shape[0]`` depthwise filters
    reads, read by the kernel itself (no gathered copy of ``x``). ``check_index=False`` skips the check of its
    values (a device-side assert on CUDA): for callers that validated the index once, as ``SeparableConv2d`` does.
    """
    _check_tensors(x, dw_weight, pw_weight, bias, channel_index, check_index)
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise DsrewriteError(f"activation must be None, 'relu', 'relu6' or 'silu', got {activation!r}")
    if path not in PATHS:
        raise DsrewriteError(f"path must be one of {PATHS}, got {path!r}")
    st, dil = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(st) < 1 or min(dil) < 1:
        raise DsrewriteError(f"stride and dilation must be >= 1, got stride={stride!r}, dilation={dilation!r}")
    try:
        pad = resolve_padding(padding, dw_weight.shape[2:], dil)
    except ValueError as e:
        raise DsrewriteError(str(e)) from None
    if pad is None:
        raise DsrewriteError(f"padding={padding!r} is not symmetric for kernel {tuple(dw_weight.shape[2:])} "
                             f"and dilation {dil}: use the torch backend")
    if min(pad) < 0:
        raise DsrewriteError(f"padding must be >= 0, got {padding!r}")
    oh = out_size(x.shape[2], dw_weight.shape[2], st[0], pad[0], dil[0])
    ow = out_size(x.shape[3], dw_weight.shape[3], st[1], pad[1], dil[1])
    if oh < 1 or ow < 1:
        raise DsrewriteError(f"input {tuple(x.shape[2:])} is smaller than the (dilated, padded) kernel")
    return separable_conv2d_op(x, dw_weight, pw_weight, bias, list(st), list(pad), list(dil), act, path,
                               _precision(x, precision), channel_index)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, *, stride=1, padding=0,
                     dilation=1, channel_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise conv (``weight [C*r, 1, kh, kw]``) with the standalone Triton kernel (forward only);
    ``channel_index``: the input channel of each filter (ragged ranks)."""
    st, dil = _pair(stride, "stride"), _pair(dilation, "dilation")
    pad = resolve_padding(padding, weight.shape[2:], dil)
    if pad is None:
        raise DsrewriteError(f"padding={padding!r} is not symmetric: use F.conv2d")
    return depthwise_conv2d_forward(x, weight, st, pad, dil, channel_index=channel_index)


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     activation: Optional[str] = None, precision: Optional[str] = None) -> torch.Tensor:
    """1x1 conv (``weight [M, K, 1, 1]``) + bias + activation with the Triton GEMM kernel (forward only)."""
    return pointwise_conv2d_forward(x, weight, bias, "none" if activation is None else activation,
                                    _precision(x, precision))
