"""The ONNX route's per-layer self-check (dsrewrite.onnx.selfcheck): every rewritten main-graph conv's pair,
emitted by the backend from the exact factors, is run in onnxruntime on the input the conv saw and compared
with its output; a wrong translation of the conv's attributes is caught and the layer left dense."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from dsrewrite.onnx import backend, rewrite  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

TOL = 1e-4
C = 6


def f32(*shape) -> np.ndarray:
    return np_rng().standard_normal(shape).astype(np.float32)


def run(model: onnx.ModelProto, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def conv(name, x, k, inits, bias=True, **attrs) -> onnx.NodeProto:
    """A ``C -> C`` conv ``name`` reading ``x``, writing ``name + "_y"``; its weight (and bias) go to ``inits``."""
    inits.append(numpy_helper.from_array(f32(C, C, k, k) / k, f"{name}.weight"))
    inputs = [x, f"{name}.weight"]
    if bias:
        inits.append(numpy_helper.from_array(f32(C), f"{name}.bias"))
        inputs.append(f"{name}.bias")
    return helper.make_node("Conv", inputs, [f"{name}_y"], name=name, **attrs)


def chain(specs, x_dims=("N", C, 17, 17)):
    """A model running the convs of ``specs`` (``(name, k, attrs)``) one after the other, with a Relu between."""
    nodes, inits, x = [], [], "x"
    for name, k, attrs in specs:
        nodes.append(conv(name, x, k, inits, **attrs))
        nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], [f"{name}_relu"], name=f"{name}_relu"))
        x = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", C, "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SETTINGS = [
    ("asymmetric", 3, dict(pads=[0, 1, 2, 1])),
    ("same_upper_s2", 3, dict(auto_pad="SAME_UPPER", strides=[2, 2])),  # odd size, stride 2: uneven padding
    ("same_lower_k4", 4, dict(auto_pad="SAME_LOWER")),  # even kernel: lower and upper differ
    ("dilated", 3, dict(dilations=[2, 2], pads=[2, 1, 2, 3])),
    ("strided", 3, dict(strides=[2, 1], pads=[1, 1, 1, 1], kernel_shape=[3, 3])),
    ("valid_nobias", 2, dict(auto_pad="VALID", bias=False)),
]


def self_check_note(report) -> str:
    notes = [n for n in report.notes if n.startswith("self-check")]
    assert len(notes) == 1, report.notes
    return notes[0]


@pytest.mark.parametrize("rank", ["full", 2])
def test_every_rewritten_conv_is_checked(rank):
    model = chain(SETTINGS)
    new, report = rewrite(model, rank=rank, input_shapes={"x": [2, C, 17, 17]})
    assert len(report.rewritten) == len(SETTINGS), [(L.name, L.reason) for L in report.layers]
    note = self_check_note(report)
    assert note.startswith(f"self-check: {len(SETTINGS)} rewritten layer(s) reproduce the original exactly"), note
    assert "failed" not in note and "not checked" not in note
    if rank == "full":
        x = {"x": f32(2, C, 17, 17)}
        assert rel(run(new, x)[0], run(model, x)[0]) < TOL


def test_run_time_bias_is_exposed_and_checked():
    """A bias computed at run time (a Mul) moves to the pointwise conv: the check reads its value from the run."""
    inits = [numpy_helper.from_array(f32(C), "b0"), numpy_helper.from_array(np.float32([2.0]), "two")]
    nodes = [helper.make_node("Mul", ["b0", "two"], ["b_run"], name="scale_bias"),
             conv("c", "x", 3, inits, bias=False, pads=[1, 1, 1, 1])]
    nodes[1].input.append("b_run")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 9, 9])],
                              [helper.make_tensor_value_info("c_y", TensorProto.FLOAT, [1, C, 9, 9])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    new, report = rewrite(model, rank="full")
    assert [L.name for L in report.rewritten] == ["c"]
    assert self_check_note(report).startswith("self-check: 1 rewritten layer(s) reproduce")
    x = {"x": f32(1, C, 9, 9)}
    assert rel(run(new, x)[0], run(model, x)[0]) < TOL


ORIGINAL = backend.depthwise_attributes  # what the wrong translations below start from


def _drop_padding(node, group):
    return [a for a in ORIGINAL(node, group) if a.name not in ("pads", "auto_pad")]


def _shift_padding(node, group):
    """Same total padding, all of it at the end: the output shape stays, the values move."""
    out = []
    for a in ORIGINAL(node, group):
        if a.name == "pads":
            n = len(a.ints) // 2
            a = helper.make_attribute("pads", [0] * n + [a.ints[i] + a.ints[i + n] for i in range(n)])
        out.append(a)
    return out


@pytest.mark.parametrize("wrong, why", [(_drop_padding, "output shape"), (_shift_padding, "rel. error")])
def test_a_wrong_translation_is_caught_and_left_dense(monkeypatch, wrong, why):
    """The backend and the check share depthwise_attributes: break it and the padded convs fail the check, are
    skipped with the reason, and the written model (the unpadded conv still rewritten) stays exact."""
    monkeypatch.setattr(backend, "depthwise_attributes", wrong)
    model = chain([("padded", 3, dict(pads=[1, 1, 1, 1])), ("unpadded", 3, dict(strides=[2, 2])),
                   ("padded_again", 3, dict(pads=[1, 2, 1, 0], dilations=[1, 2]))], x_dims=(2, C, 15, 15))
    new, report = rewrite(model, rank="full")
    assert [L.name for L in report.rewritten] == ["unpadded"]
    for name in ("padded", "padded_again"):
        reason = report.layer(name).reason
        assert reason.startswith("self-check failed (") and why in reason, reason
    note = self_check_note(report)
    assert "1 rewritten layer(s) reproduce" in note and "2 failed and were left dense: padded, padded_again" in note
    onnx.checker.check_model(new, full_check=True)
    assert sum(n.op_type == "Conv" for n in new.graph.node) == 4  # two dense convs + one pair
    x = {"x": f32(2, C, 15, 15)}
    assert rel(run(new, x)[0], run(model, x)[0]) < TOL


def test_symbolic_input_shape_rewrites_without_the_check():
    model = chain(SETTINGS[:2], x_dims=("N", C, "H", "W"))
    new, report = rewrite(model, rank=2)
    assert len(report.rewritten) == 2
    note = self_check_note(report)
    assert note == ("self-check: not run (input 'x' has symbolic dims: give input_shapes (--input-shape)): "
                    "2 rewritten layer(s) not checked"), note
    _, report = rewrite(model, rank=2, input_shapes={"x": [1, C, 11, 13]})
    assert self_check_note(report).startswith("self-check: 2 rewritten layer(s) reproduce")


def test_a_model_onnxruntime_cannot_load_still_rewrites():
    model = chain(SETTINGS[:1], x_dims=(1, C, 8, 8))
    model.graph.node.append(helper.make_node("Mystery", ["asymmetric_relu"], ["extra"], name="custom",
                                             domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, C, 8, 8]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    _, report = rewrite(model, rank=2)
    assert len(report.rewritten) == 1
    assert self_check_note(report).startswith("self-check: not run (onnxruntime cannot load the model (")


def test_subgraph_convs_are_counted_as_not_checked():
    inits = []
    body_conv = conv("inner", "x", 3, inits, pads=[1, 1, 1, 1])
    y = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, C, 8, 8])  # noqa: E731
    then = helper.make_graph([body_conv], "then", [], [y("inner_y")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="pass")], "else", [], [y("e")])
    nodes = [conv("outer", "x", 3, inits, pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["gated"], name="gate", then_branch=then, else_branch=other),
             helper.make_node("Add", ["outer_y", "gated"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "g", [y("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [y("out")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    new, report = rewrite(model, rank="full")
    assert {L.name for L in report.rewritten} == {"outer", "gate/then_branch/inner"}
    note = self_check_note(report)
    assert note.startswith("self-check: 1 rewritten layer(s) reproduce") and "failed" not in note, note
    assert note.endswith("; 1 not checked (inside a subgraph)"), note
    feeds = {"x": f32(1, C, 8, 8), "cond": np.array(True)}
    assert rel(run(new, feeds)[0], run(model, feeds)[0]) < TOL


def test_nothing_rewritten_adds_no_note_and_runs_nothing(monkeypatch):
    from dsrewrite.onnx import measure

    monkeypatch.setattr(measure, "session", lambda *a, **k: pytest.fail("onnxruntime was started"))
    _, report = rewrite(chain(SETTINGS[:1], x_dims=(1, C, 8, 8)), rank=2, exclude="*")
    assert not report.rewritten and not any(n.startswith("self-check") for n in report.notes)
