"""The runtime a rewritten model is deployed to, and so timed in: PyTorch eager, Inductor, onnxruntime.

A separable pair's speed-up depends on what runs it (eager calls each op, Inductor fuses the pointwise work
around it, onnxruntime has its own conv kernels and graph optimisations), so ``target_latency`` plans with
layers timed in the deploy runtime and checks the whole model there, and the report's time line says which.
A :class:`Runtime` gives the three things every route needs: a callable that runs a model in it
(:meth:`Runtime.prepare`), the layer timer planning uses, and the words for the report.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional, Sequence, Type

import torch
from torch import fx, nn

from ..errors import DsrewriteError, first_line
from .layers import LayerTimer
from .measure import compare, eval_mode, input_device, note_disturbed

__all__ = ["RUNTIMES", "Runtime", "get_runtime", "register_runtime", "time_models", "compiled", "export_onnx"]

RUNTIMES = ("eager", "inductor", "onnxruntime")
_RUNTIMES: Dict[str, Type["Runtime"]] = {}
# runtimes a route provides, by the module that registers them: loaded the first time one is asked for, so the
# core never imports a route (and onnxruntime stays an optional dependency)
PROVIDED_BY = {"onnxruntime": "dsrewrite.onnx.runtime"}


def register_runtime(cls: Type["Runtime"]) -> Type["Runtime"]:
    """Make ``cls`` the runtime called ``cls.name`` (a route registers the runtime it provides); a decorator."""
    _RUNTIMES[cls.name] = cls
    return cls


class Runtime:
    """PyTorch eager: the model is called as it is (the base every runtime refines)."""

    name = "eager"
    memory_formats = True  # whether NCHW vs channels_last is the runtime's to choose (not onnxruntime's)
    runs_torch = True  # runs the torch modules themselves (their device and SeparableConv backend are reported)

    def __init__(self, *, ort_threads: Optional[int] = None, ort_optimization: str = "all",
                 ort_provider: str = "CPUExecutionProvider") -> None:
        self.ort = dict(threads=ort_threads, optimization=ort_optimization, provider=ort_provider)

    def prepare(self, model: nn.Module, args: Sequence[Any]) -> Callable[..., Any]:
        """What runs ``model`` on ``args`` in this runtime (called with ``*args``; ``model`` in eval mode)."""
        return model

    def label(self, memory_format: Optional[str]) -> str:
        """The report's words for where the time was measured."""
        return "PyTorch eager" + layout_words(memory_format)

    def how(self, memory_format: Optional[str]) -> Optional[str]:
        """How to run the model as it was timed (``None``: as it is)."""
        if memory_format == "channels_last":
            return "run the model and its inputs in channels_last (.to(memory_format=torch.channels_last)) as timed"
        return None

    def layer_timer(self, device: torch.device, dtype: torch.dtype, backend: str, memory_format: str,
                    cache_file: Optional[str], ragged: bool) -> Any:
        """The layer timer latency planning uses in this runtime."""
        return LayerTimer(device, dtype, backend, memory_format, cache_file=cache_file, ragged=ragged,
                          runtime=self)


@register_runtime
class InductorRuntime(Runtime):
    """``torch.compile`` with Inductor: layers and whole models are compiled before they are timed."""

    name = "inductor"

    def prepare(self, model: nn.Module, args: Sequence[Any]) -> Callable[..., Any]:
        return compiled(model, len(args))

    def label(self, memory_format: Optional[str]) -> str:
        return "torch.compile (Inductor)" + layout_words(memory_format)

    def how(self, memory_format: Optional[str]) -> Optional[str]:
        fmt = " in channels_last (model and inputs .to(memory_format=torch.channels_last))" \
            if memory_format == "channels_last" else ""
        return f"timed compiled: run it as torch.compile(model){fmt}"


register_runtime(Runtime)


def layout_words(memory_format: Optional[str]) -> str:
    return f", {'NCHW' if memory_format == 'contiguous' else memory_format}" if memory_format else ""


def get_runtime(name: Optional[str], **ort: Any) -> Runtime:
    """The runtime called ``name`` (``None``: eager), with the onnxruntime session options ``ort_*``."""
    name = name or "eager"
    if name not in _RUNTIMES and name in PROVIDED_BY:
        importlib.import_module(PROVIDED_BY[name])  # the route registers it on import
    if name not in _RUNTIMES:
        raise DsrewriteError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    return _RUNTIMES[name](**ort)


def compiled(model: nn.Module, n_args: int) -> Callable[..., Any]:
    """``torch.compile`` of ``model`` called through a one-node fx wrapper: the wrapper's generated ``forward``
    is a code object of its own, so compiling many modules of one class (layers timed one by one) never
    reaches Dynamo's per-code-object recompile limit and falls back to eager."""
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


def time_models(original: nn.Module, new: nn.Module, args: Sequence[Any], report: Any,
                memory_format: Optional[str] = None, runtime: Any = None,
                before: Optional[Callable[..., Any]] = None) -> None:
    """Time ``original`` and ``new`` side by side on ``args`` (eval mode, interleaved rounds; :func:`compare`)
    in ``runtime`` (a :class:`dsrewrite.timing.runtimes.Runtime`; eager by default) and fill the report's time fields,
    the noise of the ratio included. ``memory_format`` names the layout the caller put the models in
    (``"channels_last"``); by default it is read from the inputs' strides. ``before``: ``original`` already
    prepared for the runtime (compiled once, reused)."""
    runtime = runtime or get_runtime("eager")
    device = input_device(args)
    with eval_mode(original), eval_mode(new):
        after = runtime.prepare(new, args)
        if before is None:
            before = runtime.prepare(original, args)
        c = compare(before, after, args, device=device)
    report.time_before_ms, report.time_after_ms, report.time_noise = c.before_ms, c.after_ms, c.noise
    report.time_median_ratio = c.median_ratio
    note_disturbed(report, c)
    images = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
    if memory_format is None:
        cl = any(not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last) for a in images)
        memory_format = ("channels_last" if cl else "NCHW") if images else None
    elif memory_format == "contiguous":
        memory_format = "NCHW"
    report.time_runtime = runtime.label(memory_format)
    report.time_device = (("cpu" if device.type != "cuda" else "cuda") if not runtime.runs_torch
                          else torch.cuda.get_device_name(device) if device.type == "cuda"
                          else f"cpu ({torch.get_num_threads()} threads)")
    backends = {getattr(m, "backend", None) for m in new.modules() if hasattr(m, "rank") and hasattr(m, "pointwise")}
    backends.discard(None)
    report.time_backend = "backend=" + ",".join(sorted(backends)) if backends and runtime.runs_torch else None
