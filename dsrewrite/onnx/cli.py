"""``dsrewrite rewrite model.onnx -o out.onnx ...``: the ONNX route of the command line."""
from __future__ import annotations

import argparse

from ..config import RewriteConfig
from ..errors import DsrewriteError
from ..report import Report

__all__ = ["cli_rewrite"]


def cli_rewrite(a: argparse.Namespace) -> Report:
    """Run :func:`dsrewrite.onnx.rewrite` for the parsed ``dsrewrite rewrite`` arguments; returns the report
    (the command line prints and saves it, as for torch models)."""
    from .api import rewrite

    if not a.out:
        raise DsrewriteError("-o/--out is required for an ONNX model (e.g. -o model_ds.onnx)")
    if not a.out.lower().endswith(".onnx"):
        raise DsrewriteError(f"the output of an ONNX model is an .onnx file, got {a.out!r}")
    if getattr(a, "weights", None):
        raise DsrewriteError("--weights applies to torch models only: the ONNX file holds its weights")
    cfg = RewriteConfig.from_cli(a)
    cfg.check_route("onnx", cli=True)
    input_shapes = None
    if getattr(a, "input_shape", None):
        import onnx

        try:
            header = onnx.load(a.src, load_external_data=False)
        except Exception:  # noqa: BLE001 - rewrite() below gives the one-line error for a bad file
            header = None
        if header is not None:
            inits = {t.name for t in header.graph.initializer}
            real = [i.name for i in header.graph.input if i.name not in inits]
            if len(real) != 1:
                raise DsrewriteError(f"--input-shape needs a model with one input, this one has {len(real)}")
            input_shapes = {real[0]: a.input_shape}
    _, report = rewrite(a.src, a.out, cfg, input_shapes=input_shapes)
    return report
