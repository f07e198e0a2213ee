"""Rewritten ONNX models through onnxruntime's quantizer as they are (issue 25): static (QDQ and QOperator,
per-channel and per-tensor) and dynamic quantization load and run, and stay close to the float original.

Below opset 13 the rewrite raises the opset when onnx.version_converter converts the model with the same
outputs, otherwise it stores its weights as Constant nodes; both are checked here, each against the original
model in onnxruntime (an exact rewrite, ``rank="full"``) or the float model (int8, with a stated tolerance)."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests._ort import rel, run  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402
from dsrewrite.onnx import rewrite  # noqa: E402
from dsrewrite.onnx.quantize import QUANT_OPSET, quantize_dynamic, quantize_static  # noqa: E402

TOL = 1e-4  # an exact rewrite in float32 against the original
INT8_TOL = 0.1  # int8 output against the float model's (relative Frobenius; measured about 0.01-0.03)
SEED = int.from_bytes(os.urandom(4), "little")
RNG = np.random.default_rng(SEED)
print(f"random seed: {SEED}")
SHAPE = (2, 4, 10, 10)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def net(opset: int, *, constants: bool = False, symbolic: bool = False, function: bool = False) -> onnx.ModelProto:
    """3x3 Conv -> Relu -> 3x3 Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm; weights as initializers (or
    ``Constant`` nodes); ``symbolic``: N, H, W symbolic; ``function``: the first Relu is a model-local function."""
    w = {"w1": f32(8, 4, 3, 3) * 0.3, "b1": f32(8) * 0.1, "w2": f32(12, 8, 3, 3) * 0.2, "b2": f32(12) * 0.1,
         "fc": f32(5, 12), "fcb": f32(5)}
    relu1 = (helper.make_node("MyRelu", ["h1"], ["r1"], domain="local") if function
             else helper.make_node("Relu", ["h1"], ["r1"]))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             relu1,
             helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4,
                              strides=[2, 2]),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    if constants:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + nodes
        inits = []
    dims = ["n", 4, "h", "w"] if symbolic else list(SHAPE)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 5])], initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    functions = []
    if function:
        opsets.append(helper.make_opsetid("local", 1))
        functions = [helper.make_function("local", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                          [helper.make_opsetid("", opset)])]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8 if function else 7
    onnx.checker.check_model(model)
    return model


def feeds(n: int = 8):
    return [{"x": f32(*SHAPE)} for _ in range(n)]


def ort_quantize(src: onnx.ModelProto, tmp, how: str, per_channel: bool) -> str:
    """onnxruntime's own quantize_static / quantize_dynamic (no dsrewrite wrapper) on ``src`` as it is."""
    q = quantization
    path, dst = str(tmp / "src.onnx"), str(tmp / f"{how}_{per_channel}.onnx")
    onnx.save(src, path)
    if how == "dynamic":
        q.quantize_dynamic(path, dst, per_channel=per_channel, weight_type=q.QuantType.QInt8)
    else:
        data = iter(feeds())

        class Reader(q.CalibrationDataReader):
            def get_next(self):
                return next(data, None)

        fmt = q.QuantFormat.QDQ if how == "qdq" else q.QuantFormat.QOperator
        q.quantize_static(path, dst, Reader(), quant_format=fmt, per_channel=per_channel,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    return dst


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("old", [11, 12])
def test_below_opset_13_is_raised_with_a_note_and_stays_exact(old):
    src = net(old)
    new, report = rewrite(src, rank="full", measure_time=False)
    assert len(report.rewritten) == 2 and opset(new) == QUANT_OPSET and opset(src) == old
    assert any(n.startswith(f"opset raised from {old} to {QUANT_OPSET}") for n in report.notes), report.notes
    onnx.checker.check_model(new, full_check=True)
    x = {"x": f32(*SHAPE)}
    assert rel(run(new, x)[0], run(src, x)[0]) <= TOL


@pytest.mark.parametrize("old", [12, 17])
@pytest.mark.parametrize("how", ["qdq", "qoperator", "dynamic"])
def test_every_quantization_mode_takes_the_rewritten_model_as_it_is(old, how, tmp_path):
    src = net(old)
    new, _ = rewrite(src, rank=4, kinds="all", measure_time=False)
    x = {"x": f32(*SHAPE)}
    ref = run(new, x)[0]
    for per_channel in (True, False):
        q = ort_quantize(new, tmp_path, how, per_channel)
        out = run(q, x)[0]  # loads (a valid model) and runs
        assert rel(out, ref) <= INT8_TOL, (how, per_channel)
        ops = {n.op_type for n in onnx.load(q).graph.node}
        assert ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "DynamicQuantizeLinear", "MatMulInteger"}


def test_from_opset_13_nothing_changes_but_the_layers():
    src = net(15)
    new, report = rewrite(src, rank=2, measure_time=False)
    assert opset(new) == 15 and new.ir_version == src.ir_version
    assert not any("opset" in n for n in report.notes)
    assert {t.name for t in new.graph.initializer} >= {"w1.depthwise", "w1.pointwise"}


