"""onnxruntime sessions and random inputs: what the ONNX route times models and layers in."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from ..errors import DsrewriteError

__all__ = ["random_feeds", "session"]

_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_,
}


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                 rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
    """Standard-normal float inputs (zeros for integer inputs) of the given static shapes."""
    rng = rng or np.random.default_rng()
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = _NP.get(vi.type.tensor_type.elem_type, np.float32)
        shape = tuple(shapes[vi.name])
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def session(model: Union[str, bytes, onnx.ModelProto], threads: Optional[int] = None, *, once: bool = False,
            optimization: str = "all", provider: str = "CPUExecutionProvider", spinning: bool = True):
    """An onnxruntime session of a model, a path or serialised bytes (``threads`` intra-op threads;
    onnxruntime's default when ``None``; ``optimization``: graph optimisation level, ``disable``, ``basic``,
    ``extended`` or ``all``; ``provider``: the execution provider, refused in one line when not available).
    ``once=True``: for a session run once (the self-check), basic graph optimisations only (several times
    cheaper to create than all of them), idle pool threads that sleep instead of spinning (numpy and torch
    work follows in the process), and no error log on stderr (the caller reports the exception).
    ``spinning=False``: idle pool threads sleep; every session that is *timed* beside another one needs it, since one session's spinning pool takes the cores from the other's run (per-round ratios
    of resnet18 spread 0.52-0.88 with spinning, 0.56-0.58 without: ``benchmarks/ort_timing_method.py``)."""
    import onnxruntime as ort  # optional dependency: the ONNX route rewrites without onnxruntime

    if provider not in ort.get_available_providers():
        raise DsrewriteError(f"onnxruntime has no {provider} here (available: {', '.join(ort.get_available_providers())})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    if once:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.log_severity_level = 4  # fatal only
    if once or not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=[provider])
