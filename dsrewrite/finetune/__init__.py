"""Fine-tuning a rewritten model back to the original's accuracy.

* :class:`Distiller` — forward hooks pairing each rewritten layer with the original (feature MSE), logit
  KL at a temperature, and the task loss; attaches and detaches cleanly; the teacher stays frozen.
* :func:`select_parameters`, :func:`param_groups` — train only the new pairs (separable and low-rank), or
  everything.
* :func:`fit` — a plain PyTorch loop (tqdm, validation callback, AMP, DDP under ``torchrun``).
* :class:`FitConfig` — every option of :func:`fit` in one frozen, validated object: ``fit(s, t, loader,
  FitConfig(epochs=10, lr=2e-3))``; keyword arguments to ``fit`` build one (and override a given config).
* :func:`progressive` — rewrite and fine-tune in stages, deepest layers first.

See ``docs/finetune.md`` for use in your own loop, PyTorch Lightning and the Hugging Face Trainer.
"""
from .distill import DistillOutput, Distiller, kd_loss, layer_weights
from .loop import FitConfig, History, fit
from .params import pair_layers, param_groups, select_parameters, separable_layers
from .progressive import ProgressiveResult, plan_stages, progressive

__all__ = [
    "Distiller", "DistillOutput", "kd_loss", "layer_weights", "fit", "FitConfig", "History", "select_parameters",
    "param_groups", "separable_layers", "pair_layers", "progressive", "ProgressiveResult", "plan_stages",
]
