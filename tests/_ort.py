"""onnxruntime helpers shared by the ONNX test files."""
import numpy as np
import onnxruntime as ort


def run(model, feeds):
    """Outputs of ``model`` (a path or a ModelProto) in a fresh CPU session."""
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def rel(a, b) -> float:
    """Relative Frobenius error of ``a`` against ``b``, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
