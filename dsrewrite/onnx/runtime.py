"""The onnxruntime runtime of the torch route (``runtime="onnxruntime"``): models exported to ONNX and timed in
onnxruntime sessions, layers by :class:`~dsrewrite.onnx.latency.OrtLayerTimer`. Registered with
:func:`dsrewrite.timing.runtimes.register_runtime` when this module is imported (``get_runtime("onnxruntime")``
imports it)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import DsrewriteError
from ..timing.runtimes import Runtime, export_onnx, register_runtime
from .latency import OrtLayerTimer
from .measure import session

__all__ = ["OnnxRuntime"]


@register_runtime
class OnnxRuntime(Runtime):
    """onnxruntime: models are exported to ONNX and run in sessions with the ``ort_*`` options; layers are
    timed as the one-``Conv`` and depthwise + pointwise models the export produces."""

    name = "onnxruntime"
    memory_formats = False
    runs_torch = False

    def prepare(self, model: nn.Module, args: Sequence[Any]) -> Callable[..., Any]:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            export_onnx(model, tuple(args), path, dynamic_batch=False)
            sess = session(path, self.ort["threads"], optimization=self.ort["optimization"],
                           provider=self.ort["provider"], spinning=False)
        names = [i.name for i in sess.get_inputs()]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(names) != len(tensors):
            raise DsrewriteError(f"the ONNX export takes {len(names)} input(s) and the example has {len(tensors)} "
                                 f"tensor(s): runtime='onnxruntime' needs tensor inputs")
        feeds = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}
        return lambda *_: sess.run(None, feeds)

    def label(self, memory_format: Optional[str]) -> str:
        """The onnxruntime version and session options (the words of both routes' time line)."""
        import onnxruntime as ort  # optional dependency: the ONNX route rewrites without it

        threads = self.ort["threads"]
        return (f"onnxruntime {ort.__version__} ({self.ort['provider']}, graph optimisation "
                f"{self.ort['optimization']}, {f'{threads} intra-op threads' if threads else 'default threads'}; timed with "
                "idle pool threads sleeping, as two sessions share the cores)")

    def how(self, memory_format: Optional[str]) -> Optional[str]:
        return "timed as exported ONNX in onnxruntime with these session options: deploy the .onnx export"

    def layer_timer(self, device: torch.device, dtype: torch.dtype, backend: str, memory_format: str,
                    cache_file: Optional[str], ragged: bool) -> Any:
        return OrtLayerTimer(self.ort["threads"], optimization=self.ort["optimization"],
                             provider=self.ort["provider"])
