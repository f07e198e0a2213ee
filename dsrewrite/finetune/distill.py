"""Distillation from the original model (teacher) into the rewritten one (student).

Forward hooks pair each rewritten layer's output in the student with the output of the layer of the same
qualified name in the teacher (feature distillation, a weighted mean of per-layer MSEs); the logits are
matched by KL divergence at a temperature (scaled by T^2, Hinton et al.); the task loss is added when
labels are given. Hooks are removed on :meth:`Distiller.detach` (or leaving the ``with`` block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DsrewriteError
from .common import OutputFn, call_model, default_output, unwrap
from .params import pair_halves, pair_layers

__all__ = ["Distiller", "DistillOutput", "layer_weights", "kd_loss"]

LayersArg = Union[None, Iterable[str], Mapping[str, float], Any]


@dataclass
class DistillOutput:
    """``loss``: the total to back-propagate; ``parts``: its detached terms; ``output``: the student's output."""

    loss: torch.Tensor
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)
    output: Any = None


def layer_weights(layers: LayersArg, student: Optional[nn.Module] = None) -> Dict[str, float]:
    """Per-layer feature weights from a report, a ``RewriteResult``, names, or a ``{name: weight}`` mapping.

    ``None`` means every pair (separable or low-rank) found in ``student``.
    """
    report = getattr(layers, "report", layers)  # RewriteResult -> Report
    if report is not None and hasattr(report, "rewritten") and hasattr(report, "layers"):
        return {L.name: 1.0 for L in report.rewritten}
    if layers is None:
        if student is None:
            raise DsrewriteError("layers=None needs the student to find its pairs")
        return {name: 1.0 for name in pair_layers(student)}
    if isinstance(layers, str):
        return {layers: 1.0}
    if isinstance(layers, Mapping):
        out = {str(k): float(v) for k, v in layers.items()}
        if any(w < 0 for w in out.values()):
            raise DsrewriteError("layer weights must be >= 0")
        return out
    try:
        return {str(name): 1.0 for name in layers}
    except TypeError:
        raise DsrewriteError(f"layers must be a Report, names or a {{name: weight}} dict, got {type(layers).__name__}") from None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            dim: int = 1) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over classes (``dim``), averaged over the rest."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=dim)
    q = F.log_softmax(teacher_logits.float() / t, dim=dim)
    kl = (q.exp() * (q - s)).sum(dim=dim)
    return kl.mean() * (t * t)


