"""ONNX route acceptance: torchvision models exported to ONNX, rewritten with dsrewrite.onnx, checked with
onnx.checker and onnxruntime against the original model and against the torch route."""
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

ort = pytest.importorskip("onnxruntime")

import dsrewrite  # noqa: E402
from dsrewrite.onnx import rewrite  # noqa: E402
from tests.conftest import derived_seed, np_rng  # noqa: E402

SHAPE = (1, 3, 64, 64)
MODELS = ["resnet18", "mobilenet_v2", "deeplabv3_mobilenet_v3_large"]
FULL_TOL = 1e-4  # relative L2 error at rank="full" (float32 factors of a float64 SVD)
ROUTE_TOL = 1e-5  # torch route exported vs ONNX route: same weights, same factorisation, two runtimes


def export(model: nn.Module, path: str) -> str:
    """TorchScript exporter (fast here, folds BN into Conv); the dynamo exporter where it is gone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (torch.randn(*SHAPE),), path, dynamo=False, opset_version=17)
        except Exception:  # noqa: BLE001 - a torch without the TorchScript exporter
            torch.onnx.export(model, (torch.randn(*SHAPE),), path, dynamo=True, external_data=False)
    return path


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics, so folded biases differ (no zeros the exporter would deduplicate)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.num_features, generator=g))
    return model


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """name -> (torch model, path of its ONNX export), exported once per test session."""
    folder = tmp_path_factory.mktemp("onnx_models")
    seed = derived_seed("exported")  # the same models whichever test builds them first
    out = {}
    for name in MODELS:
        kw = {"weights_backbone": None} if "deeplab" in name else {}
        torch.manual_seed(seed)
        model = randomise_bn(torchvision.models.get_model(name, weights=None, **kw), seed).eval()
        out[name] = (model, export(model, str(folder / f"{name}.onnx")))
    return out


def run(model, feeds):
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def image_feeds(path: str):
    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    name = [i.name for i in m.graph.input if i.name not in inits][0]
    return {name: np_rng().standard_normal(SHAPE).astype(np.float32)}


@pytest.mark.parametrize("name", MODELS)
def test_full_rank_matches_original(exported, name):
    _, path = exported[name]
    original = onnx.load(path)
    new, report = rewrite(path, rank="full")
    onnx.checker.check_model(new, full_check=True)
    assert report.rewritten, report.table()
    # the rule fired: every rewritten conv became a named depthwise + pointwise pair writing the old output
    n_conv = lambda m: sum(n.op_type == "Conv" for n in m.graph.node)  # noqa: E731
    assert n_conv(new) == n_conv(original) + len(report.rewritten)
    names = {n.name for n in new.graph.node}
    for layer in report.rewritten:
        assert {layer.name + "_depthwise", layer.name + "_pointwise"} <= names
        assert layer.name not in names
    assert [o.name for o in new.graph.output] == [o.name for o in original.graph.output]
    assert new.opset_import == original.opset_import and new.ir_version == original.ir_version
    # whole-graph count of the new model = original minus the cost model's per-layer savings
    saved = sum(L.flops_before - L.flops_after for L in report.rewritten)
    assert report.flops_after == report.flops_before - saved
    assert report.route == "onnx" and not report.flops_per_sample

    feeds = image_feeds(path)
    for got, ref in zip(run(new, feeds), run(path, feeds)):
        assert rel(got, ref) < FULL_TOL


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_rank2_totals_agree_with_torch_report(exported, name):
    model, path = exported[name]
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(path).graph.node}
    t = dsrewrite.rewrite(model, torch.randn(*SHAPE), rank=2, measure_time=False).report
    _, o = rewrite(path, rank=2)
    assert (o.flops_before, o.flops_after) == (t.flops_before, t.flops_after)
    # BN folded by the exporter: each BN's weight+bias (2C) became one conv bias (C)
    bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert o.params_before == t.params_before - bn
    assert o.params_after == t.params_after - bn
    assert len(o.rewritten) == len(t.rewritten) and len(o.skipped) == len(t.skipped)
    key = lambda L: (L.in_channels, L.out_channels, L.kernel, L.stride, L.rank, L.flops_before, L.flops_after)  # noqa: E731
    assert sorted(map(key, o.layers), key=str) == sorted(map(key, t.layers), key=str)


def test_torch_route_exported_equals_onnx_route(exported, tmp_path):
    from torch.fx.experimental.optimization import fuse

    model, _ = exported["resnet18"]
    fused = fuse(model)  # BN folded in torch too: both routes factorise the same conv weights
    original = export(fused, str(tmp_path / "fused.onnx"))
    torch_side = export(dsrewrite.rewrite(fused, torch.randn(*SHAPE), rank=2, measure_time=False).model,
                        str(tmp_path / "torch_rewritten.onnx"))
    onnx_side, _ = rewrite(original, rank=2)
    feeds = image_feeds(original)
    a, b, ref = run(torch_side, feeds)[0], run(onnx_side, feeds)[0], run(original, feeds)[0]
    assert rel(b, a) < ROUTE_TOL
    assert rel(b, ref) > 10 * ROUTE_TOL  # rank 2 really is an approximation: the comparison can fail


def test_readable_names_and_metadata(exported, tmp_path):
    _, path = exported["resnet18"]
    src = onnx.load(path)
    src.doc_string = "a model with metadata"
    src.producer_name, src.producer_version, src.model_version = "maker", "9.9", 7
    onnx.helper.set_model_props(src, {"author": "someone", "license": "MIT"})
    new, report = rewrite(src, rank=2, include="/layer1/*")
    assert {L.name for L in report.rewritten} == {f"/layer1/layer1.{b}/conv{c}/Conv" for b in (0, 1) for c in (1, 2)}
    assert all(L.reason == "not matched by include" for L in report.skipped if L.kind == "kxk")
    names = [n.name for n in new.graph.node]
    assert "/layer1/layer1.0/conv1/Conv_depthwise" in names and "/layer1/layer1.0/conv1/Conv_pointwise" in names
    dw = next(n for n in new.graph.node if n.name == "/layer1/layer1.0/conv1/Conv_depthwise")
    orig = next(n for n in src.graph.node if n.name == "/layer1/layer1.0/conv1/Conv")
    assert dw.input[1] == orig.input[1] + ".depthwise"
    assert dw.output[0] == "/layer1/layer1.0/conv1/Conv_depthwise_output_0"
    for field in ("doc_string", "producer_name", "producer_version", "model_version", "ir_version"):
        assert getattr(new, field) == getattr(src, field), field
    assert {p.key: p.value for p in new.metadata_props} == {"author": "someone", "license": "MIT"}
    # the caller's ModelProto is left alone
    assert sum(n.op_type == "Conv" for n in src.graph.node) == 20
    _, rep_ex = rewrite(src, rank=2, exclude=["/layer1/*", "/conv1/*"])
    assert len(rep_ex.rewritten) == 17 - 5


# ---------------------------------------------------------------- hand-built graphs: every kind of conv

def _f32(*shape):
    return np_rng().standard_normal(shape).astype(np.float32)


def zoo_model() -> onnx.ModelProto:
    """One graph with a conv of every kind the frontend meets, each on its own output."""
    inits, nodes, outputs = [], [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def conv(name, inputs, op="Conv", out_type=TensorProto.FLOAT, **attrs):
        nodes.append(helper.make_node(op, inputs, [name + "_out"], name=name, **attrs))
        outputs.append(helper.make_tensor_value_info(name + "_out", out_type, None))

    conv("plain", ["x", init("w_plain", _f32(5, 4, 3, 3)), init("b_plain", _f32(5))], pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(_f32(6, 4, 3, 3), "w_const_value")))
    conv("const_node", ["x", "w_const"])
    nodes.append(helper.make_node("Identity", [init("w_shared_init", _f32(5, 4, 2, 2))], ["w_ident"]))
    conv("identity", ["x", "w_ident"], strides=[2, 2])
    conv("shared_weight", ["x", "w_ident"], dilations=[2, 2])  # same constant: one factor pair per rank
    nodes.append(helper.make_node("Mul", [init("w_mul", _f32(5, 4, 3, 3)), init("s", _f32(1))], ["w_runtime"]))
    conv("runtime_weight", ["x", "w_runtime"])
    conv("input_weight", ["x", "w_in"])
    nodes.append(helper.make_node("Add", [init("b_a", _f32(5)), init("b_b", _f32(5))], ["b_runtime"]))
    conv("runtime_bias", ["x", init("w_rb", _f32(5, 4, 3, 3)), "b_runtime"], auto_pad="SAME_UPPER")
    conv("grouped", ["x", init("w_g", _f32(6, 2, 3, 3))], group=2)
    conv("depthwise", ["x", init("w_dw", _f32(8, 1, 3, 3))], group=4)
    conv("pointwise", ["x", init("w_pw", _f32(7, 4, 1, 1))])
    conv("conv3d", ["x3", init("w_3d", _f32(3, 2, 3, 3, 3))])
    conv("conv1d", ["x1", init("w_1d", _f32(5, 3, 4)), init("b_1d", _f32(5))], pads=[2, 1], strides=[2])
    conv("transposed", ["x", init("w_t", _f32(4, 3, 3, 3))], op="ConvTranspose", strides=[2, 2])
    # quantised: QuantizeLinear -> QLinearConv / ConvInteger
    scale, zp = init("scale", np.array(0.05, np.float32)), init("zp", np.array(128, np.uint8))
    nodes.append(helper.make_node("QuantizeLinear", ["x", scale, zp], ["xq"]))
    wq = init("wq", np_rng().integers(0, 255, (5, 4, 3, 3)).astype(np.uint8))
    conv("qlinear", ["xq", scale, zp, wq, scale, zp, scale, zp], op="QLinearConv", out_type=TensorProto.UINT8)
    conv("conv_integer", ["xq", wq], op="ConvInteger", out_type=TensorProto.INT32)
    graph = helper.make_graph(nodes, "zoo", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9]),
        helper.make_tensor_value_info("x3", TensorProto.FLOAT, [1, 2, 5, 5, 5]),
        helper.make_tensor_value_info("x1", TensorProto.FLOAT, [1, 3, 11]),
        helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [5, 4, 3, 3]),
    ], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)  # typed outputs, as exporters write them


def test_every_kind_of_conv_is_rewritten_or_skipped_with_reason():
    model = zoo_model()
    new, report = rewrite(model, rank="full")
    onnx.checker.check_model(new, full_check=True)
    reasons = {L.name: (L.reason if not L.rewritten else "rewritten") for L in report.layers}
    assert reasons == {
        "plain": "rewritten", "const_node": "rewritten", "identity": "rewritten", "shared_weight": "rewritten",
        "runtime_weight": "weight computed at run time (output of Mul node '')",
        "input_weight": "weight 'w_in' is a graph input, not a constant",
        "runtime_bias": "rewritten",
        "grouped": "grouped convolution (groups=2) is not rewritten",
        "depthwise": "already depthwise (groups=4)",
        "pointwise": "1x1 conv: kind 'pointwise' not chosen (kinds=kxk; kinds='all' rewrites it as a low-rank pair)",
        "conv3d": "3-D convolution is not supported (1-D and 2-D only)",
        "conv1d": "rewritten",
        "transposed": "transposed convolution is not rewritten",
        "qlinear": "quantised convolution (QLinearConv) is not rewritten",
        "conv_integer": "quantised convolution (ConvInteger) is not rewritten",
    }
    assert "bias computed at run time" in report.layer("runtime_bias").note
    inits = {t.name for t in new.graph.initializer}
    # shared constant: one depthwise/pointwise pair serves both convs
    assert "w_ident.depthwise" in inits and "w_ident.depthwise_2" not in inits
    assert report.flops_per_sample and any("per sample" in n for n in report.notes)

    feeds = {"x": _f32(3, 4, 9, 9), "x3": _f32(1, 2, 5, 5, 5), "x1": _f32(1, 3, 11), "w_in": _f32(5, 4, 3, 3)}
    names = [o.name for o in model.graph.output]
    for name, got, ref in zip(names, run(new, feeds), run(model, feeds)):
        assert got.shape == ref.shape, name
        if ref.dtype == np.float32:
            assert rel(got, ref) < FULL_TOL, name
        else:
            assert np.array_equal(got, ref), name


def test_external_data_roundtrip(tmp_path):
    model = zoo_model()
    src = str(tmp_path / "ext.onnx")
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    dst = str(tmp_path / "out" / "ext_ds.onnx")
    os.makedirs(os.path.dirname(dst))
    new, report = rewrite(src, dst, rank="full")
    head = onnx.load(dst, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in head.graph.initializer)
    assert os.path.exists(dst + ".data")
    onnx.checker.check_model(dst, full_check=True)
    # the returned model holds its data in memory; the saved one gives the same outputs
    feeds = {"x": _f32(1, 4, 9, 9), "x3": _f32(1, 2, 5, 5, 5), "x1": _f32(1, 3, 11), "w_in": _f32(5, 4, 3, 3)}
    for got, saved, ref in zip(run(new, feeds), run(dst, feeds), run(src, feeds)):
        assert np.array_equal(got, saved)
        assert rel(got, ref) < FULL_TOL if ref.dtype == np.float32 else np.array_equal(got, ref)
    # in place, when asked: the source and its side file are replaced atomically, nothing left behind
    rewrite(src, src, rank=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data", "ext.weights", "out"]
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    assert sum(n.op_type == "Conv" for n in onnx.load(src).graph.node) == n_conv + len(report.rewritten)


def test_unnamed_float16_conv():
    w = np_rng().standard_normal((6, 4, 3, 3)).astype(np.float16)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])  # no name
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 6, 8, 8])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    new, report = rewrite(model, rank="full")
    onnx.checker.check_model(new, full_check=True)
    assert report.layers[0].name == "Conv_0"
    assert [n.name for n in new.graph.node] == ["Conv_0_depthwise", "Conv_0_pointwise"]
    assert all(t.data_type == TensorProto.FLOAT16 for t in new.graph.initializer)
    feeds = {"x": _f32(1, 4, 8, 8).astype(np.float16)}
    assert rel(run(new, feeds)[0], run(model, feeds)[0]) < 3e-3  # float16 rounding of the factors
