"""Property test of the ONNX rewrite over Conv attributes: at full rank the rewritten single-Conv model gives
onnxruntime the same output as the original (pads asymmetric, auto_pad, strides, dilations, bias, 1-D/2-D)."""
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from dsrewrite.onnx import rewrite  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

TOL = 1e-4  # relative L2 error; float32 factors from a float64 SVD


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 2]))
    cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kernel = [draw(st.integers(1, 4)) for _ in range(dims)]
    strides = [draw(st.integers(1, 3)) for _ in range(dims)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime rejects dilations with SAME_* auto_pad ("Dilation not supported"): no reference there
    max_dil = 1 if auto_pad.startswith("SAME") else 2
    dilations = [draw(st.integers(1, max_dil)) for _ in range(dims)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * dims)] if auto_pad == "NOTSET" else None
    # spatial size large enough for at least one output position
    size = [dilations[i] * (kernel[i] - 1) + 1 + draw(st.integers(0, 5)) for i in range(dims)]
    return dict(dims=dims, cin=cin, cout=cout, kernel=kernel, strides=strides, dilations=dilations,
                auto_pad=auto_pad, pads=pads, size=size, bias=draw(st.booleans()),
                explicit_kernel_shape=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def build(c) -> onnx.ModelProto:
    rng = np.random.default_rng(c["seed"])
    w = rng.standard_normal((c["cout"], c["cin"], *c["kernel"])).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv.weight")]
    inputs = ["x", "conv.weight"]
    if c["bias"]:
        inits.append(numpy_helper.from_array(rng.standard_normal(c["cout"]).astype(np.float32), "conv.bias"))
        inputs.append("conv.bias")
    attrs = dict(strides=c["strides"], dilations=c["dilations"])
    if c["explicit_kernel_shape"]:
        attrs["kernel_shape"] = c["kernel"]
    if c["auto_pad"] != "NOTSET":
        attrs["auto_pad"] = c["auto_pad"]
    else:
        attrs["pads"] = c["pads"]
    node = helper.make_node("Conv", inputs, ["y"], name="/block/conv/Conv", **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c["cin"], *c["size"]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c"] + [f"s{i}" for i in range(c["dims"])])
    graph = helper.make_graph([node], "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_full_rank_matches_onnxruntime(c):
    model = build(c)
    new, report = rewrite(model, rank="full")
    onnx.checker.check_model(new, full_check=True)
    layer = report.layers[0]
    convs = [n for n in new.graph.node if n.op_type == "Conv"]
    if np.prod(c["kernel"]) == 1:
        assert not layer.rewritten and "1x1" in layer.reason
        assert len(convs) == 1
        return
    assert layer.rewritten, layer.reason
    assert [n.name for n in convs] == ["/block/conv/Conv_depthwise", "/block/conv/Conv_pointwise"]
    groups = [helper.get_attribute_value(a) for a in convs[0].attribute if a.name == "group"]
    assert groups == [c["cin"]]
    # the pointwise conv neither pads nor strides: the depthwise does all of it
    pw_attrs = {a.name for a in convs[1].attribute}
    assert pw_attrs == {"kernel_shape"}
    assert len(convs[1].input) == (3 if c["bias"] else 2)

    x = np_rng().standard_normal((2, c["cin"], *c["size"])).astype(np.float32)
    ref, got = run(model, x), run(new, x)
    assert got.shape == ref.shape
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < TOL, (err, c)
    # the graph count after the rewrite equals the cost model's saving
    saved = layer.flops_before - layer.flops_after
    assert report.flops_after == report.flops_before - saved
    assert report.flops_before == 2 * int(np.prod(ref.shape)) * c["cin"] * int(np.prod(c["kernel"]))
