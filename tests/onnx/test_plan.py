"""Plans on the ONNX route (issue 23, item 1): ``dsrewrite.onnx.rewrite`` fills ``result.plan``, and
``dsrewrite.onnx.apply_plan`` replays a saved plan without timing anything: the same ranks and per-channel ranks,
the same rewritten graph (byte for byte, and equal outputs in onnxruntime), calibrated when data is given; a
plan that does not fit the model is refused in one line naming the first mismatch."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import dsrewrite  # noqa: E402
import dsrewrite.onnx as dx  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402
from tests.conftest import np_rng  # noqa: E402


def _net(rng: np.random.Generator, mid: int = 16) -> "onnx.ModelProto":
    """Every layer kind: 3x3 conv, 1x1 conv, 3x3 conv, then a Gemm head (fresh random weights)."""
    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    inits = [w("c1.w", 8, 3, 3, 3), w("c2.w", mid, 8, 1, 1), w("c3.w", 16, mid, 3, 3), w("fc.w", 10, 16),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "c1.b"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc.b")]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             helper.make_node("Conv", ["ar", "c2.w"], ["b"], name="c2"),
             helper.make_node("Relu", ["b"], ["br"], name="r2"),
             helper.make_node("Conv", ["br", "c3.w"], ["c"], name="c3", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: "onnx.ModelProto", x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.fixture
def rng():
    return np_rng()


def _layers(plan):
    return [(L.name, L.kind, L.rank, L.channel_ranks) for L in plan.layers]


def test_target_flops_plan_saved_loaded_replayed(tmp_path, rng):
    model = _net(rng)
    source = model.SerializeToString()
    result = dx.rewrite(model, target_flops=0.5, ragged=True)
    plan = result.plan
    assert isinstance(plan, dsrewrite.Plan) and plan.route == "onnx"
    model_out, report = result  # still unpacks as (model, report)
    assert [L.name for L in plan.layers] == [L.name for L in report.layers]
    assert {L.kind for L in plan.layers} == {"kxk", "pointwise", "linear"}  # every layer found, of every kind
    assert plan.options["target_flops"] == 0.5 and plan.options["ragged"] is True
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = dsrewrite.Plan.load(path)
    assert _layers(loaded) == _layers(plan) and loaded.fingerprint == plan.fingerprint

    replayed = dx.apply_plan(model, tmp_path / "out.onnx", path)
    assert model.SerializeToString() == source  # the source model is not changed
    assert _layers(replayed.plan) == _layers(plan)
    assert [(L.name, L.rank, L.channel_ranks) for L in replayed.report.layers] == \
        [(L.name, L.rank, L.channel_ranks) for L in report.layers]
    assert replayed.model.SerializeToString() == model_out.SerializeToString()  # the same graph, byte for byte
    assert onnx.load(str(tmp_path / "out.onnx")).graph == model_out.graph
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(replayed.model, x), _run(model_out, x), rtol=0, atol=1e-6)
    assert any(n.startswith("rebuilt from a plan") for n in replayed.report.notes)


def test_ranks_by_layer_every_kind_replayed(rng):
    model = _net(rng)
    result = dx.rewrite(model, rank={"c1": 2, "c2": 3, "fc": 4, "*": 1})  # first match wins: c3 at 1
    ranks = {L.name: (L.kind, L.rank) for L in result.plan.layers}
    assert ranks == {"c1": ("kxk", 2), "c2": ("pointwise", 3), "c3": ("kxk", 1), "fc": ("linear", 4)}
    replayed = dx.apply_plan(model, None, dsrewrite.Plan.from_dict(result.plan.to_dict()))
    assert replayed.model.SerializeToString() == result.model.SerializeToString()
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(replayed.model, x), _run(result.model, x), rtol=0, atol=1e-6)


def test_calibrated_plan_replays_with_the_data(rng):
    model = _net(rng)
    data = rng.standard_normal((8, 3, 12, 12)).astype(np.float32)
    result = dx.rewrite(model, target_flops=0.4, calibration=data)
    assert result.plan.options["calibration"] is True  # said, not stored
    replayed = dx.apply_plan(model, None, result.plan, calibration=data)
    assert _layers(replayed.plan) == _layers(result.plan)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    want = _run(result.model, x)
    np.testing.assert_allclose(_run(replayed.model, x), want, rtol=0, atol=1e-6 * max(1.0, np.abs(want).max()))
    assert any(n.startswith("calibrated") for n in replayed.report.notes)
    plain = dx.apply_plan(model, None, result.plan)  # without the data: the plan's ranks, SVD factors
    assert [L.rank for L in plain.report.layers] == [L.rank for L in result.report.layers]


def test_mismatched_model_refused_in_one_line(rng):
    plan = dx.rewrite(_net(rng), rank=2).plan
    with pytest.raises(DsrewriteError) as e:
        dx.apply_plan(_net(rng, mid=12), None, plan)  # c2 and c3 have other weight shapes
    msg = str(e.value)
    assert "\n" not in msg and "does not fit" in msg and "'c2'" in msg and "[12, 8, 1, 1]" in msg
    smaller = _net(rng)
    del smaller.graph.node[-1]  # no Gemm: the plan's layer 'fc' is missing
    smaller.graph.output[0].name = "f"
    with pytest.raises(DsrewriteError, match=r"layer 'fc' of the plan is not in the model"):
        dx.apply_plan(smaller, None, plan)


def test_bad_plans_and_options_refused(tmp_path, rng):
    import torch

    model = _net(rng)
    plan = dx.rewrite(model, rank=2).plan
    with pytest.raises(DsrewriteError, match="does not take 'rank'"):
        dx.apply_plan(model, None, plan, rank=3)
    with pytest.raises(DsrewriteError, match="dsrewrite.onnx.apply_plan"):  # the torch route points here
        dsrewrite.apply_plan(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), plan, torch.randn(1, 3, 8, 8))
    torch_plan = dsrewrite.rewrite(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8),
                                   rank=1, measure_time=False).plan
    with pytest.raises(DsrewriteError, match="dsrewrite.apply_plan"):
        dx.apply_plan(model, None, torch_plan)
    with pytest.raises(DsrewriteError, match="plan file not found"):
        dx.apply_plan(model, None, tmp_path / "missing.json")
    with pytest.raises(DsrewriteError, match="must be a dsrewrite.Plan"):
        dx.apply_plan(model, None, {"layers": []})


def test_cli_save_plan_then_plan(tmp_path, rng):
    from dsrewrite.cli import main

    src = tmp_path / "net.onnx"
    onnx.save(_net(rng), str(src))
    a, b, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    assert main(["rewrite", str(src), "-o", str(a), "--target-flops", "0.5", "--ragged", "--save-plan", str(plan),
                 "--no-time", "-q"]) == 0
    assert main(["rewrite", str(src), "-o", str(b), "--plan", str(plan), "-q"]) == 0
    assert onnx.load(str(a)).graph == onnx.load(str(b)).graph
    assert _layers(dsrewrite.Plan.load(plan)) == _layers(dx.apply_plan(str(src), None, plan).plan)

