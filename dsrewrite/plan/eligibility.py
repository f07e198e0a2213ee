"""Which convolutions the pass can rewrite: a reason string for each one it cannot, ``None`` otherwise."""
from __future__ import annotations

from typing import Optional, Sequence

from ..ir import KINDS, LINEAR, ConvSpec

__all__ = ["why_not"]

_WHAT = {"kxk": "KxK conv", "pointwise": "1x1 conv", "linear": "linear layer"}


def why_not(spec: ConvSpec, kinds: Sequence[str] = KINDS) -> Optional[str]:
    """Return why ``spec`` cannot become a pair (separable for a KxK conv, low rank for a 1x1 conv or linear
    layer), or ``None`` if it can. ``kinds``: the layer kinds chosen (``kinds=``)."""
    if spec.kind == LINEAR:
        if spec.extra.get("unsupported"):
            return str(spec.extra["unsupported"])
        return None if LINEAR in kinds else _not_chosen(spec, kinds)
    if spec.transposed:
        return "transposed convolution is not rewritten"
    if spec.spatial_dims not in (1, 2):
        return f"{spec.spatial_dims}-D convolution is not supported (1-D and 2-D only)"
    if spec.groups != 1:
        if spec.groups == spec.in_channels:
            return f"already depthwise (groups={spec.groups})"
        return f"grouped convolution (groups={spec.groups}) is not rewritten"
    if spec.extra.get("unsupported"):
        return str(spec.extra["unsupported"])
    return None if spec.kind in kinds else _not_chosen(spec, kinds)


def _not_chosen(spec: ConvSpec, kinds: Sequence[str]) -> str:
    return (f"{_WHAT[spec.kind]}: kind {spec.kind!r} not chosen (kinds={','.join(kinds)}; "
            f"kinds='all' rewrites it as a low-rank pair)" if spec.lowrank else
            f"{_WHAT[spec.kind]}: kind {spec.kind!r} not chosen (kinds={','.join(kinds)})")
