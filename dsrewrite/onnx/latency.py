"""Per-layer latency in onnxruntime: the ONNX route's layer timer for ``target_latency``.

The same contract as :class:`dsrewrite.timing.layers.LayerTimer` (``dense_ms(spec)``, ``separable_ms(spec, rank)``),
so the one allocator (:func:`dsrewrite.plan.allocate.allocate_budget` through :class:`dsrewrite.plan.cost_providers.LatencyCost`)
plans ONNX models by onnxruntime milliseconds: each conv shape is built as a one-node model (the dense
``Conv``) and a two-node model (the grouped depthwise ``Conv`` at a candidate rank, then the 1x1 ``Conv``),
with random weights, and timed in sessions made with the options the whole model is timed and deployed with.
A 1x1 conv's low-rank pair is two 1x1 ``Conv``s (the reduction carrying the stride, the expansion the bias), a
linear layer's is two ``Gemm``s (``transB=1``, weights ``[k, Cin]`` and ``[Cout, k]``) on an input
``[rows, Cin]``, its dense form one ``Gemm`` (what PyTorch's exporter writes for ``nn.Linear`` on a 2-D input):
the nodes the ONNX backend writes for them. Measurements are cached per kind, shape and session options in the process.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir import LINEAR, ConvSpec
from ..plan.cost_model import candidate_ranks
from ..timing.layers import cached_ms, layer_input
from ..timing.measure import time_side_by_side
from .backend import lowrank_nodes
from .measure import session

__all__ = ["OrtLayerTimer", "conv_model", "pair_model", "lowrank_model"]

_CACHE: Dict[Tuple, float] = {}
OPSET = 17  # the layer models' opset


def _attrs(spec: ConvSpec, pads) -> dict:
    return dict(kernel_shape=list(spec.kernel), strides=list(spec.stride), dilations=list(spec.dilation),
                pads=list(pads) * 2)


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def conv_model(spec: ConvSpec, rng: np.random.Generator) -> Tuple[onnx.ModelProto, Tuple[int, ...]]:
    """A one-``Conv`` model of the conv's shape (random weights) and its input shape; for a linear layer, one
    ``Gemm``."""
    shape, pads = layer_input(spec)
    if spec.kind == LINEAR:
        inits = [numpy_helper.from_array(_rand(rng, spec.out_channels, spec.in_channels), "w")]
        if spec.bias:
            inits.append(numpy_helper.from_array(_rand(rng, spec.out_channels), "b"))
        node = helper.make_node("Gemm", ["x", "w"] + (["b"] if spec.bias else []), ["y"], transB=1)
        return _model([node], inits, shape, spec), shape
    w = rng.standard_normal((spec.out_channels, spec.in_channels, *spec.kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if spec.bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(spec.out_channels).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], **_attrs(spec, pads))
    return _model([node], inits, shape, spec), shape


def pair_model(spec: ConvSpec, rank: int, rng: np.random.Generator) -> Tuple[onnx.ModelProto, Tuple[int, ...]]:
    """The separable pair the ONNX backend writes for the conv at ``rank``: a grouped depthwise ``Conv``
    (``rank`` filters per input channel) and a 1x1 ``Conv`` with the bias. A 1x1 conv or linear layer: its
    low-rank pair (:func:`lowrank_model`)."""
    if spec.lowrank:
        return lowrank_model(spec, rank, rng)
    shape, pads = layer_input(spec)
    c, m = spec.in_channels, spec.out_channels
    dw = rng.standard_normal((c * rank, 1, *spec.kernel)).astype(np.float32)
    pw = rng.standard_normal((m, c * rank, *([1] * len(spec.kernel)))).astype(np.float32)
    inits = [numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(pw, "pw")]
    pw_inputs = ["z", "pw"]
    if spec.bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b"))
        pw_inputs.append("b")
    nodes = [helper.make_node("Conv", ["x", "dw"], ["z"], group=c, **_attrs(spec, pads)),
             helper.make_node("Conv", pw_inputs, ["y"], kernel_shape=[1] * len(spec.kernel))]
    return _model(nodes, inits, shape, spec), shape


def lowrank_model(spec: ConvSpec, rank: int, rng: np.random.Generator) -> Tuple[onnx.ModelProto, Tuple[int, ...]]:
    """The low-rank pair the ONNX backend writes (:func:`~dsrewrite.onnx.backend.lowrank_nodes`) for the layer's
    one-node model at ``rank``: two 1x1 ``Conv``s (the reduction with the layer's strides) or two ``Gemm``s
    (``transB=1``), the bias on the second; random weights."""
    dense, shape = conv_model(spec, rng)
    ones = [1] * len(spec.kernel)
    inits = [numpy_helper.from_array(_rand(rng, rank, spec.in_channels, *ones), "r"),
             numpy_helper.from_array(_rand(rng, spec.out_channels, rank, *ones), "e")]
    inits += [i for i in dense.graph.initializer if i.name == "b"]
    nodes = lowrank_nodes(dense.graph.node[0], spec, "r", "e", "b" if spec.bias else None, lambda n: n, "layer",
                          opset=OPSET)
    return _model(nodes, inits, shape, spec), shape


def _model(nodes, inits, shape, spec: ConvSpec) -> onnx.ModelProto:
    out = [shape[0], spec.out_channels] if spec.kind == LINEAR else [spec.batch, spec.out_channels, *spec.out_spatial]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


class OrtLayerTimer:
    """Time convs and separable pairs of a :class:`~dsrewrite.ir.ConvSpec`'s shape in onnxruntime (CPU); 1x1
    convs and linear layers as themselves and as their low-rank pairs.

    Args:
        threads / optimization / provider: the session options (intra-op threads, graph optimisation level,
            execution provider; see :func:`dsrewrite.onnx.measure.session`), as the whole model is timed with.
        reps / max_seconds: repetitions and time budget per measurement (the fastest is kept).
    """

    memory_format = "NCHW (onnxruntime)"

    def __init__(self, threads: Optional[int] = None, reps: int = 7, max_seconds: float = 0.3,
                 optimization: str = "all", provider: str = "CPUExecutionProvider") -> None:
        self.threads, self.reps, self.max_seconds = threads, reps, max_seconds
        self.optimization, self.provider = optimization, provider
        self.measured = 0  # new measurements (cache misses)

    def _key(self, spec: ConvSpec, rank: Optional[int]) -> Tuple:
        return (rank, spec.kind, spec.in_channels, spec.out_channels, tuple(spec.kernel), tuple(spec.stride),
                tuple(spec.dilation), spec.bias, spec.batch, layer_input(spec)[0], self.threads,
                self.optimization, self.provider)

    def _measure_variants(self, spec: ConvSpec, variants) -> List[float]:
        """One call's time (ms) of the dense ``Conv`` / the pair at each ``(rank, _)`` variant, side by side."""
        rng = np.random.default_rng(0)
        runs, shape = [], None
        for rank, _ in variants:
            model, shape = conv_model(spec, rng) if rank is None else pair_model(spec, rank, rng)
            runs.append(session(model, self.threads, optimization=self.optimization, provider=self.provider,
                                 spinning=False).run)
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        return time_side_by_side(runs, (None, feeds), warmup=1, reps=self.reps,
                                 max_seconds=self.max_seconds * len(runs), min_reps=2)

    def _get(self, spec: ConvSpec, rank: Optional[int]) -> Optional[float]:
        variants = [(None, False)] + [(r, False) for r in candidate_ranks(spec)]
        return cached_ms(self, _CACHE, spec, (rank, False), variants, lambda v: self._key(spec, v[0]),
                         lambda vs: self._measure_variants(spec, vs))

    def dense_ms(self, spec: ConvSpec) -> Optional[float]:
        """Time of the original ``Conv`` over all its calls (``None`` when the output shape is unknown)."""
        return self._get(spec, None)

    def separable_ms(self, spec: ConvSpec, rank: int) -> Optional[float]:
        """Time of the depthwise + pointwise pair (the low-rank pair) at ``rank`` over all calls of the layer."""
        return self._get(spec, int(rank))

    def save(self) -> None:
        """Nothing to write: the cache lives in the process."""
