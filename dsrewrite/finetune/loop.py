"""``fit``: a plain PyTorch distillation loop (progress bar, validation callback, AMP, DDP under torchrun).

Its options live in one frozen, validated :class:`FitConfig` (keyword arguments to :func:`fit` build one, as
keyword arguments to ``dsrewrite.rewrite`` build a ``RewriteConfig``); the loop is a set-up, then one
:func:`train_epoch` per epoch followed by validation and the epoch's history entry.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DsrewriteError
from .common import OutputFn, is_distributed, rank, split_batch, to_device, unwrap
from .distill import Distiller, LayersArg
from .params import TRAIN_CHOICES, param_groups, select_parameters

__all__ = ["fit", "FitConfig", "History"]

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
        """The history as plain lists and dicts (for JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class FitConfig:
    """Every option of :func:`fit` in one frozen object, checked once when built (one-line ``DsrewriteError``).

    Length: ``epochs`` / ``steps`` (both: whichever ends first; neither: one epoch).
    Optimiser: ``lr`` (AdamW); ``depthwise_lr`` / ``pointwise_lr`` (separable pairs), ``reduce_lr`` /
    ``expand_lr`` (low-rank pairs) / ``rest_lr`` override it per group; ``weight_decay``; ``optimizer``: your
    own (then ``lr``, ``weight_decay`` and the group lrs are ignored); ``schedule``: ``"cosine"`` (decay to 0
    over the run, needs a known length) or ``None`` (constant); ``max_grad_norm``: clip the gradient norm.
    What trains: ``train``: ``"separable"`` (only the new pairs, of both forms), ``"all"``, or ``None`` (keep
    ``requires_grad`` as is).
    Loss: ``layers`` (layers for feature distillation, default every pair), ``feature_weight`` /
    ``logit_weight`` / ``task_weight`` / ``temperature`` / ``task_loss`` / ``output``: see :class:`Distiller`.
    Data: ``batch_fn``: ``batch -> (inputs, labels)``; inputs a tensor, a tuple (positional) or a dict
    (keywords). ``validate``: called each epoch with the (unwrapped) student in eval mode; returns a float or
    a dict of metrics, stored in the epoch's history entry.
    Where: ``device`` (student and teacher are moved there; default the student's device); ``amp``: autocast,
    default on for CUDA (bf16, or fp16 with a grad scaler), off on CPU (``True``: bf16); ``amp_dtype``.
    Display: ``progress`` (a tqdm bar, on rank 0 only), ``desc`` (the bar's label).
    """

    epochs: Optional[int] = None
    steps: Optional[int] = None
    lr: float = 1e-3
    layers: LayersArg = None
    train: Optional[str] = "separable"
    optimizer: Optional[torch.optim.Optimizer] = None
    depthwise_lr: Optional[float] = None
    pointwise_lr: Optional[float] = None
    rest_lr: Optional[float] = None
    reduce_lr: Optional[float] = None
    expand_lr: Optional[float] = None
    weight_decay: float = 0.0
    schedule: Optional[str] = "cosine"
    feature_weight: float = 1.0
    logit_weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 4.0
    task_loss: Optional[Callable[..., torch.Tensor]] = None
    output: Optional[OutputFn] = None
    batch_fn: Optional[Callable[[Any], Any]] = None
    validate: Optional[Callable[[nn.Module], Metrics]] = None
    device: Union[None, str, torch.device] = None
    amp: Optional[bool] = None
    amp_dtype: Optional[torch.dtype] = None
    max_grad_norm: Optional[float] = None
    progress: bool = True
    desc: str = "fine-tuning"

    def __post_init__(self) -> None:
        if self.train is not None and self.train not in TRAIN_CHOICES:
            raise DsrewriteError(f"train must be one of {', '.join(TRAIN_CHOICES)} or None, got {self.train!r}")
        for key in ("epochs", "steps"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise DsrewriteError(f"{key} must be a positive int, got {v!r}")
        if self.schedule not in (None, "cosine"):
            raise DsrewriteError(f"schedule must be 'cosine' or None, got {self.schedule!r}")
        if self.temperature <= 0:  # the Distiller's check, before fit moves or wraps anything
            raise DsrewriteError(f"temperature must be > 0, got {self.temperature}")
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def build(cls, config: Optional["FitConfig"] = None, options: Optional[Mapping[str, Any]] = None) -> "FitConfig":
        """``config`` (or the defaults) with ``options`` (keyword arguments) on top: keywords win, as in
        ``dsrewrite.RewriteConfig.build``. Unknown names are refused by name, with the valid ones."""
        if config is not None and not isinstance(config, FitConfig):
            raise DsrewriteError(f"config must be a dsrewrite.finetune.FitConfig, got {type(config).__name__}")
        options = dict(options or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                raise DsrewriteError(f"unknown option {key!r} for fit (options: {', '.join(sorted(names))})")
        return dataclasses.replace(config, **options) if config is not None else cls(**options)


@dataclass
class _Run:
    """What :func:`fit` sets up once and every epoch uses: the models, the optimiser and the run's length."""

    cfg: FitConfig
    model: nn.Module  # what the distiller calls: the student or its DDP wrapper
    inner: nn.Module  # the unwrapped student (train/eval flags, validation)
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LambdaLR]
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: Optional[torch.dtype]
    per_epoch: Optional[int]  # batches per epoch, when the loader has len()
    total: Optional[int]  # optimiser steps of the whole run, when known
    n_epochs: Optional[int]
    show: bool  # progress shown (rank 0 only)

    def finished(self, history: History) -> bool:
        """Whether the run has taken its ``steps``."""
        return self.cfg.steps is not None and history.steps >= self.cfg.steps

    def step(self, distiller: Distiller, batch: Any, done: int) -> Tuple[float, Dict[str, float]]:
        """One optimiser step on one batch (``done`` steps before it): the loss and its terms."""
        inputs, labels = (self.cfg.batch_fn or split_batch)(batch)
        inputs, labels = to_device(inputs, self.device), to_device(labels, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            out = distiller(inputs, labels)
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        if self.cfg.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           self.cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise DsrewriteError(f"loss is {loss} at step {done + 1}: lower lr or turn amp off")
        return loss, {k: float(v) for k, v in out.parts.items()}

    def bar(self, epoch: int, done: int) -> tqdm:
        """The epoch's progress bar (disabled unless shown), as long as the epoch or what is left of the run."""
        left = self.total - done if self.total is not None else None
        per = self.per_epoch
        return tqdm(total=min(per, left) if per and left else (per or left),
                    desc=f"{self.cfg.desc} {epoch + 1}" + (f"/{self.n_epochs}" if self.n_epochs else ""),
                    disable=not self.show, leave=False, dynamic_ncols=True)

    def train_epoch(self, distiller: Distiller, loader: Any, epoch: int, history: History) -> Dict[str, float]:
        """One epoch of :func:`fit` (ending early at ``steps``): each step's loss goes into ``history``; returns the
        epoch's mean ``loss`` and terms (averaged over ranks under DDP)."""
        for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
                obj.set_epoch(epoch)
        self.inner.train()
        sums: Dict[str, float] = {}
        count = 0
        bar = self.bar(epoch, history.steps)
        try:
            for batch in loader:
                loss, parts = self.step(distiller, batch, history.steps)
                history.losses.append(loss)
                history.steps += 1
                count += 1
                for k, v in (("loss", loss), *parts.items()):
                    sums[k] = sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.finished(history):
                    break
        finally:
            bar.close()
        return _means(sums, count, self.device)


def _device_of(model: nn.Module) -> torch.device:
    """The device of the first parameter (CPU for a model without any)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _place(inner: nn.Module, teacher: nn.Module, device: Optional[torch.device]) -> torch.device:
    """Move student and teacher to ``device``; without one they must already share a device."""
    if device is not None:
        inner.to(device)
        teacher.to(device)
        return device
    device = _device_of(inner)
    if _device_of(teacher) != device:
        raise DsrewriteError(f"teacher is on {_device_of(teacher)} but the student on {device}: pass device=")
    return device


def _amp_settings(device: torch.device, amp: Optional[bool],
                  amp_dtype: Optional[torch.dtype]) -> Tuple[bool, Optional[torch.dtype]]:
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


def _length(cfg: FitConfig, loader: Any) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """``(batches per epoch, steps in the run, epochs)``, each ``None`` where the loader has no ``len()``."""
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    epochs = 1 if cfg.epochs is None and cfg.steps is None else cfg.epochs
    ends = [x for x in (cfg.steps, epochs * per_epoch if epochs and per_epoch else None) if x]
    total = min(ends) if ends else None
    n_epochs = epochs if epochs is not None else (math.ceil(cfg.steps / per_epoch) if per_epoch else None)
    return per_epoch, total, n_epochs


def _scheduler(optimizer: torch.optim.Optimizer, schedule: Optional[str],
               total: Optional[int]) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
    """Cosine decay to 0 over ``total`` steps, or ``None`` for a constant learning rate."""
    if schedule != "cosine":
        return None
    if total is None:
        raise DsrewriteError("schedule='cosine' needs a loader with len() or steps=: pass schedule=None")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))


def _setup(student: nn.Module, teacher: nn.Module, loader: Any, cfg: FitConfig) -> _Run:
    """Place the models, choose what trains (wrapping in DDP under a process group), build optimiser and schedule."""
    inner = unwrap(student)
    device = _place(inner, teacher, cfg.device)
    use_amp, dtype = _amp_settings(device, cfg.amp, cfg.amp_dtype)
    model = _wrap_ddp(student, device, cfg.train)
    optimizer = cfg.optimizer
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(
            inner, cfg.lr, depthwise_lr=cfg.depthwise_lr, pointwise_lr=cfg.pointwise_lr, rest_lr=cfg.rest_lr,
            reduce_lr=cfg.reduce_lr, expand_lr=cfg.expand_lr, weight_decay=cfg.weight_decay))
    per_epoch, total, n_epochs = _length(cfg, loader)
    return _Run(cfg=cfg, model=model, inner=inner, device=device, optimizer=optimizer,
                scheduler=_scheduler(optimizer, cfg.schedule, total),
                scaler=torch.amp.GradScaler(device.type, enabled=use_amp and dtype == torch.float16),
                use_amp=use_amp, amp_dtype=dtype, per_epoch=per_epoch, total=total, n_epochs=n_epochs,
                show=cfg.progress and rank() == 0)


def _reduce_mean(values: Dict[str, float], count: int, device: torch.device) -> Dict[str, float]:
    """Mean over all ranks' steps (sums and counts are all-reduced), the same number on every rank."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(count)], dtype=torch.float64,
                     device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t)
    n = max(t[-1].item(), 1.0)
    return {k: t[i].item() / n for i, k in enumerate(keys)}


def _means(sums: Dict[str, float], count: int, device: torch.device) -> Dict[str, float]:
    """The epoch's mean loss and terms: over this rank's steps, or over every rank's under DDP."""
    if is_distributed():
        return _reduce_mean(sums, count, device)
    if count == 0:
        raise DsrewriteError("the loader gave no batch")
    return {k: v / count for k, v in sums.items()}


def _validate(validate: Optional[Callable[[nn.Module], Metrics]], inner: nn.Module) -> Dict[str, float]:
    """The metrics of ``validate`` on the student in eval mode, without grad (``{}`` without a callback)."""
    if validate is None:
        return {}
    inner.eval()
    with torch.no_grad():
        m = validate(inner)
    inner.train()
    if isinstance(m, dict):
        return {k: float(v) for k, v in m.items()}
    return {} if m is None else {"metric": float(m)}


def fit(student: nn.Module, teacher: nn.Module, loader: Any, config: Optional[FitConfig] = None,
        **options: Any) -> History:
    """Fine-tune ``student`` (the rewritten model) by distillation from ``teacher`` (the original).

    Args:
        student: trained in place; may already be wrapped in ``DistributedDataParallel``. Under an
            initialised process group (``torchrun``) an unwrapped student is wrapped in torch's DDP.
        teacher: frozen and run in eval mode; never changed.
        loader: an iterable of batches (``(inputs, labels)``, dicts with ``labels``, or bare inputs; see
            ``batch_fn``). Under DDP give it a ``DistributedSampler``: ``set_epoch`` is called every epoch.
        config: a :class:`FitConfig` (default: its defaults).
        **options: any :class:`FitConfig` field (``epochs``, ``steps``, ``lr``, ``train``, ``layers``,
            ``validate``, ``device``, ``amp``, ...), applied on top of ``config`` (keywords win).

    Returns:
        :class:`History`.
    """
    cfg = FitConfig.build(config, options)
    run = _setup(student, teacher, loader, cfg)
    flags = [(m, m.training) for m in run.inner.modules()]
    history = History()
    distiller = Distiller(run.model, teacher, cfg.layers, feature_weight=cfg.feature_weight,
                          logit_weight=cfg.logit_weight, task_weight=cfg.task_weight, temperature=cfg.temperature,
                          task_loss=cfg.task_loss, output=cfg.output)
    epoch = 0
    try:
        with distiller:
            while (run.n_epochs is None or epoch < run.n_epochs) and not run.finished(history):
                means = run.train_epoch(distiller, loader, epoch, history)
                entry: Dict[str, float] = {"epoch": epoch + 1, "steps": history.steps, **means,
                                           **_validate(cfg.validate, run.inner)}
                history.epochs.append(entry)
                if run.show:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("epoch", "steps"))
                    tqdm.write(f"{cfg.desc}: epoch {epoch + 1}: {shown}")
                epoch += 1
    finally:
        for m, flag in flags:
            m.training = flag
    return history
