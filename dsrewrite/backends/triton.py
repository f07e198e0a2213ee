"""Dispatch from ``SeparableConv2d`` to the fused Triton kernels of ``dsrewrite.kernels``."""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["triton_supports", "triton_forward"]


def triton_supports(module, x: torch.Tensor) -> Tuple[bool, str]:
    """Whether the Triton kernels can run ``module`` on ``x`` (and if not, why)."""
    return False, "the Triton kernels are not built yet"


def triton_forward(module, x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("the Triton kernels are not built yet")
