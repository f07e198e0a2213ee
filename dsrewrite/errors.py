"""One error type for bad input, so the CLI can print a one-line message and exit non-zero."""
from __future__ import annotations

from typing import Optional

__all__ = ["DsrewriteError", "first_line"]


class DsrewriteError(ValueError):
    """Bad input to dsrewrite: the message is one line and names the problem."""


def first_line(e: BaseException, limit: Optional[int] = None, *, typed: bool = False, joined: bool = False,
               cut_mark: str = "") -> str:
    """The first non-empty line of ``e``'s message (its type name when the message is empty), cut to ``limit``
    characters; ``typed`` puts the type name first (``KeyError: 'x'``). For one-line errors and notes.

    ``joined``: all the message's lines joined by spaces instead (a multi-line message, e.g. onnx.checker's,
    keeps its detail). ``cut_mark``: ends a cut text (``"..."``), within ``limit``.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if joined and lines:
        lines = [" ".join(lines)]
    name = type(e).__name__
    if typed:
        text = f"{name}: {lines[0]}" if lines else name
    else:
        text = lines[0] if lines else name
    if limit is None or len(text) <= limit:
        return text
    return text[:max(limit - len(cut_mark), 0)] + cut_mark
