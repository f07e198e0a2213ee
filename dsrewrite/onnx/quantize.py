"""Rewritten ONNX models that onnxruntime's quantizer takes as they are (issue 25).

onnxruntime's quantizer (``quantize_static`` / ``quantize_dynamic``) quantizes the weights it finds as
*initializers*; per channel (``per_channel=True``) it writes ``DequantizeLinear`` with an ``axis``, which exists
from opset 13 only. Before opset 13 it still does so, and writes an invalid model ("Unrecognized attribute: axis
for operator DequantizeLinear"). A rewrite adds its factors as initializers, so a model of opset 10-12 whose own
weights the quantizer skipped (``Constant`` nodes, as paddle2onnx writes them) would stop quantizing.

:func:`quantizable` is the rewrite's last step: for a model below opset 13 that gained initializers it raises the
default-domain opset to 13 with ``onnx.version_converter`` when that is safe (the converted model passes
``onnx.checker`` and gives the same outputs in onnxruntime on random inputs), and says so; otherwise it keeps
the opset and stores the new weights as ``Constant`` nodes, which the quantizer treats as it treats the
original's constant weights (quantized per tensor as activations, or left in float), and says that too.

A rank-``r`` pair's depthwise conv has ``r`` filters per input channel (``group=C``, ``C*r`` outputs). onnxruntime's
int8 ``QLinearConv`` runs that form several times slower than the float conv (its fast depthwise kernel takes one
filter per channel); :func:`unit_multiplier` writes it as a ``Gather`` of each channel ``r`` times and a depthwise
conv with one filter per channel, the same function (``int8_friendly=True`` does it to the rewrite's convs).

:func:`quantize_static` / :func:`quantize_dynamic` are thin wrappers that quantize such a model (or any) from
arrays, with the usual settings written down once and :func:`unit_multiplier` applied first.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import onnx
from onnx import helper

from ..errors import DsrewriteError, first_line
from . import measure as onnx_measure  # through the module: tests replace its session
from .backend import UniqueNames, opset_of
from .flops import attribute
from .scopes import DEFAULT_DOMAINS, constant_value, scopes, taken_names

__all__ = ["QUANT_OPSET", "quantizable", "raise_opset", "as_constant_nodes", "new_initializers",
           "unit_multiplier", "quantize_static", "quantize_dynamic"]

QUANT_OPSET = 13  # per-channel DequantizeLinear (its ``axis``) and per-channel QuantizeLinear need it
_MIN_IR = 7  # the IR version opset 13 needs
_TOL = 1e-4  # relative output difference a version conversion may cause (float rounding of reordered ops)


def new_initializers(source: onnx.ModelProto, new: onnx.ModelProto) -> Set[str]:
    """Names of the initializers of ``new`` (any graph) that ``source`` does not have: the rewrite's weights."""
    def names(m: onnx.ModelProto) -> Set[str]:
        return {t.name for s in scopes(m.graph) for t in s.graph.initializer}

    return names(new) - names(source)


def _outputs_equal(a: onnx.ModelProto, b: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                   feeds: Optional[Mapping[str, np.ndarray]] = None) -> Optional[str]:
    """``None`` when ``a`` and ``b`` give the same outputs in onnxruntime on ``feeds`` (default: a random input of
    ``shapes``), else why not."""
    if feeds is None:
        if not shapes or any(0 in s or any(d is None or d < 1 for d in s) for s in shapes.values()):
            return ("input shapes are not static, so the converted model could not be checked: give input_shapes "
                    "(--input-shape) or calibration data")
        feeds = onnx_measure.random_feeds(a, shapes, np.random.default_rng(0))
    try:
        ya = onnx_measure.session(a, once=True).run(None, feeds)
        yb = onnx_measure.session(b, once=True).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: said in the note
        return f"onnxruntime cannot run it to check ({first_line(e, 100)})"
    for u, v in zip(ya, yb):
        u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u64.shape != v64.shape:
            return "the converted model's outputs have other shapes"
        scale = max(float(np.linalg.norm(u64)), 1e-30)
        if not np.all(np.isfinite(u64) == np.isfinite(v64)) or \
                float(np.linalg.norm(np.nan_to_num(u64 - v64))) > _TOL * scale:
            return "the converted model's outputs differ"
    return None


def raise_opset(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], target: int = QUANT_OPSET,
                feeds: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[Optional[onnx.ModelProto], str]:
    """``model`` converted to default-domain opset ``target`` when that is safe, and a note; ``(None, why not)``
    otherwise. Safe: ``onnx.version_converter`` succeeds, the result passes ``onnx.checker`` and onnxruntime gives
    the same outputs for both on ``feeds`` (default: a random input of the static ``shapes``); ``model`` itself
    is not changed."""
    old = opset_of(model)
    if model.functions:
        return None, "the model has local functions, which the version converter does not convert"
    try:
        converted = onnx.version_converter.convert_version(model, target)
        if converted.ir_version < _MIN_IR:
            converted.ir_version = _MIN_IR
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter's and checker's own errors: said in the note
        return None, f"onnx.version_converter cannot convert it ({first_line(e, 120)})"
    why = _outputs_equal(model, converted, shapes, feeds)
    if why:
        return None, why
    return converted, (f"opset raised from {old} to {target} (onnx.version_converter; outputs checked equal in "
                       "onnxruntime) so that onnxruntime's per-channel quantization of the new weights is valid")


