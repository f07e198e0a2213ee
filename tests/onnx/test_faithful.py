"""Never a silently wrong ONNX model (issue 11): weights in Constant nodes and in subgraphs are counted and
rewritten, convs inside If/Loop bodies are rewritten (exact at full rank in onnxruntime, both If branches), the
written file never grows where the report claims fewer parameters, a model with nothing to rewrite comes back
unchanged, a valid model that onnx-graphsurgeon cannot round-trip is rewritten, target_flops works when
only MatMul shapes are unknown, and a conv whose weight the user can override at run time is left alone. Small models built with onnx.helper; fresh random weights and inputs each run."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from tests._ort import rel, run  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402
from dsrewrite.onnx import count_params, rewrite  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

TOL = 1e-4  # relative L2 error at rank="full": float32 factors of a float64 SVD
C, K = 8, 3  # every rewritten conv here: C -> C channels (Cin = Cout), K x K kernel
W_SIZE = C * C * K * K  # elements of one dense conv weight


def pair_size(rank: int) -> int:
    """Elements of one depthwise [C*r, 1, K, K] + pointwise [C, C*r, 1, 1] pair (no bias)."""
    return C * rank * K * K + C * C * rank


def f32(*shape) -> np.ndarray:
    return np_rng().standard_normal(shape).astype(np.float32)


def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name))


def conv(name, x, w, y, bias=None, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [y], name=name, pads=[1, 1, 1, 1], **attrs)


def model_of(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def x_info(name="x"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, C, 8, 8])


def saved_sizes(model: onnx.ModelProto, tmp_path, **kw):
    """Rewrite ``model`` from a file to a file: (report, source bytes, rewritten bytes, rewritten path)."""
    src, dst = str(tmp_path / "src.onnx"), str(tmp_path / "dst.onnx")
    onnx.save(model, src)
    _, report = rewrite(src, dst, **kw)
    return report, os.path.getsize(src), os.path.getsize(dst), dst


def assert_file_follows_params(report, before: int, after: int) -> None:
    """The file changes by the parameters' float32 bytes, give or take the new nodes' protobuf overhead (under
    250 bytes per rewritten conv here): a duplicated weight or pair (>= 1088 bytes) does not fit."""
    extra = (after - before) - 4 * (report.params_after - report.params_before)
    assert abs(extra) < 250 * len(report.rewritten), extra


# ----------------------------------------------------------------------------------- Paddle: Constant weights

def paddle_model():
    """Weights and biases in Constant nodes (as Paddle's exporter writes them) and a scalar literal."""
    nodes = [constant("w1", f32(C, C, K, K)), constant("b1", f32(C)), constant("w2", f32(C, C, K, K)),
             constant("six", np.array(6.0, np.float32)),
             conv("p2o.Conv.0", "x", "w1", "a", "b1"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("p2o.Conv.1", "r", "w2", "c"), helper.make_node("Mul", ["c", "six"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "paddle", [x_info()], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                         [1, C, 8, 8])])
    return model_of(graph)


@pytest.mark.parametrize("rank", ["full", 2])
def test_constant_node_weights_are_counted_and_rewritten(rank, tmp_path):
    model = paddle_model()
    dense = 2 * W_SIZE + C  # two weights and a bias; the 0-d literal 6.0 is no parameter
    assert count_params(model) == dense
    report, before, after, dst = saved_sizes(model, tmp_path, rank=rank)
    r = C if rank == "full" else rank  # full rank = min(Cout, K*K) = C here
    assert [L.name for L in report.rewritten] == ["p2o.Conv.0", "p2o.Conv.1"]
    assert (report.params_before, report.params_after) == (dense, dense - 2 * W_SIZE + 2 * pair_size(r))
    new = onnx.load(dst)
    onnx.checker.check_model(new, full_check=True)
    assert not {"w1_const", "w2_const"} & {n.name for n in new.graph.node}  # the dense weights are gone
    assert_file_follows_params(report, before, after)
    if rank == 2:
        assert after < before
    else:
        x = {"x": f32(1, C, 8, 8)}
        assert rel(run(dst, x)[0], run(model, x)[0]) < TOL


# ----------------------------------------------------------------------------------------- If / Loop bodies

def if_model():
    """An If whose branches hold five convs: weights from the main graph (one shared by both branches), from a
    Constant node inside a branch, from a branch's own initializer; the branches read the main graph's x."""
    y_info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, C, 8, 8])  # noqa: E731
    then = helper.make_graph([
        conv("conv_a", "x", "w_shared", "t1"),
        conv("conv_b", "x", "w_outer", "t2", bias="b_outer"),
        helper.make_node("Add", ["t1", "t2"], ["then_out"], name="then_add"),
    ], "then", [], [y_info("then_out")])
    other = helper.make_graph([
        constant("w_else", f32(C, C, K, K)),
        conv("conv_c", "x", "w_else", "e1"),
        conv("conv_d", "x", "w_shared", "e2", dilations=[1, 1]),
        conv("conv_e", "x", "w_sub", "e3"),
        helper.make_node("Sum", ["e1", "e2", "e3"], ["else_out"], name="else_sum"),
    ], "else", [], [y_info("else_out")], initializer=[numpy_helper.from_array(f32(C, C, K, K), "w_sub")])
    node = helper.make_node("If", ["cond"], ["y"], name="/gate/If", then_branch=then, else_branch=other)
    graph = helper.make_graph(
        [node], "branches", [x_info(), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [y_info("y")],
        initializer=[numpy_helper.from_array(f32(C, C, K, K), "w_shared"),
                     numpy_helper.from_array(f32(C, C, K, K), "w_outer"), numpy_helper.from_array(f32(C), "b_outer")])
    return model_of(graph)


def test_if_branches_are_rewritten_exactly(tmp_path):
    model = if_model()
    weights = 4  # distinct dense weights: w_shared (read in both branches), w_outer, w_else, w_sub
    dense = weights * W_SIZE + C
    assert count_params(model) == dense  # each tensor once, wherever it lives and however often it is read
    report, before, after, dst = saved_sizes(model, tmp_path, rank="full")
    names = {L.name for L in report.rewritten}
    assert names == {f"/gate/If/then_branch/conv_{c}" for c in "ab"} | {f"/gate/If/else_branch/conv_{c}" for c in "cde"}
    assert report.params_after == dense - weights * W_SIZE + weights * pair_size(C)  # one pair per shared weight
    assert_file_follows_params(report, before, after)
    new = onnx.load(dst)
    onnx.checker.check_model(new, full_check=True)
    main = {t.name for t in new.graph.initializer}
    assert {"w_shared.depthwise", "w_shared.pointwise", "b_outer"} <= main and "w_shared" not in main
    for branch in (True, False):
        feeds = {"x": f32(1, C, 8, 8), "cond": np.array(branch)}
        assert rel(run(dst, feeds)[0], run(model, feeds)[0]) < TOL, branch


def test_if_rank2_file_shrinks_with_the_parameters(tmp_path):
    report, before, after, _ = saved_sizes(if_model(), tmp_path, rank=2)
    assert len(report.rewritten) == 5 and report.params_after < report.params_before
    assert after < before
    assert_file_follows_params(report, before, after)


def test_include_selects_one_branch():
    _, report = rewrite(if_model(), rank=2, include="/gate/If/else_branch/*")
    assert sorted(L.name.rsplit("/", 1)[1] for L in report.rewritten) == ["conv_c", "conv_d", "conv_e"]
    # conv_a still reads w_shared: the dense weight stays beside the else branch's pair
    assert report.params_after == report.params_before - 2 * W_SIZE + 3 * pair_size(2)


def test_loop_body_conv_reads_an_outer_weight():
    body = helper.make_graph([
        conv("body_conv", "state", "w_loop", "c"),
        helper.make_node("Relu", ["c"], ["state_out"], name="body_relu"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, C, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, C, 8, 8])])
    loop = helper.make_node("Loop", ["trips", "", "x"], ["y"], name="repeat", body=body)
    graph = helper.make_graph([loop], "loop", [x_info()], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                         [1, C, 8, 8])],
                              initializer=[numpy_helper.from_array(np.array(3, np.int64), "trips"),
                                           numpy_helper.from_array(0.3 * f32(C, C, K, K), "w_loop")])
    model = model_of(graph)
    new, report = rewrite(model, rank="full")
    assert [L.name for L in report.rewritten] == ["repeat/body/body_conv"]
    onnx.checker.check_model(new, full_check=True)
    x = {"x": f32(1, C, 8, 8)}
    assert rel(run(new, x)[0], run(model, x)[0]) < TOL


