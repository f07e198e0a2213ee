"""One error type for bad input, so the CLI can print a one-line message and exit non-zero."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DsrewriteError", "BudgetUnreachable", "RewrittenModelFails", "first_line", "raise_if_out_of_memory"]


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


def raise_if_out_of_memory(e: BaseException) -> None:
    """Running out of memory (CPU or GPU) is the machine's limit, not a fact about the model or a layer: say so in
    one line (a :class:`DsrewriteError`); any other error passes through."""
    oom = isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()))
    if oom:
        raise DsrewriteError(f"ran out of memory while rewriting ({first_line(e, 160, typed=True, cut_mark='...')}): "
                             "give smaller example inputs or free memory") from None
