"""``dsrewrite rewrite model.onnx -o out.onnx ...``: the ONNX route of the command line."""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Tuple

import onnx
import torch

from ..calib.images import image_options, load_tensors
from ..config import RewriteConfig
from ..errors import DsrewriteError
from ..report import Report
from .api import REPLAY_OPTIONS, apply_plan, rewrite
from .calib_data import image_feeds

__all__ = ["cli_rewrite"]

_TIMING = ("measure_time", "ort_threads", "ort_optimization", "ort_provider")  # --plan times nothing, as for torch


def cli_rewrite(a: argparse.Namespace) -> Report:
    """Run :func:`dsrewrite.onnx.rewrite` (or, with ``--plan``, :func:`dsrewrite.onnx.apply_plan`) for the parsed
    ``dsrewrite rewrite`` arguments, and write the plan with ``--save-plan``; returns the report (the command line
    prints and saves it, as for torch models)."""
    if not a.out:
        raise DsrewriteError("-o/--out is required for an ONNX model (e.g. -o model_ds.onnx)")
    if not a.out.lower().endswith(".onnx"):
        raise DsrewriteError(f"the output of an ONNX model is an .onnx file, got {a.out!r}")
    if getattr(a, "weights", None):
        raise DsrewriteError("--weights applies to torch models only: the ONNX file holds its weights")
    cfg = RewriteConfig.from_cli(a)
    cfg.check_route("onnx", cli=True)
    input_shapes = _input_shapes(a.src, getattr(a, "input_shape", None))
    extra = {}
    if getattr(a, "calibration", None):
        extra["calibration"] = _calibration(a, input_shapes)
    if getattr(a, "plan", None):  # the command line has refused the flags that would plan again; nothing timed
        given = {k: v for k, v in cfg.given().items() if k in REPLAY_OPTIONS and k not in _TIMING}
        result = apply_plan(a.src, a.out, a.plan, extra.get("calibration"), **dict(given, input_shapes=input_shapes))
    else:
        result = rewrite(a.src, a.out, cfg, input_shapes=input_shapes, **extra)
    if getattr(a, "save_plan", None):
        result.plan.save(a.save_plan)
    return result.report


def _calibration(a: argparse.Namespace, input_shapes):
    """``--calibration``: a folder of images (the ``--calib-*`` preprocessing) as feeds, a ``.pt`` file of a
    tensor or of a dict of tensors by input name as arrays; ``.npy`` / ``.npz`` paths are read by ``as_feeds``."""
    path = a.calibration
    if os.path.isdir(path):
        try:
            header = onnx.load(a.src, load_external_data=False)
        except Exception:  # noqa: BLE001 - rewrite() gives the one-line error for a bad file
            return path
        return image_feeds(path, header, layout=getattr(a, "calib_layout", "nchw"), input_shapes=input_shapes,
                           **image_options(a))
    if path.lower().endswith((".pt", ".pth")) and os.path.isfile(path):
        data = load_tensors(path)
        if isinstance(data, torch.Tensor):
            return data.numpy()
        if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
            return {k: v.numpy() for k, v in data.items()}
        raise DsrewriteError(f"calibration file {path} must hold a tensor or a dict of tensors by input name, "
                             f"got {type(data).__name__}")
    return path


def _input_shapes(src: str, given) -> Optional[Dict[str, Tuple[int, ...]]]:
    """``--input-shape`` values by input name: ``NAME=SHAPE`` as given; an unnamed shape for a one-input model."""
    if not given:
        return None
    named = {name: shape for name, shape in given if name is not None}
    unnamed = [shape for name, shape in given if name is None]
    if not unnamed:
        return named
    try:
        header = onnx.load(src, load_external_data=False)
    except Exception:  # noqa: BLE001 - rewrite() gives the one-line error for a bad file
        return named or None
    inits = {t.name for t in header.graph.initializer}
    real = [i.name for i in header.graph.input if i.name not in inits]
    if len(unnamed) > 1 or len(real) != 1:
        raise DsrewriteError(f"this model has {len(real)} inputs ({', '.join(real[:6])}): give --input-shape "
                             "NAME=SHAPE once per input")
    return {real[0]: unnamed[0], **named}

