"""Shape arithmetic shared by the kernels and ``dsrewrite.backends.triton`` (no Triton import here)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["out_size", "resolve_padding", "output_memory_format", "conv_output", "depthwise_operands"]


def out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output extent of a conv along one dim (as ``nn.Conv2d`` computes it)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def resolve_padding(padding: Union[str, int, Sequence[int]], kernel: Sequence[int],
                    dilation: Sequence[int]) -> Optional[Tuple[int, int]]:
    """Symmetric per-dim padding as ``(pad_h, pad_w)``, or ``None`` when it is not symmetric: ``'same'``
    with an even effective kernel ``dilation*(k-1)`` pads one more on the right in torch."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in totals):
            return None
        return (totals[0] // 2, totals[1] // 2)
    if isinstance(padding, int) and not isinstance(padding, bool):
        return (padding, padding)
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        return (int(padding[0]), int(padding[1]))
    raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the input is (unambiguously) channels_last, else contiguous NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_output(x: torch.Tensor, kernel: Sequence[int], channels: int, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> Tuple[torch.Tensor, int]:
    """The empty ``[N, channels, OH, OW]`` output of a conv of ``x`` (in ``x``'s memory format) and its pixel
    count ``P = N*OH*OW``."""
    n, _, h, w = x.shape
    oh = out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    ow = out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    y = torch.empty((n, channels, oh, ow), device=x.device, dtype=x.dtype, memory_format=output_memory_format(x))
    return y, n * oh * ow


def depthwise_operands(dw_weight: torch.Tensor, in_channels: int, channel_index: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """What the kernels take for a depthwise weight ``[C*r, 1, KH, KW]``: the ``[C*r, KH*KW]`` filters, the
    int64 channel index (the filters again as a never-read dummy when uniform) and the multiplier ``r``."""
    cr = dw_weight.shape[0]
    w = dw_weight.reshape(cr, -1).contiguous()
    idx = channel_index.to(torch.int64).contiguous() if channel_index is not None else w
    return w, idx, max(cr // in_channels, 1)
