"""Low-rank pairs on the ONNX route (issue 22): 1x1 ``Conv``, ``Gemm`` and ``MatMul`` weight layers become a
reduction then an expansion, checked in onnxruntime against the original model and against numpy references."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests._ort import rel, run  # noqa: E402
from dsrewrite.cli import main  # noqa: E402
from dsrewrite.onnx import rewrite  # noqa: E402
from tests.conftest import derived_seed, np_rng  # noqa: E402

TOL = 1e-4


def f32(*shape):
    return np_rng().standard_normal(shape).astype(np.float32)


def export(model: nn.Module, x: torch.Tensor, path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
    return path


def flops_of(model: onnx.ModelProto) -> int:
    """2 x multiply-adds of every Conv / Gemm / MatMul, from onnx shape inference alone (a count independent of
    dsrewrite.onnx.flops)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(g.input) + list(g.value_info) + list(g.output)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    total = 0
    for n in g.node:
        if n.op_type == "Conv":
            w, y = shapes[n.input[1]], shapes[n.output[0]]
            total += 2 * math.prod(y[:1] + y[2:]) * math.prod(w)
        elif n.op_type in ("Gemm", "MatMul"):
            y = shapes[n.output[0]]
            b = shapes[n.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = b[1] if n.op_type == "Gemm" and trans_b else b[0]
            total += 2 * math.prod(y) * k
    return total


class Net(nn.Module):
    """A 3x3 conv, a 1x1 conv, a linear layer on tokens (exported as MatMul + Add) and one on pooled features
    (exported as Gemm)."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(3, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 24, 1)
        self.tok = nn.Linear(24, 20)
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        y = torch.relu(self.pw(torch.relu(self.c3(x))))
        t = torch.relu(self.tok(y.flatten(2).transpose(1, 2)))
        return self.head(t.mean(1))


SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    torch.manual_seed(derived_seed("net"))  # the same model whichever test builds it first
    model = Net().eval()
    return model, export(model, torch.randn(*SHAPE), str(tmp_path_factory.mktemp("lowrank") / "net.onnx"))


def test_exported_net_full_rank_every_kind_is_exact(net):
    _, path = net
    original = onnx.load(path)
    assert {"Gemm", "MatMul"} <= {n.op_type for n in original.graph.node}
    new, report = rewrite(path, rank="full", kinds="all")
    onnx.checker.check_model(new, full_check=True)
    kinds = {L.name: L.kind for L in report.rewritten}
    assert sorted(kinds.values()) == ["kxk", "linear", "linear", "pointwise"], report.table()
    names = {n.name for n in new.graph.node}
    for L in report.rewritten:
        halves = ("_depthwise", "_pointwise") if L.kind == "kxk" else ("_reduce", "_expand")
        assert {L.name + h for h in halves} <= names and L.name not in names
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("Gemm") == 2 and ops.count("MatMul") == 2 and ops.count("Conv") == 4
    feeds = {"x": f32(*SHAPE)}
    assert rel(run(new, feeds)[0], run(path, feeds)[0]) <= TOL
    assert any("self-check: 4 rewritten" in n for n in report.notes), report.notes


def test_kinds_choose_the_layers(net, tmp_path):
    _, path = net
    _, report = rewrite(path, rank="full")  # a rank: KxK convs only by default
    assert [L.kind for L in report.rewritten] == ["kxk"]
    reasons = {L.kind: L.reason for L in report.skipped}
    assert set(reasons) == {"pointwise", "linear"} and all("not chosen" in r for r in reasons.values())
    _, report = rewrite(path, rank="full", kinds=("linear",))
    assert sorted(L.kind for L in report.rewritten) == ["linear", "linear"]
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["rewrite", path, "-o", str(out), "--rank", "full", "--kinds", "pointwise", "--no-time", "--quiet",
                 "--report", str(rep)]) == 0
    layers = json.loads(rep.read_text())["layers"]
    assert [L["kind"] for L in layers if L["rewritten"]] == ["pointwise"]
    feeds = {"x": f32(*SHAPE)}
    assert rel(run(str(out), feeds)[0], run(path, feeds)[0]) <= TOL


def test_flops_budget_over_all_kinds_is_met(net):
    _, path = net
    new, report = rewrite(path, target_flops=0.5)
    assert {L.kind for L in report.rewritten} >= {"linear"}, report.table()
    before, after = flops_of(onnx.load(path)), flops_of(new)
    assert report.flops_before == before and report.flops_after == after
    assert after <= 0.5 * before
    onnx.checker.check_model(new, full_check=True)
    feeds = {"x": f32(*SHAPE)}
    assert run(new, feeds)[0].shape == run(path, feeds)[0].shape


# ------------------------------------------------------------------------------------ hand-built graphs
CIN, COUT, M = 12, 9, 5


def model_of(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def truncated(w: np.ndarray, k: int) -> np.ndarray:
    """The best rank-``k`` approximation of ``w`` (numpy SVD, float64): the reference of a rank-k pair."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.fixture
def hand():
    """Gemm (transB=0, alpha, beta, C [1, Cout]), Gemm with transA=1, MatMul on a 3-D input with a weight
    initializer shared by a second MatMul, Gemm with a run-time C."""
    b, c, w, at = f32(CIN, COUT), f32(1, COUT), f32(CIN, COUT), f32(COUT, CIN)
    nodes = [
        helper.make_node("Gemm", ["x", "b", "c"], ["y1"], name="gemm", alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["xt", "at"], ["y2"], name="gemm_ta", transA=1, transB=1),
        helper.make_node("MatMul", ["t", "w"], ["y3"], name="mm"),
        helper.make_node("MatMul", ["t2", "w"], ["y4"], name="mm_shared"),
        helper.make_node("Gemm", ["x", "at", "cr"], ["y5"], name="gemm_rc", transB=1),
    ]
    model = model_of(nodes, [vi("x", [M, CIN]), vi("xt", [CIN, M]), vi("t", [2, 3, CIN]), vi("t2", [4, CIN]),
                             vi("cr", [M, COUT])],
                     [vi("y1", [M, COUT]), vi("y2", [M, COUT]), vi("y3", [2, 3, COUT]), vi("y4", [4, COUT]),
                      vi("y5", [M, COUT])],
                     [numpy_helper.from_array(a, n) for a, n in ((b, "b"), (c, "c"), (w, "w"), (at, "at"))])
    feeds = {"x": f32(M, CIN), "xt": f32(CIN, M), "t": f32(2, 3, CIN), "t2": f32(4, CIN), "cr": f32(M, COUT)}
    return model, feeds, dict(b=b, c=c, w=w, at=at)


def test_hand_built_gemm_and_matmul_full_rank(hand):
    model, feeds, _ = hand
    new, report = rewrite(model, rank="full", kinds="all")
    onnx.checker.check_model(new, full_check=True)
    assert [L.name for L in report.rewritten] == ["gemm", "mm", "mm_shared", "gemm_rc"]
    skipped = {L.name: L.reason for L in report.skipped}
    assert skipped == {"gemm_ta": "Gemm with transA=1 (its input transposed) is not rewritten"}
    notes = {L.name: L.note for L in report.rewritten}
    assert "kept on the expansion" in notes["gemm_rc"]
    for got, ref in zip(run(new, feeds), run(model, feeds)):
        assert rel(got, ref) <= TOL
    inits = {t.name for t in new.graph.initializer}
    assert "b" not in inits and "w" not in inits and "at" in inits  # gemm_ta still reads "at"
    assert {"w.reduce", "w.expand"} <= inits and "w.reduce_2" not in inits  # one pair for the shared weight
    assert any("self-check: 4 rewritten" in n for n in report.notes), report.notes


def test_hand_built_rank_k_matches_numpy_svd(hand):
    """At rank k each pair computes x @ W_k^T (+ bias): W_k the truncated SVD of the layer's weight as numpy
    computes it, which pins down every transpose, alpha and beta."""
    model, feeds, a = hand
    k = 3
    new, report = rewrite(model, rank=k, kinds="linear")
    assert all(L.rank == k for L in report.rewritten) and len(report.rewritten) == 4
    y1, _, y3, y4, y5 = run(new, feeds)
    w_gemm = 0.5 * a["b"].T  # [Cout, Cin], alpha folded
    assert rel(y1, feeds["x"] @ truncated(w_gemm, k).T + 2.0 * a["c"]) <= TOL
    w_mm = truncated(a["w"].T, k)
    assert rel(y3, feeds["t"] @ w_mm.T) <= TOL and rel(y4, feeds["t2"] @ w_mm.T) <= TOL
    assert rel(y5, feeds["x"] @ truncated(a["at"], k).T + feeds["cr"]) <= TOL
    rows = {L.name: L.flops_before for L in report.layers}
    assert rows["mm"] == 2 * 6 * CIN * COUT and rows["gemm"] == 2 * M * CIN * COUT


def test_gemm_before_opset_11_reduces_with_a_matmul():
    b, c = f32(COUT, CIN), f32(COUT)
    model = model_of([helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="g", transB=1)],
                     [vi("x", [M, CIN])], [vi("y", [M, COUT])],
                     [numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")], opset=9)
    new, report = rewrite(model, rank="full", kinds="all")
    onnx.checker.check_model(new, full_check=True)
    assert [n.op_type for n in new.graph.node] == ["MatMul", "Gemm"]
    feeds = {"x": f32(M, CIN)}
    assert rel(run(new, feeds)[0], run(model, feeds)[0]) <= TOL


def test_pointwise_conv_with_stride_and_pads():
    w, bias = f32(COUT, CIN, 1, 1), f32(COUT)
    model = model_of([helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="pw", kernel_shape=[1, 1],
                                       strides=[2, 2], pads=[1, 0, 1, 0])],
                     [vi("x", [2, CIN, 7, 7])], [vi("y", [2, COUT, 5, 4])],
                     [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    new, report = rewrite(model, rank=4, kinds="pointwise")
    (L,) = report.rewritten
    assert L.kind == "pointwise" and L.rank == 4
    reduce, expand = new.graph.node
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    assert attrs(reduce)["strides"] == [2, 2] and attrs(reduce)["pads"] == [1, 0, 1, 0]
    assert "pads" not in attrs(expand) and expand.input[2] == "bias"
    x = f32(2, CIN, 7, 7)
    xs = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))[:, :, ::2, ::2]
    ref = np.einsum("oc,nchw->nohw", truncated(w[:, :, 0, 0], 4), xs) + bias[:, None, None]
    assert rel(run(new, {"x": x})[0], ref) <= TOL


# ------------------------------------------------------------------------------------------------ ViT
def test_exported_vit_matmul_and_gemm_weights_are_rewritten_exactly(tmp_path):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    path = export(model, x, str(tmp_path / "vit.onnx"))
    new, report = rewrite(path, rank="full", kinds="all")
    onnx.checker.check_model(new, full_check=True)
    linear = [L for L in report.layers if L.kind == "linear"]
    # qkv, proj, fc1, fc2 per block and the head: every weight matmul, none of attention's products
    assert len(linear) == 9 and all(L.rewritten for L in linear), report.table()
    assert {L.kind for L in report.rewritten} == {"kxk", "linear"}  # the patch embedding is a 8x8 conv
    weights = {t.name for t in onnx.load(path).graph.initializer}
    left = [n.name for n in new.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in weights]
    assert not left
    feeds = {"x": x.numpy()}
    ref = model(x).detach().numpy()
    assert rel(run(new, feeds)[0], run(path, feeds)[0]) <= TOL
    assert rel(run(new, feeds)[0], ref) <= TOL


# ---------------------------------------------------------------------------------------------- calibration
def test_calibrated_lowrank_layers_fit_their_outputs(net):
    _, path = net
    data = np_rng().standard_normal((16,) + SHAPE[1:]).astype(np.float32)
    new, report = rewrite(path, target_flops=0.6, calibration=data)
    low = [L for L in report.rewritten if L.kind in ("linear", "pointwise")]
    assert low, report.table()
    assert all(L.calib_error_after is not None and L.calib_error_after <= L.calib_error_before + 1e-9 for L in low)
    assert any(n.startswith("calibrated") for n in report.notes), report.notes
    onnx.checker.check_model(new, full_check=True)
    feeds = {"x": data[:2]}
    assert run(new, feeds)[0].shape == run(path, feeds)[0].shape


def test_calibrated_full_rank_pairs_stay_exact(net):
    """At full rank the refit has an exact solution: the calibrated graph (refitted expansions and biases, the
    Gemm's written as a new C with beta 1) must still compute the original model."""
    _, path = net
    data = np_rng().standard_normal((16,) + SHAPE[1:]).astype(np.float32)
    new, report = rewrite(path, rank="full", kinds="all", calibration=data)
    assert len(report.rewritten) == 4 and all(L.calib_error_after is not None for L in report.rewritten)
    gemm = next(n for n in new.graph.node if n.op_type == "Gemm" and n.name.endswith("_expand"))
    assert gemm.input[2].endswith(".expand_bias") and not any(a.name == "beta" for a in gemm.attribute)
    feeds = {"x": f32(*SHAPE)}
    assert rel(run(new, feeds)[0], run(path, feeds)[0]) <= TOL


def test_matmuls_inside_if_branches_share_one_pair():
    """A weight of the main graph read by a MatMul in each branch of an If: both rewritten, one pair stored where
    the weight was, outputs unchanged for either branch."""
    w = f32(CIN, COUT)
    branch = lambda tag: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["x", "w"], [f"y_{tag}"], name="mm")], tag, [], [vi(f"y_{tag}", [M, COUT])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    model = model_of([node], [vi("x", [M, CIN]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                     [vi("y", [M, COUT])], [numpy_helper.from_array(w, "w")])
    new, report = rewrite(model, rank="full", kinds="linear")
    onnx.checker.check_model(new, full_check=True)
    assert sorted(L.name for L in report.rewritten) == ["if/else_branch/mm", "if/then_branch/mm"]
    assert sorted(t.name for t in new.graph.initializer) == ["w.expand", "w.reduce"]
    x = f32(M, CIN)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert rel(run(new, feeds)[0], x @ w) <= TOL
