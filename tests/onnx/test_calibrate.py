"""ONNX calibration in onnxruntime (issue 15): the conv view pads as onnxruntime does, calibrated models are
never worse than plain SVD on their data, shared weights and refitted biases are written correctly, fp16 and
subgraph convs are handled, the sequential/original choice is reported, and bad data gets one-line errors.
Small models built with onnx.helper; fresh random weights and inputs each run; references are onnxruntime."""
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

import dsrewrite.onnx.calibrate as onnx_calibrate  # noqa: E402
from dsrewrite.cli import main  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402
from dsrewrite.onnx import rewrite  # noqa: E402
from dsrewrite.onnx.calib_data import image_feeds  # noqa: E402
from dsrewrite.onnx.calibrate import ConvView  # noqa: E402
from dsrewrite.onnx.flops import infer_shapes  # noqa: E402
from dsrewrite.onnx.frontend import collect_sites  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

C = 8


def f32(*shape) -> np.ndarray:
    return np_rng().standard_normal(shape).astype(np.float32)


def smooth(n: int, c: int = C, h: int = 12, w: int = 12) -> np.ndarray:
    """Spatially correlated inputs (a blurred field): the data calibration should exploit."""
    x = torch.from_numpy(f32(n, c, h + 4, w + 4))
    return torch.nn.functional.avg_pool2d(x, 5, stride=1).numpy().astype(np.float32)


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def chain(dtype=TensorProto.FLOAT, bias=True, **conv_attrs) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Relu -> Conv (C -> C, 3x3), symbolic batch."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    attrs = conv_attrs or {"pads": [1, 1, 1, 1]}
    nodes, inits, x = [], [], "x"
    for i in range(3):
        inputs = [x, f"w{i}"] + ([f"b{i}"] if bias else [])
        inits.append(numpy_helper.from_array((f32(C, C, 3, 3) / 8).astype(np_type), f"w{i}"))
        if bias:
            inits.append(numpy_helper.from_array(f32(C).astype(np_type), f"b{i}"))
        nodes.append(helper.make_node("Conv", inputs, [f"c{i}"], name=f"/conv{i}", **attrs))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"/relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", dtype, ["n", C, 12, 12])],
                              [helper.make_tensor_value_info("c2", dtype, ["n", C, "oh", "ow"])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attrs", [dict(pads=[0, 1, 2, 1], strides=[2, 1], dilations=[1, 2]),
                                   dict(auto_pad="SAME_UPPER", strides=[2, 2]), dict(auto_pad="SAME_LOWER", strides=[2, 2]),
                                   dict(auto_pad="VALID")], ids=["pads", "same_upper", "same_lower", "valid"])
def test_conv_view_pads_as_onnxruntime_does(attrs):
    model = onnx.ModelProto()
    model.CopyFrom(chain(**attrs))
    del model.graph.node[1:]
    model.graph.output[0].name = "c0"
    x = f32(2, C, 12, 12)
    (y,) = run(model, {"x": x})
    site = collect_sites(model, infer_shapes(model, {"x": x.shape}))[0]
    view = ConvView(site)
    with torch.no_grad():
        got = view.conv(view.padded(x)).numpy()
    assert got.shape == y.shape and rel(got, y) < 1e-5


@pytest.mark.parametrize("sequential", [True, False])
def test_calibrated_model_beats_plain_svd_on_its_data(sequential):
    model = chain()
    calib, held = smooth(32), smooth(16)
    plain, _ = rewrite(model, rank=2)
    new, report = rewrite(model, rank=2, calibration=[{"x": calib[:16]}, {"x": calib[16:]}], sequential=sequential)
    onnx.checker.check_model(new, full_check=True)
    assert all(L.calib_error_after <= L.calib_error_before for L in report.layers)
    word = "sequentially on the rewritten graph (3 waves" if sequential else "original model's activations (sequential=False)"
    assert any(n.startswith("calibrated 3 layer(s) on 2 feed(s) (32 samples)") and word in n for n in report.notes)
    for x in (calib, held):
        (ref,), (p,), (c,) = run(model, {"x": x}), run(plain, {"x": x}), run(new, {"x": x})
        assert rel(c, ref) < rel(p, ref)


