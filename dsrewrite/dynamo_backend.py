"""``torch.compile`` backend: rewrite the captured graph's convs into separable pairs (1x1 convs and linear layers
into low-rank pairs, with ``kinds=``), then compile with Inductor.

``torch.compile(model, backend="dsrewrite", options={...})`` (registered through the ``torch_dynamo_backends``
entry point: no import needed) and ``dsrewrite.compile(model, **options)`` run the same
:class:`DsrewriteBackend`. Its options are :func:`dsrewrite.rewrite`'s (rank, include/exclude, kinds, budgets,
energy, calibration) and go through the same frontend, planner and factorisation, so ranks and factors equal
``rewrite()``'s.

Dynamo lifts parameters to graph inputs. Each functional conv (or linear: ``nn.Linear`` and ``F.linear`` arrive as
``torch._C._nn.linear``) whose weight is such an input is turned into a conv (``nn.Linear``) module holding that
very parameter, under its module path (the name ``rewrite()`` reports), so the shared fx frontend, planner and
backend (:func:`~dsrewrite.frontends.fx.collect_sites`, :func:`~dsrewrite.pipeline.plan_sites`,
:func:`~dsrewrite.backends.fx.apply_decisions`) do the rewrite; layers left dense go back to reading their graph
input, so the rest of the graph is untouched.

Factors come from the weights seen at compile time (the report says so). They are cached (per backend) by weight
identity and version counter: a recompile (a new batch size) reuses them. Parameters being graph inputs, Dynamo does
not recompile when a weight changes, so every call checks the rewritten weights' version counters and data
pointers (a few attribute reads) and refactorises a changed one at the same rank. Inference only: with grad
enabled and weights requiring grad the backend refuses, as the original weights would silently get no gradient.

The backend never fails the user's compile for a reason of its own. A conv whose parameter lifting cannot map
stays dense, with the reason in the report (``not lifted from the torch.compile graph: ...``). If the pass itself
fails on a graph (a bug, a graph it cannot read), or the compiler refuses the rewritten graph, the graph is compiled
as Dynamo captured it, with one warning (``dsrewrite: torch.compile graph 0/0 compiled without rewriting its convs:
...``) and the same words in that graph's report. Bad options, training (grad enabled on weights that require grad),
calibration data that does not fit, a budget no plan meets: those are the user's, and fail in one line
(:class:`~dsrewrite.errors.DsrewriteError`, which Dynamo wraps in ``BackendCompilerFailed``). A piece of a model
that Dynamo split at a graph break and that holds no conv to rewrite is compiled as is (budgets and calibration
concern the other pieces).

This module is the public path (the entry point, docs and tests name it); the code lives in :mod:`dsrewrite.dynamo`:
``inputs`` (graph inputs, parameter lifting), ``guards`` (weight checks, refactorisation), ``plans`` (the plan
cache each backend owns) and ``backend``.
"""
from __future__ import annotations

from .dynamo.backend import (COMPILERS, OPTIONS, DsrewriteBackend, clear_cache, compile,  # noqa: A004
                             dsrewrite_backend, last_report)

__all__ = ["DsrewriteBackend", "dsrewrite_backend", "compile", "last_report", "clear_cache", "OPTIONS", "COMPILERS"]