def _find(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise DsrewriteError(f"{which} has no module named {name!r} (pair layers by their qualified names)") from None


class _Recorder:
    """Forward hooks on one layer: its output, once per call, even when a pair is called in parts.

    After a second rewrite the fx graph may call a pair's halves (``name.depthwise`` / ``name.pointwise``, or
    ``name.reduce`` / ``name.expand``) directly (the parent is no longer called), while an eager
    ``SeparableConv2d`` on the Triton backend calls neither child: so the hooks sit on the layer and on its
    second half, and a tensor already recorded is not repeated.
    """

    def __init__(self, module: nn.Module, detach: bool) -> None:
        self.outputs: List[torch.Tensor] = []
        self.detach = detach
        targets = [module]
        halves = pair_halves(module)
        if halves is not None:
            targets.append(halves[1][1])
        self.handles = [m.register_forward_hook(self._hook) for m in targets]

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if self.outputs and self.outputs[-1] is out:
            return
        self.outputs.append(out.detach() if self.detach else out)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.outputs = []


class Distiller:
    """Attach distillation hooks to a student/teacher pair and compute the combined loss.

    Args:
        student: the rewritten model (may be wrapped in ``DistributedDataParallel``).
        teacher: the original model; frozen (``requires_grad=False``) and in eval mode while attached,
            restored on detach, never changed.
        layers: which layers to pair: a ``Report``/``RewriteResult`` (its rewritten layers), names, or
            ``{name: weight}``; ``None``: every pair in the student (separable and low-rank). ``[]`` turns
            features off.
        feature_weight / logit_weight / task_weight: weights of the three terms (0 switches one off).
        temperature: softmax temperature of the logit term.
        task_loss: ``(logits, labels) -> loss``, used when labels are given (default cross-entropy).
        output: picks the logits from a model output (default: the tensor, ``out[0]`` or ``out["logits"]``).
        class_dim: the class dimension of the logits (1 for ``[N, C]`` and ``[N, C, H, W]``).

    Use as ``with Distiller(student, teacher, result) as d: d(x, y).loss.backward()``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: LayersArg = None, *,
                 feature_weight: float = 1.0, logit_weight: float = 1.0, task_weight: float = 1.0,
                 temperature: float = 4.0, task_loss: Optional[Callable[..., torch.Tensor]] = None,
                 output: Optional[OutputFn] = None, class_dim: int = 1) -> None:
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise DsrewriteError("student and teacher must be torch.nn.Module instances")
        inner = unwrap(student)
        if inner is unwrap(teacher):
            raise DsrewriteError("student and teacher are the same module: rewrite with inplace=False")
        shared = {id(p) for p in inner.parameters()} & {id(p) for p in teacher.parameters()}
        if shared:
            raise DsrewriteError(f"student and teacher share {len(shared)} parameter tensors: training would change the teacher")
        if temperature <= 0:
            raise DsrewriteError(f"temperature must be > 0, got {temperature}")
        self.student, self.teacher, self._inner = student, teacher, inner
        self.weights = layer_weights(layers, inner)
        for name in self.weights:  # fail early, with the name
            _find(inner, name, "student")
            _find(teacher, name, "teacher")
        self.feature_weight, self.logit_weight, self.task_weight = feature_weight, logit_weight, task_weight
        self.temperature, self.class_dim = temperature, class_dim
        self.task_loss = task_loss or F.cross_entropy
        self.output = output or default_output
        self._s: Dict[str, _Recorder] = {}
        self._t: Dict[str, _Recorder] = {}
        self._saved: Optional[tuple] = None

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return self._saved is not None

    @property
    def num_handles(self) -> int:
        """Hook handles currently registered by this distiller (0 once detached)."""
        return sum(len(r.handles) for r in (*self._s.values(), *self._t.values()))

    def attach(self) -> "Distiller":
        """Register the hooks, freeze the teacher and put it in eval mode."""
        if self.attached:
            return self
        self._saved = ([(p, p.requires_grad) for p in self.teacher.parameters()],
                       [(m, m.training) for m in self.teacher.modules()])
        self.teacher.eval().requires_grad_(False)
        if self.feature_weight:
            for name in self.weights:
                self._s[name] = _Recorder(_find(self._inner, name, "student"), detach=False)
                self._t[name] = _Recorder(_find(self.teacher, name, "teacher"), detach=True)
        return self

    def detach(self) -> None:
        """Remove every hook and restore the teacher's ``requires_grad`` and training flags."""
        for r in (*self._s.values(), *self._t.values()):
            r.remove()
        self._s, self._t = {}, {}
        if self._saved is not None:
            params, modes = self._saved
            for p, flag in params:
                p.requires_grad_(flag)
            for m, flag in modes:
                m.training = flag
            self._saved = None

    def __enter__(self) -> "Distiller":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __del__(self) -> None:  # a forgotten detach must not leave hooks behind
        try:
            self.detach()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def clear(self) -> None:
        """Drop recorded activations (call after an evaluation forward you do not distil)."""
        for r in (*self._s.values(), *self._t.values()):
            r.outputs = []

    # ------------------------------------------------------------------ the loss
    def teacher_forward(self, inputs: Any) -> Any:
        """Run the frozen teacher (no grad) and record its layer outputs."""
        if not self.attached:
            raise DsrewriteError("Distiller is not attached: use `with Distiller(...) as d:` or call attach()")
        if any(m.training for m in self.teacher.modules()):  # a framework called .train() on a parent
            self.teacher.eval()
        with torch.no_grad():
            return call_model(self.teacher, inputs)

    def __call__(self, inputs: Any, labels: Any = None) -> DistillOutput:
        """One distillation forward: teacher, then student, then :meth:`loss`. ``inputs``: tensor, tuple or dict."""
        self.clear()
        t_out = self.teacher_forward(inputs)
        s_out = call_model(self.student, inputs)
        return self.loss(s_out, t_out, labels)

    def feature_losses(self) -> Dict[str, torch.Tensor]:
        """MSE per paired layer from the activations recorded since the last :meth:`clear`."""
        out = {}
        for name, rec in self._s.items():
            s_list, t_list = rec.outputs, self._t[name].outputs
            if len(s_list) != len(t_list):
                raise DsrewriteError(f"layer {name!r} ran {len(s_list)} times in the student but {len(t_list)} in the teacher")
            if not s_list:
                raise DsrewriteError(f"layer {name!r} did not run in the forward (is it used by the model?)")
            terms = []
            for s, t in zip(s_list, t_list):
                if s.shape != t.shape:
                    raise DsrewriteError(f"layer {name!r}: student output {tuple(s.shape)} != teacher output {tuple(t.shape)}")
                terms.append(F.mse_loss(s.float(), t.float()))
            out[name] = torch.stack(terms).mean()
        return out

    def loss(self, student_out: Any, teacher_out: Any = None, labels: Any = None) -> DistillOutput:
        """Combine feature, logit and task terms for outputs already computed (hooks have recorded features)."""
        parts: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None

        def add(key: str, weight: float, value: torch.Tensor) -> None:
            nonlocal total
            parts[key] = value.detach()
            total = weight * value if total is None else total + weight * value

        if self.feature_weight and self._s:
            per_layer = self.feature_losses()
            wsum = sum(self.weights[n] for n in per_layer)
            if wsum > 0:
                feat = sum(self.weights[n] * v for n, v in per_layer.items()) / wsum
                add("feature", self.feature_weight, feat)
        s_logits = self.output(student_out) if (self.logit_weight or (self.task_weight and labels is not None)) else None
        if self.logit_weight and teacher_out is not None:
            add("logit", self.logit_weight, kd_loss(s_logits, self.output(teacher_out).detach(), self.temperature,
                                                    self.class_dim))
        if self.task_weight and labels is not None:
            add("task", self.task_weight, self.task_loss(s_logits.float(), labels))
        self.clear()
        if total is None:
            raise DsrewriteError("no loss term is active: give labels, a teacher output, or layers to distil")
        return DistillOutput(total, parts, student_out)
