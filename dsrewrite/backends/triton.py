"""Dispatch from ``SeparableConv2d`` to the Triton kernels of ``dsrewrite.kernels``.

``triton_supports`` says whether the kernels can run a module on an input (and why not); it imports
neither Triton nor the kernels, so ``backend="auto"`` on CPU costs nothing. ``backend="auto"`` runs Triton
only on CUDA tensors; ``backend="triton"`` also accepts CPU tensors when ``TRITON_INTERPRET=1`` (tests).
``dsrewrite.kernels`` is imported on first use: its import registers the custom op
``torch.ops.dsrewrite.separable_conv2d``, which ``import dsrewrite`` does not do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["triton_supports", "triton_forward", "module_padding"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def module_padding(module) -> Optional[Tuple[int, int]]:
    """The depthwise conv's padding as symmetric ``(pad_h, pad_w)``, or ``None`` when asymmetric."""
    from ..kernels.shapes import resolve_padding  # optional Triton path: its import registers the custom op

    dw = module.depthwise
    return resolve_padding(dw.padding, dw.kernel_size, dw.dilation)


def triton_supports(module, x: torch.Tensor) -> Tuple[bool, str]:
    """Whether the Triton kernels can run ``module`` (a ``SeparableConv2d``) on ``x``, and if not, why."""
    from ..kernels import interpreting, is_available  # optional Triton path: its import registers the custom op

    if getattr(module, "_dims", 2) != 2:
        return False, "only SeparableConv2d has Triton kernels"
    if x.device.type != "cuda":  # the common CPU case first: no lookup at all
        if not (module.backend == "triton" and x.device.type == "cpu" and interpreting()):
            return False, f"input on {x.device.type} (Triton runs on CUDA; CPU only with TRITON_INTERPRET=1)"
    if not is_available():
        return False, "triton is not installed"
    if x.dim() != 4:
        return False, f"input must be 4-D [N, C, H, W], got {x.dim()}-D"
    if x.dtype not in _DTYPES:
        return False, f"dtype {x.dtype} is not supported (float32, float16, bfloat16)"
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return False, "the Triton interpreter has no bfloat16"
    dw, pw = module.depthwise, module.pointwise
    for p in (dw.weight, pw.weight, pw.bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False, f"weights are {p.dtype} on {p.device}, input is {x.dtype} on {x.device}"
    if x.shape[1] != module.in_channels:
        return False, f"input has {x.shape[1]} channels, the module expects {module.in_channels}"
    if dw.padding_mode != "zeros":
        return False, f"padding_mode={dw.padding_mode!r} (the kernels pad with zeros only)"
    if module_padding(module) is None:
        return False, f"padding={dw.padding!r} is asymmetric for kernel {dw.kernel_size}, dilation {dw.dilation}"
    return True, "ok"


def triton_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` with ``dsrewrite.kernels.separable_conv2d`` (call ``triton_supports`` first)."""
    from ..kernels import separable_conv2d  # optional Triton path: its import registers the custom op

    dw, pw = module.depthwise, module.pointwise
    return separable_conv2d(x, dw.weight, pw.weight, pw.bias, stride=dw.stride, padding=module_padding(module),
                            dilation=dw.dilation, channel_index=module.channel_index,
                            check_index=False)  # validated when the module was built; the kernels mask it