# ------------------------------------------------------------------- what onnx-graphsurgeon cannot round-trip

def typed_output_model(rewritable: bool) -> onnx.ModelProto:
    """The graph output also listed in value_info with a type but no shape (ddddocr's captcha model does
    this): valid for onnx.checker, but graphsurgeon's import keeps the shapeless entry and exports a graph
    output without a shape, which onnx.checker rejects."""
    w = f32(C, C, K, K) if rewritable else f32(C, 1, K, K)  # grouped (depthwise): nothing to rewrite
    attrs = {} if rewritable else {"group": C}
    graph = helper.make_graph(
        [conv("/c/Conv", "x", "w", "y", **attrs)], "typed", [x_info()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])],
        initializer=[numpy_helper.from_array(w, "w")],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return model_of(graph)


def test_graphsurgeon_round_trip_fails_on_the_typed_output():
    gs = pytest.importorskip("onnx_graphsurgeon")
    model = typed_output_model(True)
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(onnx.checker.ValidationError, match="shape"):
        onnx.checker.check_model(gs.export_onnx(gs.import_onnx(model)))


def test_typed_output_model_is_rewritten():
    model = typed_output_model(True)
    new, report = rewrite(model, rank="full")
    assert len(report.rewritten) == 1
    onnx.checker.check_model(new, full_check=True)
    assert new.graph.output[0] == model.graph.output[0] and list(new.graph.value_info) == list(model.graph.value_info)
    x = {"x": f32(1, C, 8, 8)}
    assert rel(run(new, x)[0], run(model, x)[0]) < TOL


