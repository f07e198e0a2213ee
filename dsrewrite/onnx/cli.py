"""``dsrewrite rewrite model.onnx -o out.onnx ...``: the ONNX route of the command line."""
from __future__ import annotations

import argparse

from ..errors import DsrewriteError

__all__ = ["cli_rewrite"]


def cli_rewrite(a: argparse.Namespace) -> int:
    """Run :func:`dsrewrite.onnx.rewrite` for the parsed ``dsrewrite rewrite`` arguments; returns the exit code."""
    from ..cli import _emit_report
    from .api import rewrite

    if not a.out:
        raise DsrewriteError("-o/--out is required for an ONNX model (e.g. -o model_ds.onnx)")
    if not a.out.lower().endswith(".onnx"):
        raise DsrewriteError(f"the output of an ONNX model is an .onnx file, got {a.out!r}")
    if getattr(a, "weights", None):
        raise DsrewriteError("--weights applies to torch models only: the ONNX file holds its weights")
    for flag in ("calibration", "target_latency"):
        if getattr(a, flag, None) is not None:
            raise DsrewriteError(f"--{flag.replace('_', '-')} is not supported for ONNX models (it runs the model "
                                 "in PyTorch); use --rank, --target-flops, --target-params or --energy")
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
    _, report = rewrite(a.src, a.out, rank=a.rank, include=a.include or None, exclude=a.exclude or None,
                        overwrite=bool(getattr(a, "overwrite", False)), input_shapes=input_shapes,
                        measure_time=not getattr(a, "no_time", False), progress=not a.quiet,
                        target_flops=getattr(a, "target_flops", None), target_params=getattr(a, "target_params", None),
                        energy=getattr(a, "energy", None), ragged=bool(getattr(a, "ragged", False)))
    _emit_report(report, a)
    if not a.quiet:
        print(f"wrote {a.out}")
    return 0
