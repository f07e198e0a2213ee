"""Triton kernels for depthwise-separable convolutions (installed as ``dsrewrite.kernels``).

* :func:`separable_conv2d`: ``act(pointwise(depthwise(x)))`` as one fused Triton kernel (the depthwise
  result stays in registers), or a depthwise kernel + a pointwise kernel when the dispatcher
  (:func:`choose_path`) says fusing costs more than it saves. Autograd and ``torch.compile`` work through
  the custom op ``torch.ops.dsrewrite.separable_conv2d``.
* :func:`depthwise_conv2d`, :func:`pointwise_conv2d`: the two halves alone (forward only).

Importing this package registers the custom op (schema, fake implementation, autograd, FLOP formula;
:mod:`.library`) but not the kernels: they load on the op's first call, so the import needs no GPU and works
without Triton (``import dsrewrite`` does not import this package).

Modules: :mod:`.env` (is Triton installed, is it interpreting; no Triton import), :mod:`.shapes` (shape
arithmetic; no Triton import), :mod:`.library` (the ``torch.library`` custom ops), :mod:`.ops` (the public
functions: argument checks, then the op), :mod:`.dispatch` (the op's implementation: the fused-vs-split
dispatcher and the kernel launches), :mod:`.common` (pieces shared by the kernel files), the kernel files
:mod:`.separable_conv2d`, :mod:`.depthwise`, :mod:`.pointwise`, :mod:`.separable_backward`, and :mod:`.aot`
(compiles them for a GPU on a machine without one). Note: ``dsrewrite.kernels.separable_conv2d``
is the function; the module of the same name is reached with
``from dsrewrite.kernels.separable_conv2d import separable_conv2d_forward``.

Imported as a top-level ``kernels`` (a script or ``python -c`` run from the repository root puts the root on
``sys.path``), this folder is not a package of that name: it hands the name to the next ``kernels`` on the
import path (Hugging Face's ``kernels`` distribution) or, when there is none, to an empty namespace package
(what the folder would be without this file), so other libraries' probes (transformers'
``is_kernels_available``) see what is really installed (:func:`_yield_top_level_name`).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Optional


def _yield_top_level_name() -> None:
    """Give the top-level name ``kernels`` to what it names without the repository root on the path.

    The next ``kernels`` the import system finds outside this folder (an installed distribution) is loaded in
    this import's place; without one, an empty namespace package (no ``__file__``, no ``__version__``, no
    submodules) takes it: transformers reads that as "not installed", and ``from kernels import x`` raises
    ``ImportError``. Either way ``sys.modules["kernels"]`` is the replacement, which the import returns.
    """
    name = __name__
    here = os.path.dirname(os.path.realpath(__file__))
    root = os.path.dirname(here)

    def ours(spec) -> bool:
        places = [spec.origin] if spec.origin else []
        places += list(spec.submodule_search_locations or [])
        return any(os.path.realpath(p) == here or os.path.realpath(p).startswith(here + os.sep) for p in places)

    path = [p for p in sys.path if isinstance(p, str) and os.path.realpath(p or os.curdir) != root]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(name, path if finder is importlib.machinery.PathFinder else None)
        if spec is not None and spec.loader is not None and not ours(spec):
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return
    sys.modules[name] = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))


_TOP_LEVEL = "." not in __name__  # imported as top-level `kernels` (the repository root on sys.path)
if _TOP_LEVEL:
    _yield_top_level_name()  # the name goes elsewhere; the rest of this file loads nothing (no torch, no op)
else:
    import torch

    from .env import interpreting, is_available  # no Triton import

__all__ = ["separable_conv2d", "depthwise_conv2d", "pointwise_conv2d", "choose_path", "is_available", "interpreting"]


def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, *, stride=1, padding=0, dilation=1,
                     activation: Optional[str] = None, path: str = "auto",
                     precision: Optional[str] = None, channel_index: Optional[torch.Tensor] = None,
                     check_index: bool = True) -> torch.Tensor:
    """Fused depthwise + pointwise conv2d: ``act(conv2d(conv2d(x, dw_weight, groups=C), pw_weight, bias))``.

    Args:
        x: ``[N, C, H, W]``, NCHW or channels_last (the output keeps the format), fp32/fp16/bf16, CUDA
            (CPU only under ``TRITON_INTERPRET=1``).
        dw_weight: ``[C*r, 1, kh, kw]``; depthwise channel ``c*r + j`` reads input channel ``c``.
        pw_weight: ``[M, C*r, 1, 1]``. bias: ``[M]`` or None.
        stride, dilation: int or pair. padding: int, pair, ``'valid'``, or ``'same'`` when symmetric.
        activation: None, ``"relu"``, ``"relu6"`` or ``"silu"``, fused in the epilogue.
        path: ``"auto"`` (dispatcher), ``"fused"`` or ``"split"`` (depthwise kernel, then pointwise).
        precision: fp32 ``tl.dot`` precision, ``"ieee"`` or ``"tf32"``; None follows
            ``torch.backends.cudnn.allow_tf32`` on CUDA (as ``F.conv2d`` does) and is ``"ieee"`` elsewhere.
        channel_index: ragged ranks: int ``[dw_weight.shape[0]]``, the input channel each depthwise filter
            reads (the kernels read through it: no gathered copy of ``x``).
        check_index: check the index values (on CUDA a device-side assert, no sync); callers that validated
            the index once (``SeparableConv2d``) pass False. The kernels mask an out-of-range index either way.
    """
    from .ops import separable_conv2d as impl  # lazily: .ops imports Triton and the kernels

    return impl(x, dw_weight, pw_weight, bias, stride=stride, padding=padding, dilation=dilation,
                activation=activation, path=path, precision=precision, channel_index=channel_index,
                check_index=check_index)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, *, stride=1, padding=0, dilation=1,
                     channel_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise conv2d (``weight [C*r, 1, kh, kw]``) with the standalone Triton kernel (forward only);
    ``channel_index``: the input channel of each filter (ragged ranks)."""
    from .ops import depthwise_conv2d as impl  # lazily: .ops imports Triton and the kernels

    return impl(x, weight, stride=stride, padding=padding, dilation=dilation, channel_index=channel_index)


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     activation: Optional[str] = None, precision: Optional[str] = None) -> torch.Tensor:
    """1x1 conv2d + bias + activation with the Triton GEMM kernel (forward only)."""
    from .ops import pointwise_conv2d as impl  # lazily: .ops imports Triton and the kernels

    return impl(x, weight, bias, activation=activation, precision=precision)


def choose_path(cr: int, m: int, kh: int, kw: int, itemsize: int) -> str:
    """``"fused"`` or ``"split"``: the dispatcher's heuristic (documented in :func:`.dispatch.choose_path`)."""
    from .dispatch import choose_path as impl  # lazily: .dispatch imports Triton and the kernels

    return impl(cr, m, kh, kw, itemsize)


class _Package(types.ModuleType):
    """Keep the public functions when a same-named kernel module is imported (the import system would
    otherwise set ``dsrewrite.kernels.separable_conv2d`` to the module)."""

    def __setattr__(self, name: str, value) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


if not _TOP_LEVEL:
    sys.modules[__name__].__class__ = _Package
    from . import library  # noqa: E402,F401 - registers torch.ops.dsrewrite.separable_conv2d (no Triton import)
