"""One error type for bad input, so the CLI can print a one-line message and exit non-zero."""
from __future__ import annotations

__all__ = ["DsrewriteError"]


class DsrewriteError(ValueError):
    """Bad input to dsrewrite: the message is one line and names the problem."""
