"""Where the kernels can run: whether Triton is installed, whether it interprets on the CPU.

Imports no Triton (and no torch): ``dsrewrite.backends.triton`` asks these questions on every call to decide
whether to use the kernels at all.
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["is_available", "interpreting"]

_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # looked up once, not on every forward


def is_available() -> bool:
    """Whether Triton can be imported (it is not imported here)."""
    return _TRITON_FOUND


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): one small config, no tuning."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
