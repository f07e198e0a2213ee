"""Int8 with PyTorch's PT2E flow (export, ``prepare_pt2e``, calibrate, ``convert_pt2e``) and the X86 Inductor
quantizer, for a rewritten model or any other (issue 25).

The flow lives in ``torchao.quantization.pt2e`` (``pip install torchao``) since it left ``torch.ao.quantization``;
:func:`pt2e_api` finds it in either place. The model is captured with ``torch.export.export(..., strict=True)``:
the X86 Inductor quantizer finds its conv/linear patterns through the source metadata that strict (Dynamo)
export records, and on torch 2.14 with torchao 0.18 the default non-strict export makes it fail on a plain
torchvision ResNet ("Input partition has more than one output node").

A rewritten model's pairs are ordinary ``nn.Conv2d`` / ``nn.Linear`` modules, so the quantizer treats the
depthwise and pointwise convs (reductions and expansions) as it treats any conv: int8 weights per output channel,
uint8 activations per tensor. ``int8_friendly=True`` (:mod:`dsrewrite.plan.balance`) balances their ranges first.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import DsrewriteError, first_line

__all__ = ["pt2e_api", "quantize_pt2e"]


def pt2e_api() -> SimpleNamespace:
    """``prepare_pt2e``, ``convert_pt2e``, ``X86InductorQuantizer`` and ``default_config`` (the quantizer's default
    static config), from ``torchao.quantization.pt2e`` or, on older torch, ``torch.ao.quantization``; a one-line
    :class:`DsrewriteError` when neither has them."""
    try:
        # optional dependencies: PT2E lives in torchao (torch >= 2.10) or torch.ao (older torch)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        try:
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq
        except ImportError:
            raise DsrewriteError(f"PT2E quantization is in neither torchao nor torch {torch.__version__}'s "
                                 "torch.ao.quantization: pip install torchao") from None
    return SimpleNamespace(prepare_pt2e=prepare_pt2e, convert_pt2e=convert_pt2e,
                           X86InductorQuantizer=xiq.X86InductorQuantizer,
                           default_config=xiq.get_default_x86_inductor_quantization_config)


def _args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def quantize_pt2e(model: nn.Module, example_inputs: Any, calibration: Optional[Iterable[Any]] = None) -> nn.Module:
    """``model`` (in eval mode) quantized to int8 by PT2E with the X86 Inductor quantizer's default static config.

    Args:
        model: a model, e.g. ``dsrewrite.rewrite(...).model``; not changed.
        example_inputs: an input (a tensor, or a tuple of the positional arguments) to export with.
        calibration: batches (tensors or argument tuples) that set the activation ranges; default: the example.
            Their batch size may differ from the example's where the model allows it (exported with a free batch
            dimension).

    Returns the converted model (a ``torch.fx.GraphModule`` with quantize/dequantize ops): it runs as it is in
    eager mode, and ``torch.compile`` (Inductor) lowers it to int8 kernels on x86 CPUs.
    """
    api = pt2e_api()
    args = _args(example_inputs)
    batch = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
    try:  # the batch size left free where the model allows it, so calibration batches may have their own
        exported = torch.export.export(model.eval(), args, dynamic_shapes=batch, strict=True).module()
    except Exception as e:  # noqa: BLE001 - torch.export's own errors: one line
        raise DsrewriteError(f"torch.export cannot capture the model for PT2E ({first_line(e, 160, typed=True)})") from None
    quantizer = api.X86InductorQuantizer()
    quantizer.set_global(api.default_config())
    prepared = api.prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in (calibration if calibration is not None else [example_inputs]):
            prepared(*_args(batch))
    return api.convert_pt2e(prepared)
