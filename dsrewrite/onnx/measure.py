"""onnxruntime CPU latency of an ONNX model on random inputs: what the report's measured time means for ONNX."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

__all__ = ["random_feeds", "session", "time_session"]

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


def session(model: Union[str, bytes, onnx.ModelProto], threads: Optional[int] = None, *, once: bool = False):
    """A CPU onnxruntime session of a model, a path or serialised bytes (``threads`` intra-op threads;
    onnxruntime's default when ``None``).
    ``once=True``: for a session run once (the self-check), basic graph optimisations only (several times
    cheaper to create than all of them), idle pool threads that sleep instead of spinning (numpy and torch
    work follows in the process), and no error log on stderr (the caller reports the exception)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if once:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.log_severity_level = 4  # fatal only
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def time_session(sess, feeds: Mapping[str, np.ndarray], *, warmup: int = 2, reps: int = 10,
                 max_seconds: float = 5.0) -> float:
    """Median wall time of ``sess.run`` in milliseconds (the shared timer, :func:`dsrewrite.measure.time_call`)."""
    import torch

    from ..measure import time_call

    return time_call(sess.run, (None, dict(feeds)), warmup=warmup, reps=reps, max_seconds=max_seconds,
                     device=torch.device("cpu"))
