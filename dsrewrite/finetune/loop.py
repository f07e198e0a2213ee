"""``fit``: a plain PyTorch distillation loop (progress bar, validation callback, AMP, DDP under torchrun)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..errors import DsrewriteError
from ._util import OutputFn, is_distributed, rank, split_batch, to_device, unwrap
from .distill import Distiller, LayersArg
from .params import TRAIN_CHOICES, param_groups, select_parameters

__all__ = ["fit", "History"]

Metrics = Union[None, float, Dict[str, float]]


@dataclass
class History:
    """What :func:`fit` did. ``losses``: this rank's loss per step; ``epochs``: one dict per epoch with the
    mean ``loss`` (averaged over ranks under DDP), the mean of each term, ``steps`` and the validation metrics."""

    losses: List[float] = field(default_factory=list)
    epochs: List[Dict[str, float]] = field(default_factory=list)
    steps: int = 0

    def metric(self, key: str) -> List[float]:
        """One entry of every epoch, e.g. ``history.metric("accuracy")``."""
        return [e[key] for e in self.epochs if key in e]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _amp_settings(device: torch.device, amp: Optional[bool], amp_dtype: Optional[torch.dtype]):
    """``(enabled, dtype)``: on by default on CUDA (bf16 where supported, else fp16), off on CPU (bf16 if asked)."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return False, None
    if amp_dtype is None:
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            amp_dtype = torch.bfloat16
    if device.type == "cpu" and amp_dtype != torch.bfloat16:
        raise DsrewriteError(f"CPU autocast runs in bfloat16 only, got amp_dtype={amp_dtype}")
    return True, amp_dtype


def _wrap_ddp(student: nn.Module, device: torch.device, train: Optional[str]) -> nn.Module:
    """Under an initialised process group, train through torch's DDP (wrapping the student if needed)."""
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(student, ddp):
        if train is not None:
            before = [p.requires_grad for p in student.module.parameters()]
            select_parameters(student, train)
            after = [p.requires_grad for p in student.module.parameters()]
            if before != after:
                for p, flag in zip(student.module.parameters(), before):
                    p.requires_grad_(flag)
                raise DsrewriteError(
                    f"the DDP-wrapped student trains other parameters than train={train!r}: call "
                    f"dsrewrite.finetune.select_parameters(model, {train!r}) before wrapping, or pass train=None")
        return student
    if train is not None:
        select_parameters(student, train)
    if is_distributed() and torch.distributed.get_world_size() > 1:
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return ddp(student, device_ids=ids)
    return student


