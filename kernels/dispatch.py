"""The custom op's implementation: the fused-vs-split dispatcher and the kernel launches.

:func:`run_kernels` is what ``torch.ops.dsrewrite.separable_conv2d`` (:mod:`.library`) runs: it resolves
``path="auto"`` with :func:`choose_path`, then launches the fused kernel (:mod:`.separable_conv2d`) or the
depthwise + pointwise kernels (:mod:`.depthwise`, :mod:`.pointwise`). Arguments arrive checked and
normalised (:mod:`.ops`). Importing this module imports Triton.
"""
from __future__ import annotations

import math

from .depthwise import depthwise_conv2d_forward
from .pointwise import pointwise_conv2d_forward
from .separable_conv2d import FUSED_BLOCK_M_MAX, separable_conv2d_forward
from .shapes import output_memory_format

__all__ = ["run_kernels", "choose_path", "PATHS", "DW_FLOP_PER_BYTE"]

PATHS = ("auto", "fused", "split")

# Dispatcher constant: CUDA-core (non-tensor-core) fp32 FLOP/s over DRAM bytes/s. H100 SXM: ~67 TFLOP/s /
# ~3.35 TB/s = 20; A100: 19.5 / 2.0 = 10. A first guess, to be calibrated with benchmarks/kernel_speed.py.
DW_FLOP_PER_BYTE = 20.0


def choose_path(cr: int, m: int, kh: int, kw: int, itemsize: int) -> str:
    """``"fused"`` or ``"split"`` for ``cr`` depthwise channels, ``m`` outputs, a ``kh x kw`` kernel.

    One fused program covers ``FUSED_BLOCK_M_MAX`` (256) output channels; above that the depthwise tile is
    recomputed once per further block: ``2*kh*kw*(ceil(m/FUSED_BLOCK_M_MAX) - 1)`` extra FLOPs per (pixel, depthwise channel). It
    saves writing and reading the intermediate: ``2*itemsize`` bytes per (pixel, depthwise channel). Fuse
    while the extra FLOPs cost less time than the saved bytes (``DW_FLOP_PER_BYTE`` FLOPs per byte).
    ``cr`` does not enter: both costs scale with it.
    """
    extra_flops = 2 * kh * kw * (math.ceil(m / FUSED_BLOCK_M_MAX) - 1)
    saved_bytes = 2 * itemsize
    return "fused" if extra_flops <= DW_FLOP_PER_BYTE * saved_bytes else "split"


def run_kernels(x, dw_weight, pw_weight, bias, stride, padding, dilation, activation, path, precision, channel_index):
    """The custom op's real implementation (called by :mod:`.library`): resolve ``path="auto"``, then launch the
    fused kernel or the depthwise + pointwise kernels. Arguments are the op's, already checked and normalised."""
    cr, _, kh, kw = dw_weight.shape
    if path == "auto":
        path = choose_path(cr, pw_weight.shape[0], kh, kw, x.element_size())
    if path == "fused":
        return separable_conv2d_forward(x, dw_weight, pw_weight, bias, stride, padding, dilation,
                                        activation, precision, channel_index=channel_index)
    z = depthwise_conv2d_forward(x, dw_weight, stride, padding, dilation, channel_index=channel_index)
    return pointwise_conv2d_forward(z, pw_weight, bias, activation, precision,
                                    memory_format=output_memory_format(x))