def test_a_model_the_converter_cannot_take_gets_its_new_weights_as_constants(tmp_path):
    src = net(12, function=True, constants=True)  # a model-local function: the version converter refuses it
    new, report = rewrite(src, rank="full", measure_time=False)
    assert opset(new) == 12
    (note,) = [n for n in report.notes if "opset" in n]
    assert note.startswith("opset 12 kept (the model has local functions") and "4 new weights are Constant" in note
    consts = {n.output[0] for n in new.graph.node if n.op_type == "Constant"}
    assert {"w1.depthwise", "w1.pointwise", "w2.depthwise", "w2.pointwise"} <= consts
    assert not {t.name for t in new.graph.initializer} & consts
    onnx.checker.check_model(new, full_check=True)
    x = {"x": f32(*SHAPE)}
    assert rel(run(new, x)[0], run(src, x)[0]) <= TOL
    ref = run(new, x)[0]
    # valid, as the original is: onnxruntime quantizes Constant weights per tensor, as activations
    assert rel(run(ort_quantize(new, tmp_path, "qdq", True), x)[0], ref) <= INT8_TOL
    assert rel(run(ort_quantize(src, tmp_path, "qdq", True), x)[0], run(src, x)[0]) <= INT8_TOL


def test_symbolic_shapes_are_checked_on_calibration_data_or_left_at_their_opset():
    src = net(12, constants=True, symbolic=True)  # as paddle2onnx writes PP-OCR: Constant weights, dynamic H, W
    plain, report = rewrite(src, rank=2, measure_time=False)
    assert opset(plain) == 12
    assert any("input shapes are not static" in n and "give input_shapes" in n for n in report.notes), report.notes
    calibrated, report = rewrite(src, rank=2, measure_time=False, calibration=np.concatenate([f["x"] for f in feeds(4)]))
    assert opset(calibrated) == QUANT_OPSET
    assert any(n.startswith("opset raised from 12 to 13") for n in report.notes), report.notes
    x = {"x": f32(3, 4, 14, 18)}
    for new in (plain, calibrated):
        run(new, x)  # any input size still runs
    given, report = rewrite(src, rank=2, measure_time=False, input_shapes={"x": [1, 4, 16, 16]})
    assert opset(given) == QUANT_OPSET


def test_the_wrappers_quantize_and_refuse_in_one_line(tmp_path):
    new, _ = rewrite(net(12), rank=3, measure_time=False)
    x = {"x": f32(*SHAPE)}
    ref = run(new, x)[0]
    for fmt in ("qdq", "qoperator"):
        out = quantize_static(new, str(tmp_path / f"{fmt}.onnx"), feeds(), fmt=fmt)
        assert rel(run(out, x)[0], ref) <= INT8_TOL
    assert rel(run(quantize_dynamic(new, str(tmp_path / "d.onnx")), x)[0], ref) <= INT8_TOL
    with pytest.raises(DsrewriteError, match="per-channel QDQ quantization needs opset 13 and this model has opset 12"):
        quantize_static(net(12), str(tmp_path / "bad.onnx"), feeds())  # onnxruntime would write an invalid model
    with pytest.raises(DsrewriteError, match="fmt must be one of qdq, qoperator"):
        quantize_static(new, str(tmp_path / "bad.onnx"), feeds(), fmt="int8")
    with pytest.raises(DsrewriteError, match="needs calibration feeds"):
        quantize_static(new, str(tmp_path / "bad.onnx"), [])


def depthwise_groups(model: onnx.ModelProto):
    """(group, filters) of every grouped Conv, with filters read from its weight initializer."""
    w = {t.name: t.dims for t in model.graph.initializer}
    return [(next(a.i for a in n.attribute if a.name == "group"), w[n.input[1]][0])
            for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def test_unit_multiplier_is_the_same_function_with_one_filter_per_channel():
    from dsrewrite.onnx.quantize import unit_multiplier

    src = net(17)
    new, _ = rewrite(src, rank=3, measure_time=False)
    assert depthwise_groups(new) == [(4, 12), (8, 24)]  # 3 filters per channel
    gathered = onnx.ModelProto()
    gathered.CopyFrom(new)
    assert unit_multiplier(gathered) == 2
    assert depthwise_groups(gathered) == [(12, 12), (24, 24)]
    assert [n.op_type for n in gathered.graph.node].count("Gather") == 2
    onnx.checker.check_model(gathered, full_check=True)
    x = {"x": f32(*SHAPE)}
    assert rel(run(gathered, x)[0], run(new, x)[0]) <= 1e-6
    assert unit_multiplier(gathered) == 0  # nothing left to rewrite
    again = onnx.ModelProto()
    again.CopyFrom(new)
    assert unit_multiplier(again, source=new) == 0  # only convs the source does not have


def test_int8_friendly_writes_the_gathered_form_and_says_so():
    src = net(17)
    new, report = rewrite(src, rank=3, measure_time=False, int8_friendly=True)
    assert depthwise_groups(new) == [(12, 12), (24, 24)]
    assert any(n.startswith("int8_friendly: 2 depthwise conv(s) with several filters per channel written as a Gather")
               for n in report.notes), report.notes
    x = {"x": f32(*SHAPE)}
    plain, _ = rewrite(src, rank=3, measure_time=False)
    assert rel(run(new, x)[0], run(plain, x)[0]) <= 1e-5
    one, report = rewrite(src, rank=1, measure_time=False, int8_friendly=True)  # one filter per channel already
    assert not any("Gather" in n for n in report.notes) and "Gather" not in {n.op_type for n in one.graph.node}