def test_nothing_to_rewrite_comes_back_unchanged(tmp_path):
    model = typed_output_model(False)
    report, before, after, dst = saved_sizes(model, tmp_path, rank=2)
    assert [L.reason for L in report.layers] == [f"already depthwise (groups={C})"]
    assert report.params_after == report.params_before == C * K * K
    with open(tmp_path / "src.onnx", "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
    new, _ = rewrite(model, rank=2)
    assert new.SerializeToString() == model.SerializeToString()


def test_a_rewritten_model_onnx_rejects_is_a_one_line_dsrewrite_error(monkeypatch):
    check = onnx.checker.check_model

    def reject_rewritten(model, *args, **kwargs):  # the source passes, the rewritten model does not
        if any(n.name.endswith("_depthwise") for n in model.graph.node):
            raise onnx.checker.ValidationError("Field 'shape' of 'type' is required but missing.\nmore")
        return check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", reject_rewritten)
    with pytest.raises(DsrewriteError, match="rewritten model fails onnx.checker") as e:
        rewrite(paddle_model(), rank=2)
    assert "\n" not in str(e.value)


def test_weight_that_is_also_a_graph_input_is_not_baked_in():
    """An initializer also listed as a graph input (ONNX IR < 4 style, or an overridable default) can be fed at
    run time: that conv is skipped with the reason, the other one is rewritten, and an override still works."""
    w1, w2 = f32(C, C, K, K), f32(C, C, K, K)
    w1_info = helper.make_tensor_value_info("w1", TensorProto.FLOAT, [C, C, K, K])
    graph = helper.make_graph(
        [conv("conv1", "x", "w1", "h"), conv("conv2", "h", "w2", "y")], "g", [x_info(), w1_info],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = model_of(graph)
    onnx.checker.check_model(model, full_check=True)
    new, report = rewrite(model, rank="full")
    assert [L.name for L in report.rewritten] == ["conv2"]
    skipped = {L.name: L.reason for L in report.layers if not L.rewritten}
    assert skipped == {"conv1": "weight 'w1' is also a graph input (overridable at run time)"}
    assert [n.op_type for n in new.graph.node if "w1" in n.input] == ["Conv"]
    assert [i.name for i in new.graph.input] == ["x", "w1"]
    x, other = f32(1, C, 8, 8), f32(C, C, K, K)
    for feeds in ({"x": x}, {"x": x, "w1": other}):  # the default, then a run-time override
        assert rel(run(new, feeds)[0], run(model, feeds)[0]) < TOL


# ------------------------------------------------------------------------ target_flops with unknown MatMuls

def matmul_model(conv_after_reshape: bool = False) -> onnx.ModelProto:
    """Two convs, then a Reshape to a shape given at run time and a MatMul: shape inference cannot know the
    MatMul's shapes (or, with ``conv_after_reshape``, the second conv's)."""
    nodes = [conv("/c1/Conv", "x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"], name="relu")]
    if conv_after_reshape:
        nodes += [helper.make_node("Reshape", ["r", "s"], ["rs"], name="reshape"), conv("/c2/Conv", "rs", "w2", "y")]
    else:
        nodes += [conv("/c2/Conv", "r", "w2", "b"), helper.make_node("Reshape", ["b", "s"], ["rs"], name="reshape"),
                  helper.make_node("MatMul", ["rs", "m"], ["y"], name="/head/MatMul")]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 16, 16]),
                                            helper.make_tensor_value_info("s", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                              initializer=[numpy_helper.from_array(f32(C, C, K, K), "w1"),
                                           numpy_helper.from_array(f32(C, C, K, K), "w2"),
                                           numpy_helper.from_array(f32(16, 4), "m")])
    return model_of(graph)