def test_sequential_falls_back_to_the_original_activations_when_it_would_take_too_long(monkeypatch):
    monkeypatch.setattr(onnx_calibrate, "SEQUENTIAL_SECONDS", 0.0)
    _, report = rewrite(chain(), rank=2, calibration=smooth(8))
    note = next(n for n in report.notes if n.startswith("calibrated"))
    assert "not sequentially (estimated" in note and "sequential=True / --sequential runs it" in note


def test_refitted_biases_are_written_and_the_old_ones_removed():
    model = chain()
    new, report = rewrite(model, rank=2, calibration=smooth(16))
    names = {t.name for t in new.graph.initializer}
    assert {f"w{i}.pointwise_bias" for i in range(3)} <= names and not names & {"b0", "b1", "b2"}
    pw = [n for n in new.graph.node if n.name.endswith("_pointwise")]
    assert [n.input[2] for n in pw] == [f"w{i}.pointwise_bias" for i in range(3)]


def shared_weight_model() -> onnx.ModelProto:
    """Two convs reading one weight on different inputs: calibrated, each gets its own pair."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="/a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="/relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="/b", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C, 12, 12])],
                              initializer=[numpy_helper.from_array(f32(C, C, 3, 3) / 8, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shared_weights_get_one_pair_per_calibrated_conv():
    model = shared_weight_model()
    calib = smooth(16)
    plain, _ = rewrite(model, rank=2)
    assert len([t for t in plain.graph.initializer if t.name.endswith(".depthwise")]) == 1  # plain: shared
    new, report = rewrite(model, rank=2, calibration=calib)
    dw = sorted(t.name for t in new.graph.initializer if ".depthwise" in t.name)
    assert dw == ["w.depthwise", "w.depthwise_2"]
    onnx.checker.check_model(new, full_check=True)
    (ref,), (p,), (c,) = run(model, {"x": calib}), run(plain, {"x": calib}), run(new, {"x": calib})
    assert rel(c, ref) < rel(p, ref)


def test_float16_models_get_float16_factors():
    model = chain(TensorProto.FLOAT16)
    calib = smooth(8).astype(np.float16)
    new, report = rewrite(model, rank=2, calibration=calib)
    onnx.checker.check_model(new, full_check=True)
    factors = [t for t in new.graph.initializer if ".depthwise" in t.name or ".pointwise" in t.name]
    assert factors and all(t.data_type == TensorProto.FLOAT16 for t in factors)
    (out,) = run(new, {"x": calib})
    assert out.dtype == np.float16 and np.isfinite(out).all()


def if_model() -> onnx.ModelProto:
    """A main-graph conv, then an If whose branches each hold a conv (their activations cannot be read)."""
    def branch(tag):
        node = helper.make_node("Conv", ["r", f"w_{tag}"], [f"y_{tag}"], name=f"/{tag}", pads=[1, 1, 1, 1])
        return helper.make_graph([node], tag, [], [helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT,
                                                                                   ["n", C, 12, 12])])

    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="/main", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="/relu"),
             helper.make_node("If", ["cond"], ["y"], name="/if", then_branch=branch("then"), else_branch=branch("else"))]
    inits = [numpy_helper.from_array(f32(C, C, 3, 3), n) for n in ("w", "w_then", "w_else")]
    inits.append(numpy_helper.from_array(np.array(True), "cond"))
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C, 12, 12])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_convs_keep_their_plain_factors_and_the_note_says_why():
    new, report = rewrite(if_model(), rank=2, calibration=smooth(8))
    assert sum(L.rewritten for L in report.layers) == 3
    calibrated = [L.name for L in report.layers if L.calib_error_after is not None]
    assert calibrated == ["/main"]
    note = next(n for n in report.notes if n.startswith("calibrated 1 layer(s)"))
    assert "2 layer(s) keep their plain SVD factors" in note and "inside a subgraph" in note
    onnx.checker.check_model(new, full_check=True)


def test_bad_calibration_data_gets_one_line_errors(tmp_path):
    model = chain()
    cases = [([{"y": f32(2, C, 12, 12)}], "has inputs ['y'], the model takes ['x']"),
             (f32(4, C, 10, 12), "input 'x' has shape 4x8x10x12, the model takes ?x8x12x12"),
             (np.zeros((0, C, 12, 12), np.float32), "calibration data is empty"),
             (str(tmp_path / "none.npy"), "calibration file not found"),
             (42, "calibration must be an array")]
    for data, msg in cases:
        with pytest.raises(DsrewriteError, match=re.escape(msg)) as e:
            rewrite(model, rank=2, calibration=data)
        assert "\n" not in str(e.value)
    with pytest.raises(DsrewriteError, match="sequential applies to calibration"):
        rewrite(model, rank=2, sequential=True)


def save_images(folder, n: int, size=(20, 30), mode="RGB"):
    from PIL import Image

    folder.mkdir()
    rng = np_rng()
    for i in range(n):
        shape = size + ((3,) if mode == "RGB" else ())
        Image.fromarray((rng.random(shape) * 255).astype("uint8"), mode).save(folder / f"{i}.png")
    return folder


def image_model(layout="nchw") -> onnx.ModelProto:
    shape = ["n", 3, "h", "w"] if layout == "nchw" else ["n", "h", "w", 3]
    nodes = ([] if layout == "nchw" else [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2])])
    nodes.append(helper.make_node("Conv", ["x" if layout == "nchw" else "xt", "w"], ["y"], name="/c", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C, "h", "w"])],
                              initializer=[numpy_helper.from_array(f32(C, 3, 3, 3), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_image_folders_become_normalised_feeds(tmp_path):
    folder = save_images(tmp_path / "imgs", 5)
    feeds = image_feeds(str(folder), image_model(), size=(16, 24), mean=(0.5, 0.5, 0.5), std=(0.25,) * 3,
                        batch_size=4)
    assert [f["x"].shape for f in feeds] == [(4, 3, 16, 24), (1, 3, 16, 24)]
    x = np.concatenate([f["x"] for f in feeds])
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6 and x.std() > 0.5  # (u - 0.5) / 0.25, u in [0, 1]
    nhwc = image_feeds(str(folder), image_model("nhwc"), size=(16, 24), mean=(0.5,) * 3, std=(0.25,) * 3,
                       layout="nhwc", bgr=True)
    assert nhwc[0]["x"].shape == (5, 16, 24, 3)
    np.testing.assert_allclose(nhwc[0]["x"][..., ::-1].transpose(0, 3, 1, 2), x, atol=1e-6)
    with pytest.raises(DsrewriteError, match="symbolic height or width: give the image size"):
        image_feeds(str(folder), image_model())
    with pytest.raises(DsrewriteError, match="mean has 2 values, the input has 3 channels"):
        image_feeds(str(folder), image_model(), size=(8, 8), mean=(0.5, 0.5))
    with pytest.raises(DsrewriteError, match="no images"):
        image_feeds(str(save_images(tmp_path / "none", 0)), image_model(), size=(8, 8))


def test_cli_calibrates_an_onnx_model_from_an_image_folder(tmp_path, capsys):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(chain(), src)
    np.save(tmp_path / "calib.npy", smooth(12))
    assert main(["rewrite", str(src), "-o", str(out), "--rank", "2", "--calibration", str(tmp_path / "calib.npy"),
                 "--no-sequential", "--report", str(rep), "-q"]) == 0
    assert capsys.readouterr().out == ""
    layers = json.loads(rep.read_text())["layers"]
    assert all(L["calib_error_after"] <= L["calib_error_before"] for L in layers)
    img_src = tmp_path / "img.onnx"
    onnx.save(image_model(), img_src)
    folder = save_images(tmp_path / "imgs", 3)
    assert main(["rewrite", str(img_src), "-o", str(tmp_path / "img_out.onnx"), "--rank", "2", "--calibration",
                 str(folder), "--calib-size", "16x16", "--calib-mean", "0.5", "--calib-std", "0.5", "-q"]) == 0
    assert main(["rewrite", str(img_src), "-o", str(tmp_path / "img_out.onnx"), "--rank", "2", "--calibration",
                 str(folder), "-q"]) == 2
    assert "give the image size" in capsys.readouterr().err
    assert main(["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--calibration", str(folder),
                 "--no-sequential", "--no-time", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsrewrite: error: --no-sequential is not supported for PyTorch models") and "\n" not in err
