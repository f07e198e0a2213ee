"""Calibration data for ONNX models, and conv inputs collected in onnxruntime (issue 15, first part).

Data-aware initialisation needs what each conv sees on real data. For an ONNX model that data is a feed per
batch (``{input name: array}``), checked against the model's inputs here, and the conv inputs are read by
running a copy of the model in onnxruntime with those tensors exposed as extra graph outputs. The maths that
turns them into factors is :mod:`dsrewrite.calib.solve`, the same as on the PyTorch route.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper

from ..calib.images import LAYOUTS, load_images
from ..errors import DsrewriteError, first_line
from . import measure as onnx_measure  # called through the module: tests patch session
from .scopes import reads

__all__ = ["as_feeds", "image_feeds", "with_outputs", "collect_conv_inputs", "Feed"]

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


def _starts(count: int, step: int, fixed: bool) -> List[int]:
    """Where each batch starts; a model with a fixed batch size takes only whole batches (a short tail is
    dropped when there is at least one whole batch, else the shape check names the problem)."""
    if fixed and count >= step:
        return list(range(0, count - step + 1, step))
    return list(range(0, max(count, 1), step))


def as_feeds(calibration: Any, model: onnx.ModelProto, batch_size: int = 16) -> List[Feed]:
    """Calibration data as onnxruntime feeds checked against ``model``'s inputs.

    Accepted: an array (single-input models; split along its first axis into batches of ``batch_size``, or of
    the model's batch size when it is fixed), a ``.npy`` / ``.npz`` file (an ``.npz`` names its arrays after the
    inputs), a dict of arrays, or an iterable of such dicts (one feed each). Raises :class:`DsrewriteError` in
    one line for data that does not match the model (names, shapes, an empty source).
    """
    inputs = _graph_inputs(model)
    if not inputs:
        raise DsrewriteError("the model has no inputs to feed calibration data to")
    first = _dims(inputs[0])
    fixed_batch = bool(first) and first[0] is not None
    step = first[0] if fixed_batch else batch_size
    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        if not os.path.isfile(path):
            raise DsrewriteError(f"calibration file not found: {path}")
        if not path.lower().endswith((".npy", ".npz")):
            raise DsrewriteError(f"calibration file must be .npy or .npz (the command line also reads .pt and image "
                                 f"folders), got {os.path.basename(path)}")
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
        a = np.asarray(a)
        feeds = [_check({inputs[0].name: a[s:s + step]}, inputs, f"batch {i}")
                 for i, s in enumerate(_starts(len(a) if a.ndim else 0, step, fixed_batch))]
    elif isinstance(calibration, Mapping):
        arrays = {k: np.asarray(v) for k, v in calibration.items()}
        n = {len(v) for v in arrays.values()}
        if len(n) > 1:
            raise DsrewriteError(f"calibration arrays have different lengths: {sorted(n)}")
        count = n.pop() if n else 0
        feeds = [_check({k: v[s:s + step] for k, v in arrays.items()}, inputs, f"batch {i}")
                 for i, s in enumerate(_starts(count, step, fixed_batch))]
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


def image_feeds(folder: str, model: onnx.ModelProto, *, size: Optional[Tuple[int, int]] = None,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                layout: str = "nchw", bgr: bool = False, preprocess: Optional[Callable] = None,
                batch_size: int = 16, max_images: Optional[int] = 64,
                input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> List[Feed]:
    """A folder of images as feeds of a one-input image model (:func:`dsrewrite.calib.images.load_images`: resized to
    ``size`` ``(H, W)``, by default the model's own, scaled to [0, 1], ``(x - mean) / std``, ``layout`` NCHW or
    NHWC, ``bgr`` channel order; or ``preprocess(PIL.Image) -> array`` per image)."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise DsrewriteError(f"images feed a model with one input; this one takes {len(inputs)} "
                             f"({', '.join(v.name for v in inputs)}): give feed dicts")
    name = inputs[0].name
    given = (input_shapes or {}).get(name)
    dims = [int(d) if d else None for d in given] if given is not None else _dims(inputs[0])
    if layout not in LAYOUTS:
        raise DsrewriteError(f"calibration layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if len(dims) != 4 and preprocess is None:
        raise DsrewriteError(f"images need a 4-D input ({layout.upper()}); input {name!r} is {len(dims)}-D")
    c, spatial = (dims[1], dims[2:4]) if layout == "nchw" else (dims[3], dims[1:3])
    if size is None and preprocess is None:
        if any(d is None for d in spatial):
            raise DsrewriteError(f"input {name!r} has a symbolic height or width: give the image size "
                                 "(size=(H, W), --calib-size HxW)")
        size = tuple(spatial)
    arr = load_images(folder, size or (0, 0), c or 3, mean=mean, std=std, layout=layout, bgr=bgr,
                      max_images=max_images, preprocess=preprocess)
    return as_feeds(arr, model, batch_size)


def with_outputs(model: onnx.ModelProto, names: Sequence[str], *, only: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph also outputs the tensors ``names`` (type and shape left to
    onnxruntime). ``only``: those are its only outputs, and the nodes they do not depend on are dropped
    (onnxruntime runs every node of a graph, whatever is fetched). Tensors only defined inside subgraphs cannot
    be exposed this way and are refused."""
    graph = model.graph
    defined = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    missing = [n for n in names if n not in defined]
    if missing:
        raise DsrewriteError(f"tensors not in the main graph (inside a subgraph?): {', '.join(missing[:4])}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if only:
        del out.graph.output[:]
        need, keep = set(names), []
        for node in reversed(model.graph.node):
            if any(o in need for o in node.output):
                keep.append(node)
                need.update(reads(node))
        del out.graph.node[:]
        out.graph.node.extend(reversed(keep))
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=n))  # type and shape left to onnxruntime
            have.add(n)
    return out


def collect_conv_inputs(model: onnx.ModelProto, feeds: Sequence[Feed], names: Sequence[str], *,
                        threads: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """For each feed, ``{tensor name: value}`` of the tensors ``names`` (conv inputs) as onnxruntime computes
    them in ``model``, one feed at a time (memory bounded by one batch's activations)."""
    names = list(dict.fromkeys(names))
    sess = onnx_measure.session(with_outputs(model, names, only=True), threads, once=True)
    for i, feed in enumerate(feeds):
        try:
            values = sess.run(names, feed)
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"calibration feed {i} does not run through the model: "
                                 f"{first_line(e, 200, typed=True)}") from None
        yield dict(zip(names, values))