def _reduce_mean(values: Dict[str, float], count: int, device: torch.device) -> Dict[str, float]:
    """Mean over all ranks' steps (sums and counts are all-reduced), the same number on every rank."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(count)], dtype=torch.float64,
                     device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t)
    n = max(t[-1].item(), 1.0)
    return {k: t[i].item() / n for i, k in enumerate(keys)}


def fit(student: nn.Module, teacher: nn.Module, loader: Any, *, epochs: Optional[int] = None,
        steps: Optional[int] = None, lr: float = 1e-3, layers: LayersArg = None,
        train: Optional[str] = "separable", optimizer: Optional[torch.optim.Optimizer] = None,
        depthwise_lr: Optional[float] = None, pointwise_lr: Optional[float] = None,
        rest_lr: Optional[float] = None, reduce_lr: Optional[float] = None, expand_lr: Optional[float] = None,
        weight_decay: float = 0.0, schedule: Optional[str] = "cosine",
        feature_weight: float = 1.0, logit_weight: float = 1.0, task_weight: float = 1.0,
        temperature: float = 4.0, task_loss: Optional[Callable[..., torch.Tensor]] = None,
        output: Optional[OutputFn] = None, batch_fn: Optional[Callable[[Any], Any]] = None,
        validate: Optional[Callable[[nn.Module], Metrics]] = None, device: Union[None, str, torch.device] = None,
        amp: Optional[bool] = None, amp_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None, progress: bool = True, desc: str = "fine-tuning") -> History:
    """Fine-tune ``student`` (the rewritten model) by distillation from ``teacher`` (the original).

    Args:
        student: trained in place; may already be wrapped in ``DistributedDataParallel``. Under an
            initialised process group (``torchrun``) an unwrapped student is wrapped in torch's DDP.
        teacher: frozen and run in eval mode; never changed.
        loader: an iterable of batches (``(inputs, labels)``, dicts with ``labels``, or bare inputs; see
            ``batch_fn``). Under DDP give it a ``DistributedSampler``: ``set_epoch`` is called every epoch.
        epochs / steps: how long (both: whichever ends first; neither: one epoch).
        lr: learning rate (AdamW); ``depthwise_lr`` / ``pointwise_lr`` (separable pairs), ``reduce_lr`` /
            ``expand_lr`` (low-rank pairs) / ``rest_lr`` override it per group.
        layers: layers for feature distillation (see :class:`Distiller`); default every pair, separable or low-rank.
        train: ``"separable"`` (only the new pairs, of both forms), ``"all"``, or ``None`` (keep ``requires_grad``
            as is).
        optimizer: your own optimiser (then lr, weight_decay and the group lrs are ignored).
        schedule: ``"cosine"`` (decay to 0 over the run, needs a known length) or ``None`` (constant).
        feature_weight / logit_weight / task_weight / temperature / task_loss / output: see :class:`Distiller`.
        batch_fn: ``batch -> (inputs, labels)``; inputs a tensor, a tuple (positional) or a dict (keywords).
        validate: called each epoch with the (unwrapped) student in eval mode; returns a float or a dict
            of metrics, stored in the epoch's history entry.
        device: where to train (student and teacher are moved there); default the student's device.
        amp: autocast; default on for CUDA (bf16, or fp16 with a grad scaler), off on CPU (``True``: bf16).
        max_grad_norm: clip the gradient norm.
        progress: show a tqdm bar (on rank 0 only).

    Returns:
        :class:`History`.
    """
    if train is not None and train not in TRAIN_CHOICES:
        raise DsrewriteError(f"train must be one of {', '.join(TRAIN_CHOICES)} or None, got {train!r}")
    for key, v in (("epochs", epochs), ("steps", steps)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DsrewriteError(f"{key} must be a positive int, got {v!r}")
    if schedule not in (None, "cosine"):
        raise DsrewriteError(f"schedule must be 'cosine' or None, got {schedule!r}")
    inner = unwrap(student)
    if device is not None:
        device = torch.device(device)
        inner.to(device)
        teacher.to(device)
    else:
        device = _device_of(inner)
        if _device_of(teacher) != device:
            raise DsrewriteError(f"teacher is on {_device_of(teacher)} but the student on {device}: pass device=")
    use_amp, dtype = _amp_settings(device, amp, amp_dtype)
    model = _wrap_ddp(student, device, train)
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(inner, lr, depthwise_lr=depthwise_lr, pointwise_lr=pointwise_lr,
                                                   rest_lr=rest_lr, reduce_lr=reduce_lr, expand_lr=expand_lr,
                                                   weight_decay=weight_decay))
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    if epochs is None and steps is None:
        epochs = 1
    total = min(x for x in (steps, epochs * per_epoch if epochs and per_epoch else None) if x) if (steps or per_epoch) else None
    if schedule == "cosine" and total is None:
        raise DsrewriteError("schedule='cosine' needs a loader with len() or steps=: pass schedule=None")
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and dtype == torch.float16)
    split = batch_fn or split_batch
    show = progress and rank() == 0
    n_epochs = epochs if epochs is not None else (math.ceil(steps / per_epoch) if per_epoch else None)
    flags = [(m, m.training) for m in inner.modules()]
    history = History()

    from tqdm.auto import tqdm

    distiller = Distiller(model, teacher, layers, feature_weight=feature_weight, logit_weight=logit_weight,
                          task_weight=task_weight, temperature=temperature, task_loss=task_loss, output=output)
    epoch = 0
    try:
        with distiller:
            while n_epochs is None or epoch < n_epochs:
                for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
                    if hasattr(obj, "set_epoch"):
                        obj.set_epoch(epoch)
                inner.train()
                sums: Dict[str, float] = {}
                count = 0
                left = total - history.steps if total is not None else None
                bar = tqdm(total=min(per_epoch, left) if per_epoch and left else (per_epoch or left),
                           desc=f"{desc} {epoch + 1}" + (f"/{n_epochs}" if n_epochs else ""), disable=not show,
                           leave=False, dynamic_ncols=True)
                for batch in loader:
                    inputs, labels = split(batch)
                    inputs, labels = to_device(inputs, device), to_device(labels, device)
                    with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                        out = distiller(inputs, labels)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(out.loss).backward()
                    if max_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                       max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    if sched is not None:
                        sched.step()
                    loss = out.loss.item()
                    if not math.isfinite(loss):
                        raise DsrewriteError(f"loss is {loss} at step {history.steps + 1}: lower lr or turn amp off")
                    history.losses.append(loss)
                    history.steps += 1
                    count += 1
                    sums["loss"] = sums.get("loss", 0.0) + loss
                    for k, v in out.parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if steps is not None and history.steps >= steps:
                        break
                bar.close()
                if count == 0 and not is_distributed():
                    raise DsrewriteError("the loader gave no batch")
                if is_distributed():
                    means = _reduce_mean(sums, count, device)
                else:
                    means = {k: v / count for k, v in sums.items()}
                entry: Dict[str, float] = {"epoch": epoch + 1, "steps": history.steps, **means}
                if validate is not None:
                    inner.eval()
                    with torch.no_grad():
                        m = validate(inner)
                    inner.train()
                    if isinstance(m, dict):
                        entry.update({k: float(v) for k, v in m.items()})
                    elif m is not None:
                        entry["metric"] = float(m)
                history.epochs.append(entry)
                if show:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("epoch", "steps"))
                    tqdm.write(f"{desc}: epoch {epoch + 1}: {shown}")
                epoch += 1
                if steps is not None and history.steps >= steps:
                    break
    finally:
        for m, flag in flags:
            m.training = flag
    return history