def test_target_flops_applies_to_the_convs_when_matmul_shapes_are_unknown():
    model = matmul_model()
    with pytest.raises(DsrewriteError, match="unknown shapes") as e:  # all kinds: the MatMul is a planned layer
        rewrite(model, target_flops=0.5, input_shapes={"x": (1, C, 16, 16)})
    assert "/head/MatMul" in str(e.value) and "kinds without 'linear'" in str(e.value)
    new, report = rewrite(model, target_flops=0.5, input_shapes={"x": (1, C, 16, 16)}, kinds=("kxk",))
    assert any("applies to the convolutions' FLOPs" in n and "/head/MatMul" in n for n in report.notes)
    convs = report.layers
    assert report.rewritten and sum(L.flops_after for L in convs) <= 0.5 * sum(L.flops_before for L in convs)
    onnx.checker.check_model(new, full_check=True)
    feeds = {"x": f32(1, C, 16, 16), "s": np.array([1, C, 16, 16], np.int64)}
    assert run(new, feeds)[0].shape == run(model, feeds)[0].shape == (1, C, 16, 4)


def test_target_flops_with_an_unknown_conv_gives_advice_that_helps():
    with pytest.raises(DsrewriteError, match="unknown shapes") as e:
        rewrite(matmul_model(conv_after_reshape=True), target_flops=0.5, input_shapes={"x": (1, C, 16, 16)})
    assert "/c2/Conv" in str(e.value) and "shape inference cannot resolve" in str(e.value)
    assert "input_shapes" not in str(e.value)  # they were given: asking for them again cannot help