def as_constant_nodes(model: onnx.ModelProto, names: Iterable[str]) -> int:
    """Move the initializers ``names`` (in any graph) into ``Constant`` nodes at the head of their graph, in place
    (an initializer listed as a main-graph input, before IR 4, leaves the inputs too); returns how many moved."""
    wanted, moved = set(names), 0
    for s in scopes(model.graph):
        g = s.graph
        here = [t for t in g.initializer if t.name in wanted]
        if not here:
            continue
        gone = {t.name for t in here}
        consts = [helper.make_node("Constant", [], [t.name], name=f"{t.name}_constant", value=t) for t in here]
        kept_inits = [t for t in g.initializer if t.name not in gone]
        kept_inputs = [vi for vi in g.input if vi.name not in gone] if s.is_main else list(g.input)
        nodes = consts + list(g.node)
        for field, items in ((g.initializer, kept_inits), (g.input, kept_inputs), (g.node, nodes)):
            _refill(field, items)
        moved += len(here)
    return moved


def unit_multiplier(model: onnx.ModelProto, source: Optional[onnx.ModelProto] = None) -> int:
    """Write every depthwise ``Conv`` with ``m > 1`` filters per channel (``group=C``, weight ``[C*m, 1, ...]``, as a
    rank-``m`` pair's) as a ``Gather`` of each input channel ``m`` times, then a depthwise ``Conv`` with one filter
    per channel (``group=C*m``), in place; returns how many. ``source``: only the convs it does not have (by node
    name, in any graph: those a rewrite of ``source`` added). The same function, exactly (filter ``j`` reads channel
    ``j // m`` either way); why: onnxruntime's int8 ``QLinearConv`` has a fast depthwise kernel for one filter per
    channel only, and runs the other form several times slower than the float model (``benchmarks/int8.md``)."""
    all_scopes = scopes(model.graph)
    names = UniqueNames(taken_names(all_scopes))
    old = {n.name for sc in scopes(source.graph) for n in sc.graph.node} if source is not None else set()
    done = 0
    for sc in all_scopes:
        g = sc.graph
        new_nodes, changed = [], False
        for node in g.node:
            group = (int(attribute(node, "group", 1)) if node.op_type == "Conv" and node.domain in DEFAULT_DOMAINS
                     and node.name not in old else 1)
            w = constant_value(sc, node.input[1])[0] if group > 1 and len(node.input) > 1 else None
            if w is None or w.ndim < 3 or w.shape[1] != 1 or w.shape[0] % group or w.shape[0] == group:
                new_nodes.append(node)
                continue
            m = w.shape[0] // group
            base = node.name or node.output[0]
            index, gathered = names(f"{base}_channel_index"), names(f"{base}_gather_output_0")
            value = onnx.numpy_helper.from_array(np.repeat(np.arange(group, dtype=np.int64), m), index)
            conv = onnx.NodeProto()
            conv.CopyFrom(node)
            conv.input[0] = gathered
            for a in conv.attribute:
                if a.name == "group":
                    a.i = group * m
            new_nodes += [helper.make_node("Constant", [], [index], name=names(f"{base}_channel_index_constant"),
                                           value=value),
                          helper.make_node("Gather", [node.input[0], index], [gathered], name=names(f"{base}_gather"),
                                           axis=1),
                          conv]
            changed = True
            done += 1
        if changed:
            _refill(g.node, new_nodes)
    return done


def _refill(field, items: list) -> None:
    """Make the repeated message field ``field`` hold copies of ``items``, in order."""
    copies = [type(m)() for m in items]
    for c, m in zip(copies, items):
        c.CopyFrom(m)
    del field[:]
    field.extend(copies)


