"""ONNX backend: write each decided conv as a depthwise ``Conv`` followed by a 1x1 ``Conv`` (onnx-graphsurgeon).

The depthwise conv (``group=Cin``, ``Cin*r`` outputs) keeps the original's ``strides``, ``dilations``,
``pads`` / ``auto_pad`` and ``kernel_shape``, so it does all the padding and the output has the original
spatial size; the pointwise conv has no padding and carries the bias. Names derive from the original:
node ``<name>_depthwise`` / ``<name>_pointwise``, weights ``<weight>.depthwise`` / ``<weight>.pointwise``.
The pointwise conv writes the original output tensor, so consumers and graph outputs are untouched.
Ragged ranks (one filter per ``channel_index`` entry) add a ``Gather`` on the channel axis before a
depthwise conv with ``group`` = filters (node ``<name>_gather``, indices ``<weight>.channel_index``).
"""
from __future__ import annotations

from typing import Dict, List, Set, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..pipeline import Decision

__all__ = ["apply_decisions"]


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


class _Names:
    """Unique tensor and node names: the derived name, or with ``_2``, ``_3`` ... if it is taken."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken: Set[str] = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}

    def __call__(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.taken:
            i += 1
            candidate = f"{name}_{i}"
        self.taken.add(candidate)
        return candidate


def apply_decisions(graph: gs.Graph, decisions: List[Decision]) -> int:
    """Replace every rewritten decision's node in ``graph``; returns how many convs were replaced.

    Call ``graph.cleanup().toposort()`` afterwards (the original nodes and weights become dangling).
    """
    names = _Names(graph)
    weights: Dict[Tuple[str, int], tuple] = {}  # shared weights: one pair (and index) per rank
    done = 0
    for d in decisions:
        if not d.rewritten:
            continue
        h, f = d.site.handle, d.factors
        node = h.node
        x, y = node.inputs[0], node.outputs[0]
        dims = len(d.site.spec.kernel)
        cin = d.site.spec.in_channels
        key = (h.weight_key, f.rank)
        if key not in weights:
            dw = _numpy(f.depthwise)
            pw = _numpy(f.pointwise)
            index = None if f.channel_index is None else gs.Constant(
                names(f"{h.weight.name}.channel_index"), _numpy(f.channel_index).astype(np.int64))
            weights[key] = (gs.Constant(names(f"{h.weight.name}.depthwise"), dw),
                            gs.Constant(names(f"{h.weight.name}.pointwise"), pw), index)
        dw_w, pw_w, index = weights[key]
        base = d.site.spec.name  # the node name (or OpType_index for an unnamed node), as in the report
        mid = gs.Variable(names(f"{base}_depthwise_output_0"), dtype=dw_w.values.dtype)
        dw_attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        dw_attrs["group"] = cin if index is None else int(index.values.shape[0])
        pw_attrs = {"kernel_shape": [1] * dims}
        bias = [h.bias] if h.bias is not None else []
        node.inputs.clear()
        node.outputs.clear()
        if index is not None:
            gathered = gs.Variable(names(f"{base}_gather_output_0"), dtype=x.dtype)
            graph.nodes.append(gs.Node("Gather", names(f"{base}_gather"), attrs={"axis": 1}, inputs=[x, index],
                                       outputs=[gathered]))
            x = gathered
        graph.nodes.append(gs.Node("Conv", names(f"{base}_depthwise"), attrs=dw_attrs, inputs=[x, dw_w],
                                   outputs=[mid]))
        graph.nodes.append(gs.Node("Conv", names(f"{base}_pointwise"), attrs=pw_attrs, inputs=[mid, pw_w] + bias,
                                   outputs=[y]))
        done += 1
    return done
