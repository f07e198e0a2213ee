"""The built-in end-to-end demo behind ``dsrewrite demo``: train, rewrite to half the FLOPs, fine-tune back.

The default model is a small CNN on scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no
download). ``run_demo("resnet18")`` (any torchvision name) instead rewrites that model with random weights
and prints the report (no data to fine-tune on).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .api import rewrite
from .errors import DsrewriteError
from .finetune import fit
from .timing.layers import to_format
from .timing.runtimes import time_models

__all__ = ["DigitsCNN", "load_digits_data", "train_classifier", "accuracy", "rank_for_flops", "run_digits",
           "run_demo"]

Data = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks (32, 64, 128 channels) and a linear classifier, for 1x8x8 inputs."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def load_digits_data(seed: int = 0, test_fraction: float = 0.2) -> Data:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``: ``[N, 1, 8, 8]`` in [0, 1], stratified split."""
    # optional dependency (scikit-learn, the demo extra): only the digits data needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    i_train, i_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed, stratify=d.target)
    return x[i_train], y[i_train], x[i_test], y[i_test]


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, seed: int = 0, shuffle: bool = True):
    """A ``DataLoader`` over tensors with a seeded shuffle."""
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    try:
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()
    finally:
        model.train(was)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 20, lr: float = 3e-3,
                     batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Plain cross-entropy training with AdamW and a cosine schedule (the 'original' model of the demo)."""
    dl = loader(x, y, batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(dl))
    model.train()
    for _ in range(epochs):
        for xb, yb in dl:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    return model.eval()


def rank_for_flops(model: nn.Module, example: torch.Tensor, target: float = 0.5, max_rank: int = 16) -> Tuple[int, Any]:
    """The uniform rank whose rewrite keeps the conv FLOPs closest to ``target`` of the original's.

    Returns ``(rank, RewriteResult)``. The ratio counts conv layers only (the per-layer report entries).
    """
    best = None
    for r in range(1, max_rank + 1):
        res = rewrite(model, example, rank=r, measure_time=False)
        ratio = conv_flops_ratio(res.report)
        if best is None or abs(ratio - target) < abs(best[2] - target):
            best = (r, res, ratio)
        if ratio > target:
            break
    return best[0], best[1]


def conv_flops_ratio(report: Any) -> float:
    """Conv FLOPs after / before, summed over every conv in the report (rewritten or not)."""
    before = sum(L.flops_before for L in report.layers)
    after = sum(L.flops_after for L in report.layers)
    return after / before if before else 1.0


def run_digits(seed: int = 0, *, quick: bool = False, pretrain_epochs: Optional[int] = None,
               finetune_epochs: Optional[int] = None, target: float = 0.5, lr: float = 2e-3,
               train: str = "all", log: Callable[[str], None] = print, progress: bool = True,
               latency: Optional[float] = None) -> Dict[str, Any]:
    """Train the digits CNN, rewrite it to ``target`` of its conv FLOPs, fine-tune by distillation.

    ``latency`` (the demo's recommended path): instead of a uniform rank, plan for at most that fraction of the
    model's measured time on the whole test set (``target_latency``, checked on the whole model), with ranks and
    factors from calibration on training images. A target this machine does not reach keeps the fastest plan
    measured faster than the original (best effort, with a note); only when no plan beats the original (twice:
    a busy machine can spoil one measurement) does it fall back to ``target`` of the FLOPs, saying so.

    Returns a dict with the accuracies (``before``, ``rewritten``, ``finetuned``), the ``rank`` (``None`` when
    ranks differ per layer), the achieved ``conv_flops_ratio`` and ``flops_ratio`` (whole model), the ``report``,
    ``history``, the fine-tuned model's ``time_ratio`` (when measured) and timings.
    """
    torch.manual_seed(seed)
    pretrain_epochs = pretrain_epochs if pretrain_epochs is not None else (3 if quick else 30)
    finetune_epochs = finetune_epochs if finetune_epochs is not None else (1 if quick else 10)
    x_tr, y_tr, x_te, y_te = load_digits_data(seed)
    t0 = time.perf_counter()
    log(f"[seed {seed}] training the digits CNN on {len(y_tr)} images for {pretrain_epochs} epochs ...")
    teacher = train_classifier(DigitsCNN(), x_tr, y_tr, epochs=pretrain_epochs, seed=seed)
    acc_before = accuracy(teacher, x_te, y_te)
    log(f"[seed {seed}] test accuracy of the original model: {acc_before:.2f}%")

    res = None
    if latency is not None:
        log(f"[seed {seed}] rewriting for {latency:g}x of the measured time on the {len(y_te)} test images, "
            f"calibrated on {min(512, len(y_tr))} training images ...")
        for attempt in (1, 2):
            try:
                res = rewrite(teacher, x_te, target_latency=latency, calibration=x_tr[:512])
                rank = None
                break
            except DsrewriteError as e:
                again = "measuring again" if attempt == 1 else (
                    f"falling back to {target:g} of the conv FLOPs, which is not faster on this machine now")
                log(f"[seed {seed}] {e}: {again}")
        if res is not None and res.report.notes and "NOT MET" in res.report.notes[0]:
            log(f"[seed {seed}] {res.report.notes[0]}")
    if res is None:
        rank, res = rank_for_flops(teacher, x_te[:1], target)
    student, report = res.model, res.report
    ratio = conv_flops_ratio(report)
    acc_rewritten = accuracy(student, x_te, y_te)
    ranks = f"rank {rank}" if rank is not None else "ranks " + "/".join(str(L.rank) for L in report.rewritten)
    log(f"[seed {seed}] rewritten at {ranks}: conv FLOPs kept {100 * ratio:.1f}% "
        f"(whole model {100 * report.flops_ratio:.1f}%), test accuracy {acc_rewritten:.2f}%")

    log(f"[seed {seed}] fine-tuning by distillation for {finetune_epochs} epoch(s) ...")
    history = fit(student, teacher, loader(x_tr, y_tr, 64, seed + 1), epochs=finetune_epochs, lr=lr,
                  layers=report, train=train, progress=progress,
                  validate=lambda m: {"test_accuracy": accuracy(m, x_te, y_te)})
    acc_finetuned = accuracy(student, x_te, y_te)
    log(f"[seed {seed}] test accuracy: original {acc_before:.2f}%, after rewrite {acc_rewritten:.2f}%, "
        f"after fine-tuning {acc_finetuned:.2f}% ({acc_finetuned - acc_before:+.2f} points)")
    if not quick:  # time next to FLOPs: the original and the fine-tuned model on the whole test set
        fmt = "channels_last" if "channels_last" in (report.time_runtime or "") else None  # as planned
        m0, args = to_format(teacher, (x_te,), fmt or "contiguous")
        m1, _ = to_format(student, (x_te,), fmt or "contiguous")
        time_models(m0, m1, args, report, memory_format=fmt)
    return {
        "seed": seed, "rank": rank, "conv_flops_ratio": ratio, "flops_ratio": report.flops_ratio,
        "time_ratio": report.time_ratio,
        "before": acc_before, "rewritten": acc_rewritten, "finetuned": acc_finetuned,
        "finetune_epochs": finetune_epochs, "pretrain_epochs": pretrain_epochs, "report": report,
        "history": history, "student": student, "teacher": teacher, "seconds": time.perf_counter() - t0,
    }


def run_demo(model_name: str = "digits", quick: bool = False) -> int:
    """``dsrewrite demo``: the digits pipeline (default) or a torchvision model's report. Returns an exit code."""
    if model_name == "digits":
        out = run_digits(0, quick=quick, latency=None if quick else 0.6)
        print()
        print(out["report"].table())
        print()
        time = (f" and {out['time_ratio']:.2f}x the original's measured time (the fine-tuned model, side by side)"
                if out.get("time_ratio") is not None else "")
        print(f"accuracy: original {out['before']:.2f}% -> rewritten {out['rewritten']:.2f}% -> "
              f"fine-tuned {out['finetuned']:.2f}% at {100 * out['conv_flops_ratio']:.1f}% of the conv FLOPs{time} "
              f"({out['seconds']:.0f} s)")
        return 0
    try:
        import torchvision  # optional dependency (the demo and vision extras): only a torchvision model needs it
    except ImportError:
        raise DsrewriteError("torchvision is not installed (pip install torchvision)") from None
    if model_name not in torchvision.models.list_models():
        raise DsrewriteError(f"unknown demo model {model_name!r}: 'digits' or a torchvision model name")

    size = 64 if quick else 224
    print(f"building torchvision {model_name} (weights=None) and rewriting it at 1x3x{size}x{size} ...", flush=True)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    res = rewrite(model, torch.randn(1, 3, size, size), progress=True, measure_time=not quick, name=model_name)
    print(res.report.table())
    print("note: random weights and no data, so no fine-tuning here (see examples/digits.py for the full pipeline)")
    return 0
