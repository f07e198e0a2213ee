"""The runtime a rewritten model is deployed to, and so timed in: PyTorch eager, Inductor, onnxruntime.

A separable pair's speed-up depends on what runs it (eager calls each op, Inductor fuses the pointwise work
around it, onnxruntime has its own conv kernels and graph optimisations), so ``target_latency`` plans with
layers timed in the deploy runtime and checks the whole model there, and the report's time line says which.
A :class:`Runtime` gives the three things every route needs: a callable that runs a model in it
(:meth:`Runtime.prepare`), the layer timer planning uses, and the words for the report.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .errors import DsrewriteError, first_line

__all__ = ["RUNTIMES", "Runtime", "get_runtime", "compiled", "export_onnx"]

RUNTIMES = ("eager", "inductor", "onnxruntime")


class Runtime:
    """PyTorch eager: the model is called as it is (the base every runtime refines)."""

    name = "eager"
    memory_formats = True  # whether NCHW vs channels_last is the runtime's to choose (not onnxruntime's)

    def __init__(self, *, ort_threads: Optional[int] = None, ort_optimization: str = "all",
                 ort_provider: str = "CPUExecutionProvider") -> None:
        self.ort = dict(threads=ort_threads, optimization=ort_optimization, provider=ort_provider)

    def prepare(self, model: nn.Module, args: Sequence[Any]) -> Callable[..., Any]:
        """What runs ``model`` on ``args`` in this runtime (called with ``*args``; ``model`` in eval mode)."""
        return model

    def label(self, memory_format: Optional[str]) -> str:
        """The report's words for where the time was measured."""
        return "PyTorch eager" + _layout(memory_format)

    def how(self, memory_format: Optional[str]) -> Optional[str]:
        """How to run the model as it was timed (``None``: as it is)."""
        if memory_format == "channels_last":
            return "run the model and its inputs in channels_last (.to(memory_format=torch.channels_last)) as timed"
        return None

    def layer_timer(self, device: torch.device, dtype: torch.dtype, backend: str, memory_format: str,
                    cache_file: Optional[str], ragged: bool) -> Any:
        """The layer timer latency planning uses in this runtime."""
        from .latency import LayerTimer

        return LayerTimer(device, dtype, backend, memory_format, cache_file=cache_file, ragged=ragged,
                          runtime=self)


class InductorRuntime(Runtime):
    """``torch.compile`` with Inductor: layers and whole models are compiled before they are timed."""

    name = "inductor"

    def prepare(self, model: nn.Module, args: Sequence[Any]) -> Callable[..., Any]:
        return compiled(model, len(args))

    def label(self, memory_format: Optional[str]) -> str:
        return "torch.compile (Inductor)" + _layout(memory_format)

    def how(self, memory_format: Optional[str]) -> Optional[str]:
        fmt = " in channels_last (model and inputs .to(memory_format=torch.channels_last))" \
            if memory_format == "channels_last" else ""
        return f"timed compiled: run it as torch.compile(model){fmt}"


class OnnxRuntime(Runtime):
    """onnxruntime: models are exported to ONNX and run in sessions with the ``ort_*`` options; layers are
    timed as the one-``Conv`` and depthwise + pointwise models the export produces."""

    name = "onnxruntime"
    memory_formats = False

    def prepare(self, model: nn.Module, args: Sequence[Any]) -> Callable[..., Any]:
        from .onnx.measure import session

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
        import onnxruntime as ort

        threads = self.ort["threads"]
        return (f"onnxruntime {ort.__version__} ({self.ort['provider']}, graph optimisation "
                f"{self.ort['optimization']}, {f'{threads} intra-op threads' if threads else 'default threads'}; timed with idle pool threads "
                f"sleeping, as two sessions share the cores)")

    def how(self, memory_format: Optional[str]) -> Optional[str]:
        return "timed as exported ONNX in onnxruntime with these session options: deploy the .onnx export"

    def layer_timer(self, device: torch.device, dtype: torch.dtype, backend: str, memory_format: str,
                    cache_file: Optional[str], ragged: bool) -> Any:
        from .onnx.latency import OrtLayerTimer

        return OrtLayerTimer(self.ort["threads"], optimization=self.ort["optimization"],
                             provider=self.ort["provider"])


def _layout(memory_format: Optional[str]) -> str:
    return f", {'NCHW' if memory_format == 'contiguous' else memory_format}" if memory_format else ""


_RUNTIMES = {"eager": Runtime, "inductor": InductorRuntime, "onnxruntime": OnnxRuntime}


def get_runtime(name: Optional[str], **ort: Any) -> Runtime:
    """The runtime called ``name`` (``None``: eager), with the onnxruntime session options ``ort_*``."""
    name = name or "eager"
    if name not in _RUNTIMES:
        raise DsrewriteError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    return _RUNTIMES[name](**ort)


def compiled(model: nn.Module, n_args: int) -> Callable[..., Any]:
    """``torch.compile`` of ``model`` called through a one-node fx wrapper: the wrapper's generated ``forward``
    is a code object of its own, so compiling many modules of one class (layers timed one by one) never
    reaches Dynamo's per-code-object recompile limit and falls back to eager."""
    import torch.fx as fx

    g = fx.Graph()
    xs = tuple(g.placeholder(f"x{i}") for i in range(n_args))
    g.output(g.call_module("model", xs))
    return torch.compile(fx.GraphModule({"model": model}, g))


def export_onnx(model: nn.Module, args: tuple, out: str, *, dynamic_batch: bool = True,
                verbose: bool = False) -> Optional[str]:
    """Export ``model`` to an ONNX file (torch.export-based exporter, weights inside the file).

    ``dynamic_batch``: a dynamic batch axis when the model takes one tensor (exported from a batch of 2, since
    torch.export fixes size-1 dimensions); when that is impossible or fails, the example's fixed shapes are
    used and the reason returned (``None`` otherwise)."""
    reason = None
    if dynamic_batch:
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            x = args[0]
            x2 = torch.cat([x, x]) if x.shape[0] == 1 else x
            try:
                torch.onnx.export(model, (x2,), out, dynamo=True, external_data=False, verbose=verbose,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
                return None
            except Exception as e:  # noqa: BLE001 - fall back to the fixed shapes the rewrite ran with
                reason = first_line(e, 160)
        else:
            reason = "the model does not take one tensor"
    try:
        torch.onnx.export(model, args, out, dynamo=True, external_data=False, verbose=verbose)
    except Exception as e:  # noqa: BLE001
        raise DsrewriteError(f"the model cannot be exported to ONNX: {first_line(e, 200)}") from None
    return reason

