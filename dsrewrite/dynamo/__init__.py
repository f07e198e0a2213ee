"""The ``torch.compile`` backend's parts; :mod:`dsrewrite.dynamo.backend` is the public façade.

- :mod:`.inputs`: the captured graph's inputs, and lifting functional convs on parameter inputs into conv
  modules the shared fx frontend plans (and back, for the convs left dense).
- :mod:`.guards`: what the factors were computed from, checked on every call; a changed weight is refactorised.
- :mod:`.plans`: ranks and factors per graph, cached per backend so a recompile reuses them.
- :mod:`.backend`: :class:`~dsrewrite.dynamo.backend.DsrewriteBackend`, the entry point, ``compile`` and the report.

Nothing is imported here, so importing one part does not import the others.
"""
