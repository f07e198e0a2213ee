"""The ONNX rewrite as an onnx_ir pass (dsrewrite.onnx.SeparableConvPass): inside a PassManager after onnxscript's
BatchNorm-into-Conv fusion it gives exactly the graph of dsrewrite.onnx.rewrite on the fused model, and at full
rank onnxruntime computes the original's output (relative L2 error below TOL = 1e-4: float32 factors of a
float64 SVD)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")
rewriter = pytest.importorskip("onnxscript.rewriter")

from onnx_ir.passes.common import RemoveUnusedNodesPass  # noqa: E402
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite import DsrewriteError  # noqa: E402
from dsrewrite.onnx import SeparableConvPass, rewrite  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

TOL = 1e-4


def build(seed: int) -> onnx.ModelProto:
    """conv+BN+relu, strided conv (no bias)+BN+relu, depthwise conv, global pool: three convs, two eligible."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, *shape, scale=0.3, offset=0.0):
        inits.append(numpy_helper.from_array((offset + scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def bn(x, c, i):
        names = [const(f"bn{i}.{k}", c, scale=s, offset=o)
                 for k, s, o in (("scale", 0.1, 1), ("bias", 0.1, 0), ("mean", 0.1, 0), ("var", 0.05, 1))]
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [f"bn{i}"], name=f"/bn{i}/BatchNormalization"))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"/relu{i}/Relu"))
        return f"relu{i}"

    nodes.append(helper.make_node("Conv", ["x", const("c1.weight", 8, 3, 3, 3), const("c1.bias", 8)], ["c1"],
                                  name="/c1/Conv", pads=[1, 1, 1, 1]))
    h = bn("c1", 8, 1)
    nodes.append(helper.make_node("Conv", [h, const("c2.weight", 16, 8, 3, 3)], ["c2"], name="/c2/Conv",
                                  pads=[1, 1, 1, 1], strides=[2, 2]))
    h = bn("c2", 16, 2)
    nodes.append(helper.make_node("Conv", [h, const("dw.weight", 16, 1, 3, 3)], ["dw"], name="/dw/Conv",
                                  pads=[1, 1, 1, 1], group=16))
    nodes.append(helper.make_node("GlobalAveragePool", ["dw"], ["y"], name="/pool/GlobalAveragePool"))
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 1, 1])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fuse_bn() -> ir.passes.PassBase:
    return rewriter.RewritePass([fuse_batchnorm_into_conv_rule])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def graph_of(model: onnx.ModelProto):
    """Nodes (op, name, inputs, outputs, attributes) in order and initializer values by name."""
    nodes = [(n.op_type, n.name, list(n.input), list(n.output),
              sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute)) for n in model.graph.node]
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("rank", [2, "full"])
def test_pipeline_with_onnxscript_equals_rewrite(rank, gen):
    proto = build(gen.initial_seed() % 2**31)
    model = ir.serde.deserialize_model(proto)
    ds = SeparableConvPass(rank=rank)
    result = ir.passes.PassManager([fuse_bn(), RemoveUnusedNodesPass(), ds])(model)
    got = ir.serde.serialize_model(result.model)

    # the reference: the same onnxscript fusion, then dsrewrite.onnx.rewrite on the ModelProto
    fused = fuse_bn()(ir.serde.deserialize_model(proto)).model
    fused = RemoveUnusedNodesPass()(fused).model
    want, want_report = rewrite(ir.serde.serialize_model(fused), rank=rank)

    assert result.modified and not any(n.op_type == "BatchNormalization" for n in got.graph.node)  # onnxscript fired
    # dsrewrite fired on the two convs onnxscript rebuilt (its own names), the depthwise one skipped
    assert len(ds.report.rewritten) == 2 and [L.reason for L in ds.report.skipped] == ["already depthwise (groups=16)"]
    g_nodes, g_inits = graph_of(got)
    w_nodes, w_inits = graph_of(want)
    assert g_nodes == w_nodes
    assert g_inits.keys() == w_inits.keys() and all(np.array_equal(g_inits[k], w_inits[k]) for k in w_inits)
    assert ds.report.to_json() == want_report.to_json()
    onnx.checker.check_model(got, full_check=True)
    if rank == "full":
        x = np_rng().standard_normal((2, 3, 16, 16)).astype(np.float32)
        assert rel(run(got, x), run(proto, x)) < TOL


def test_pass_contract_and_bad_arguments():
    p = SeparableConvPass(rank=3, include="/c1/*")
    assert not p.in_place and not p.changes_input and p.report is None
    model = ir.serde.deserialize_model(build(0))
    before = ir.serde.serialize_model(model).SerializeToString()
    result = p(model)
    assert [L.name for L in p.report.rewritten] == ["/c1/Conv"] and result.modified
    assert ir.serde.serialize_model(model).SerializeToString() == before  # functional: the input is unchanged
    untouched = SeparableConvPass(rank=3, include="/nothing/*")(ir.serde.deserialize_model(build(0)))
    assert not untouched.modified
    for kwargs, match in (({"rank": 0}, "rank must be >= 1"), ({"rank": "half"}, "rank must be"),
                          ({"include": 5}, "include must be"), ({"device": "cuda"}, "option 'device' is not supported"),
                          ({"rnak": 2}, "unknown option 'rnak' for SeparableConvPass")):
        with pytest.raises(DsrewriteError, match=match):
            SeparableConvPass(**kwargs)
    # the options object: the same plan as dsrewrite.onnx.rewrite with it, a budget included
    cfg = dsrewrite.RewriteConfig(target_flops=0.6, kinds="all")
    q = SeparableConvPass(cfg)
    got = ir.serde.serialize_model(q(ir.serde.deserialize_model(build(0))).model)
    want, rep = rewrite(build(0), None, cfg)
    assert [(L.name, L.rank) for L in q.report.layers] == [(L.name, L.rank) for L in rep.layers]
    (g_nodes, g_inits), (w_nodes, w_inits) = graph_of(got), graph_of(want)
    assert g_nodes == w_nodes and all(np.array_equal(g_inits[k], w_inits[k]) for k in w_inits)


def test_external_data_model(tmp_path):
    """A model loaded by onnx_ir with its weights in a side file: the pass reads them, the input stays lazy."""
    path = tmp_path / "net.onnx"
    onnx.save_model(build(1), path, save_as_external_data=True, all_tensors_to_one_file=True, location="net.data",
                    size_threshold=0)
    model = ir.load(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    got = ir.serde.serialize_model(SeparableConvPass(rank=2)(model).model)
    want, _ = rewrite(str(path), rank=2)
    g_nodes, g_inits = graph_of(got)
    w_nodes, w_inits = graph_of(want)
    assert g_nodes == w_nodes and all(np.array_equal(g_inits[k], w_inits[k]) for k in w_inits)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
