"""One error type for bad input, so the CLI can print a one-line message and exit non-zero."""
from __future__ import annotations

from typing import Optional

__all__ = ["DsrewriteError", "BudgetUnreachable", "RewrittenModelFails", "first_line"]


class DsrewriteError(ValueError):
    """Bad input to dsrewrite: the message is one line and names the problem."""


class RewrittenModelFails(DsrewriteError):
    """The rewritten model does not run where the original did: ``layer`` is the last rewritten layer entered
    (``None``: none was), ``cause`` the error in one line."""

    def __init__(self, message: str, layer: Optional[str] = None, cause: str = "") -> None:
        super().__init__(message)
        self.layer, self.cause = layer, cause


class BudgetUnreachable(DsrewriteError):
    """A budget no plan meets: ``reachable`` is the smallest fraction (every eligible conv at its cheapest
    rank); ``layers`` holds each eligible conv's ``(dense, cheapest separable)`` costs and ``fixed`` the cost of
    the rest, so a caller can tell how much cheaper the pairs would have to be."""

    def __init__(self, message: str, *, target: float, reachable: float, layers: list, fixed: float,
                 total: float) -> None:
        super().__init__(message)
        self.target, self.reachable, self.layers, self.fixed, self.total = target, reachable, layers, fixed, total

    def scale_to_reach(self, fraction: float) -> Optional[float]:
        """The factor on every separable cost that would make ``fraction`` just reachable (``None``: none does)."""
        def reach(s: float) -> float:
            return (self.fixed + sum(min(d, s * c) for d, c in self.layers)) / self.total

        lo, hi = 0.0, 1.0
        if reach(lo) > fraction:
            return None
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if reach(mid) <= fraction else (lo, mid)
        return lo


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
