"""Calibration data for ONNX models, and conv inputs collected in onnxruntime (issue 15, first part).

Data-aware initialisation needs what each conv sees on real data. For an ONNX model that data is a feed per
batch (``{input name: array}``), checked against the model's inputs here, and the conv inputs are read by
running a copy of the model in onnxruntime with those tensors exposed as extra graph outputs. The maths that
turns them into factors is :mod:`dsrewrite.calib_solve`, the same as on the PyTorch route.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import DsrewriteError, first_line

__all__ = ["as_feeds", "with_outputs", "collect_conv_inputs"]

Feed = Dict[str, np.ndarray]


def _graph_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> List[Optional[int]]:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _check(feed: Mapping[str, Any], inputs: List[onnx.ValueInfoProto], where: str) -> Feed:
    names = [vi.name for vi in inputs]
    if set(feed) != set(names):
        raise DsrewriteError(f"calibration {where} has inputs {sorted(feed)}, the model takes {names}")
    out: Feed = {}
    for vi in inputs:
        a = np.asarray(feed[vi.name])
        dims = _dims(vi)
        np_type = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if a.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, a.shape)):
            want = "x".join("?" if d is None else str(d) for d in dims)
            raise DsrewriteError(f"calibration {where}: input {vi.name!r} has shape "
                                 f"{'x'.join(map(str, a.shape))}, the model takes {want}")
        if np.issubdtype(np_type, np.floating) and not np.issubdtype(a.dtype, np.number):
            raise DsrewriteError(f"calibration {where}: input {vi.name!r} is {a.dtype}, the model takes {np_type}")
        out[vi.name] = a.astype(np_type, copy=False)
    return out


def _batches(a: np.ndarray, batch: Optional[int]) -> List[np.ndarray]:
    if batch is None:
        return [a]
    return [a[i:i + batch] for i in range(0, len(a), batch)]


def as_feeds(calibration: Any, model: onnx.ModelProto, batch_size: int = 16) -> List[Feed]:
    """Calibration data as onnxruntime feeds checked against ``model``'s inputs.

    Accepted: an array (single-input models; split along its first axis into batches of ``batch_size`` when
    the model's batch axis is symbolic), a ``.npy`` / ``.npz`` file (an ``.npz`` names its arrays after the
    inputs), a dict of arrays, or an iterable of such dicts (one feed each). Raises :class:`DsrewriteError` in
    one line for data that does not match the model (names, shapes, an empty source).
    """
    inputs = _graph_inputs(model)
    if not inputs:
        raise DsrewriteError("the model has no inputs to feed calibration data to")
    fixed_batch = bool(_dims(inputs[0])) and _dims(inputs[0])[0] is not None
    step = None if fixed_batch else batch_size
    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        if not os.path.isfile(path):
            raise DsrewriteError(f"calibration file not found: {path}")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"cannot read calibration file {path}: {first_line(e, 160, typed=True)}") from None
        calibration = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    if isinstance(calibration, np.ndarray) or hasattr(calibration, "numpy") and not isinstance(calibration, dict):
        a = calibration.numpy() if hasattr(calibration, "numpy") else calibration
        if len(inputs) != 1:
            raise DsrewriteError(f"the model takes {len(inputs)} inputs ({', '.join(v.name for v in inputs)}): "
                                 f"give calibration data as dicts of arrays named after them")
        feeds = [_check({inputs[0].name: b}, inputs, f"batch {i}") for i, b in enumerate(_batches(np.asarray(a), step))]
    elif isinstance(calibration, Mapping):
        arrays = {k: np.asarray(v) for k, v in calibration.items()}
        n = {len(v) for v in arrays.values()}
        if len(n) > 1:
            raise DsrewriteError(f"calibration arrays have different lengths: {sorted(n)}")
        count = n.pop() if n else 0
        starts = [0] if step is None else range(0, count, step)
        feeds = [_check({k: v if step is None else v[s:s + step] for k, v in arrays.items()}, inputs,
                        f"batch {i}") for i, s in enumerate(starts)]
    elif isinstance(calibration, Iterable):
        feeds = []
        for i, f in enumerate(calibration):
            if not isinstance(f, Mapping):
                raise DsrewriteError(f"calibration item {i} is a {type(f).__name__}: give dicts of arrays named "
                                     f"after the model's inputs")
            feeds.append(_check(f, inputs, f"feed {i}"))
    else:
        raise DsrewriteError(f"calibration must be an array, a .npy/.npz file or feed dicts, got "
                             f"{type(calibration).__name__}")
    if not feeds or all(len(next(iter(f.values()))) == 0 for f in feeds):
        raise DsrewriteError("calibration data is empty")
    return feeds


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph also outputs the tensors ``names`` (float, shape left to
    onnxruntime). Tensors only defined inside subgraphs cannot be exposed this way and are refused."""
    graph = model.graph
    defined = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    missing = [n for n in names if n not in defined]
    if missing:
        raise DsrewriteError(f"tensors not in the main graph (inside a subgraph?): {', '.join(missing[:4])}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            have.add(n)
    return out


def collect_conv_inputs(model: onnx.ModelProto, feeds: Sequence[Feed], names: Sequence[str], *,
                        threads: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """For each feed, ``{tensor name: value}`` of the tensors ``names`` (conv inputs) as onnxruntime computes
    them in ``model``, one feed at a time (memory bounded by one batch's activations)."""
    from .measure import session

    names = list(dict.fromkeys(names))
    sess = session(with_outputs(model, names), threads, once=True)
    for i, feed in enumerate(feeds):
        try:
            values = sess.run(names, feed)
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"calibration feed {i} does not run through the model: "
                                 f"{first_line(e, 200, typed=True)}") from None
        yield dict(zip(names, values))