def quantizable(source: onnx.ModelProto, new: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                feeds: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[onnx.ModelProto, Optional[str]]:
    """The rewritten model ``new`` in a form onnxruntime's quantizer takes as it is, and the report's note.

    From opset 13, or with no new initializer, ``new`` is returned as it is (no note). Below, the opset is raised
    to 13 when :func:`raise_opset` finds it safe (checked on ``feeds``, e.g. a calibration feed, or on a random
    input of the static ``shapes``); otherwise the rewrite's weights become ``Constant`` nodes
    (:func:`as_constant_nodes`) and the note says why and what it means.
    """
    old = opset_of(new)
    added = new_initializers(source, new)
    if old >= QUANT_OPSET or not added:
        return new, None
    converted, note = raise_opset(new, shapes, feeds=feeds)
    if converted is not None:
        return converted, note
    as_constant_nodes(new, added)
    return new, (f"opset {old} kept ({note}): the {len(added)} new weights are Constant nodes, which onnxruntime's "
                 "quantizer quantizes per tensor as activations (as it does the original's constant weights); for "
                 f"per-channel int8 weights convert the model to opset {QUANT_OPSET} first")


# ------------------------------------------------------------------------------------------ quantizing
Feeds = Sequence[Mapping[str, np.ndarray]]


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of feeds (``rewind`` for a second pass)."""

    def __init__(self, feeds: Feeds) -> None:
        self.feeds, self.i = list(feeds), 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return dict(self.feeds[self.i - 1])

    def rewind(self) -> None:
        self.i = 0


def _ort_quantization():
    try:
        from onnxruntime import quantization  # optional dependency: only quantizing needs onnxruntime
    except ImportError:
        raise DsrewriteError("onnxruntime.quantization is not available: pip install onnxruntime") from None
    return quantization


def _prepared(model: Union[str, onnx.ModelProto], tmp: str, gather_depthwise: bool) -> str:
    """``model`` (a path or a ModelProto, not changed) saved in ``tmp`` for the quantizer, its depthwise convs with
    several filters per channel rewritten by :func:`unit_multiplier` when ``gather_depthwise``."""
    m = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    if gather_depthwise:
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        if unit_multiplier(copy):
            m = copy
    path = os.path.join(tmp, "model.onnx")
    onnx.save(m, path)
    return path


def quantize_static(model: Union[str, onnx.ModelProto], dst: str, feeds: Feeds, *, fmt: str = "qdq",
                    per_channel: bool = True, calibrate_method: str = "minmax", gather_depthwise: bool = True,
                    **kw: Any) -> str:
    """Int8 static quantization in onnxruntime (``quantize_static``): weights int8, activations uint8, ranges from
    ``feeds`` (a list of ``{input name: array}``); ``fmt`` ``"qdq"`` or ``"qoperator"``; ``calibrate_method``
    ``"minmax"``, ``"percentile"`` or ``"entropy"``; other keywords go to onnxruntime as they are. Returns
    ``dst``. ``gather_depthwise``: first write depthwise convs with several filters per channel in the form
    onnxruntime's int8 kernels run fast (:func:`unit_multiplier`; exact). A model below opset 13 with per-channel
    initializer weights is refused in one line (onnxruntime would write an invalid model): rewrite it with
    dsrewrite, which raises the opset, or convert it first."""
    q = _ort_quantization()
    formats = {"qdq": q.QuantFormat.QDQ, "qoperator": q.QuantFormat.QOperator}
    methods = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
               "entropy": q.CalibrationMethod.Entropy}
    if fmt not in formats:
        raise DsrewriteError(f"fmt must be one of {', '.join(formats)}, got {fmt!r}")
    if calibrate_method not in methods:
        raise DsrewriteError(f"calibrate_method must be one of {', '.join(methods)}, got {calibrate_method!r}")
    if not feeds:
        raise DsrewriteError("quantize_static needs calibration feeds: a list of {input name: array}")
    with tempfile.TemporaryDirectory() as tmp:
        path = _prepared(model, tmp, gather_depthwise)
        _refuse_invalid(path, per_channel and fmt == "qdq")
        opts = dict(quant_format=formats[fmt], per_channel=per_channel, activation_type=q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8, calibrate_method=methods[calibrate_method])
        opts.update(kw)
        q.quantize_static(path, dst, _Reader(feeds), **opts)
    return dst


def quantize_dynamic(model: Union[str, onnx.ModelProto], dst: str, *, per_channel: bool = False,
                     gather_depthwise: bool = True, **kw: Any) -> str:
    """Int8 dynamic quantization in onnxruntime (``quantize_dynamic``, int8 weights); returns ``dst``.
    ``gather_depthwise`` as for :func:`quantize_static`."""
    q = _ort_quantization()
    with tempfile.TemporaryDirectory() as tmp:
        path = _prepared(model, tmp, gather_depthwise)
        opts = dict(per_channel=per_channel, weight_type=q.QuantType.QInt8)
        opts.update(kw)
        q.quantize_dynamic(path, dst, **opts)
    return dst


def _refuse_invalid(path: str, per_channel_qdq: bool) -> None:
    """One line instead of the invalid model onnxruntime writes for per-channel QDQ below opset 13."""
    if not per_channel_qdq:
        return
    m = onnx.load(path, load_external_data=False)
    opset = opset_of(m)
    if opset < QUANT_OPSET and any(len(t.dims) > 1 for s in scopes(m.graph) for t in s.graph.initializer):
        raise DsrewriteError(f"per-channel QDQ quantization needs opset {QUANT_OPSET} and this model has opset "
                             f"{opset}: convert it (onnx.version_converter.convert_version(model, {QUANT_OPSET})), "
                             "or quantize with per_channel=False or fmt='qoperator'")
