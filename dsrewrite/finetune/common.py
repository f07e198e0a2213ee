"""Helpers shared by the fine-tuning modules (``distill``, ``params``, ``loop``): unwrapping DDP, moving and
splitting batches, reading logits from model outputs, the process group's rank."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import DsrewriteError

__all__ = ["unwrap", "to_device", "call_model", "split_batch", "default_output", "is_distributed", "rank",
           "OutputFn", "LayerWeights"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (names there lack the ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors in (nested) tuples, lists and dicts to ``device``; leave everything else alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a dict is passed as keyword args, a tuple as positional args."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def split_batch(batch: Any) -> Tuple[Any, Optional[Any]]:
    """Default ``(inputs, labels)`` of a loader batch: ``(x, y)`` pairs, dicts with ``labels``, bare inputs."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DsrewriteError(f"cannot split a batch of {len(batch)} items into (inputs, labels): pass batch_fn=")
    if isinstance(batch, dict):
        rest = dict(batch)
        labels = rest.pop("labels", rest.pop("label", None))
        return rest, labels
    return batch, None


def default_output(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, the first item of a tuple, ``logits`` of a dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out:
            return out["logits"]
        first = next(iter(out.values()), None) if len(out) == 1 else None
        if isinstance(first, torch.Tensor):
            return first
        raise DsrewriteError(f"model returns a dict with keys {sorted(out.keys())}: pass output=lambda out: ...")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DsrewriteError(f"cannot find logits in a model output of type {type(out).__name__}: pass output=")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (``torchrun``): then ``fit`` trains under DDP."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank in the process group (0 without one): only rank 0 shows progress."""
    return torch.distributed.get_rank() if is_distributed() else 0


OutputFn = Callable[[Any], torch.Tensor]
LayerWeights = Dict[str, float]
