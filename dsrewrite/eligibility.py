"""Which convolutions the pass can rewrite: a reason string for each one it cannot, ``None`` otherwise."""
from __future__ import annotations

from typing import Optional

from .ir import ConvSpec

__all__ = ["why_not"]


def why_not(spec: ConvSpec) -> Optional[str]:
    """Return why ``spec`` cannot become a depthwise-separable pair, or ``None`` if it can."""
    if spec.transposed:
        return "transposed convolution is not rewritten"
    if spec.spatial_dims not in (1, 2):
        return f"{spec.spatial_dims}-D convolution is not supported (1-D and 2-D only)"
    if spec.groups != 1:
        if spec.groups == spec.in_channels:
            return f"already depthwise (groups={spec.groups})"
        return f"grouped convolution (groups={spec.groups}) is not rewritten"
    if spec.kernel_area <= 1:
        return "1x1 kernel: already pointwise"
    if spec.extra.get("unsupported"):
        return str(spec.extra["unsupported"])
    return None
