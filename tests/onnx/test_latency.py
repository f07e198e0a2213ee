"""target_latency on the ONNX route (issue 14): layers timed in onnxruntime by the same allocator, and the whole
model checked against the original in the same closed loop as the PyTorch route.

The onnxruntime timer itself runs for real on tiny layers (no speed asserted). The closed-loop tests use a
synthetic device (layer and whole-model times from the weights' shapes) so the plans are deterministic; there
the whole model runs each pair slower than the pair timed alone, as a real runtime can.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime")

from dsrewrite.cli import main  # noqa: E402
from dsrewrite.errors import DsrewriteError  # noqa: E402
from dsrewrite.ir import ConvSpec  # noqa: E402
from dsrewrite.onnx import rewrite  # noqa: E402
from dsrewrite.onnx import latency as olat  # noqa: E402
from tests.conftest import np_rng  # noqa: E402

HW = 16 * 16


def _model(path=None) -> onnx.ModelProto:
    """x[1, 8, 16, 16] -> Conv 8->64 -> Relu -> Conv 64->64 -> Relu -> Conv 64->64 (3x3, same padding)."""
    rng = np_rng()
    chans = [(64, 8), (64, 64), (64, 64)]
    nodes, inits, cur = [], [], "x"
    for i, (m, c) in enumerate(chans):
        inits.append(numpy_helper.from_array((rng.standard_normal((m, c, 3, 3)) / (3 * c ** 0.5)).astype(np.float32),
                                             f"w{i}"))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"/conv{i}/Conv", pads=[1, 1, 1, 1]))
        cur = f"c{i}"
        if i < len(chans) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"/relu{i}/Relu"))
            cur = f"r{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, 64, 16, 16])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is not None:
        onnx.save(model, str(path))
    return model


def _node_ms(macs: int) -> float:
    return 0.01 + 2 * macs * 1e-7


def _synthetic(monkeypatch, optimism=1.0, noise=0.0):
    """Layer times from the shapes; whole-model times from the graph's Conv nodes (depthwise and 1x1 nodes,
    i.e. the pairs, ``optimism`` times slower than the layer timer said)."""
    from dsrewrite.timing import measure

    monkeypatch.setattr(olat, "_CACHE", {})

    def layer(self, spec, rank):
        k = spec.kernel[0] * spec.kernel[1]
        if rank is None:
            return _node_ms(spec.out_channels * spec.in_channels * k * HW)
        c = spec.in_channels * rank
        return _node_ms(c * k * HW) + _node_ms(spec.out_channels * c * HW)

    monkeypatch.setattr(olat.OrtLayerTimer, "_measure_variants",
                        lambda self, spec, variants: [layer(self, spec, r) for r, _ in variants])

    def whole(model: onnx.ModelProto) -> float:
        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        t = 0.3
        for n in model.graph.node:
            if n.op_type != "Conv":
                continue
            w = shapes[n.input[1]]
            macs = int(np.prod(w)) * HW
            pair = w[1] == 1 or w[2:] == (1, 1)
            t += _node_ms(macs) * (optimism if pair else 1.0)
        return t

    calls = []
    real_session = olat.session

    def fake_compare(before, after, args, **kw):
        calls.append(1)
        return measure.Comparison(whole(before.model), whole(after.model), noise, 5)

    class Sess:  # a session that remembers its model, so the fake comparison can price it
        def __init__(self, model, *a, **k):
            self.model = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
            self.real = real_session(model, *a, **k)

        def run(self, *a, **k):
            return self.real.run(*a, **k)

    from dsrewrite.onnx import measure as omeasure

    monkeypatch.setattr(omeasure, "session", Sess)
    monkeypatch.setattr(measure, "compare", lambda b, a, args, **kw: fake_compare(b.__self__, a.__self__, args))
    return calls


def test_ort_layer_timer_times_a_conv_and_its_pair():
    """The real timer: positive times, cached per shape, and the timing models are valid ONNX of the right shape."""
    spec = ConvSpec(name="c", in_channels=6, out_channels=10, kernel=(3, 3), out_spatial=(7, 7), batch=2, bias=True)
    rng = np.random.default_rng(0)
    for model, shape in (olat.conv_model(spec, rng), olat.pair_model(spec, 2, rng)):
        onnx.checker.check_model(model, full_check=True)
        sess = olat.session(model)
        y = sess.run(None, {"x": rng.standard_normal(shape).astype(np.float32)})[0]
        assert y.shape == (2, 10, 7, 7)
    t = olat.OrtLayerTimer(reps=2, max_seconds=0.05)
    a = t.dense_ms(spec)
    n = t.measured
    b = t.separable_ms(spec, 2)  # timed side by side with the dense conv, in the same measurement
    assert a > 0 and b > 0 and t.measured == n
    assert t.dense_ms(spec) == a and t.separable_ms(spec, 2) == b and t.measured == n


def test_onnx_target_latency_closed_loop(monkeypatch, tmp_path):
    """Pairs 1.5x slower in the whole model than alone: the first plan misses on the whole model, the second
    (layer timings scaled) meets the target; the output is valid ONNX that runs, and the report says where the
    time was measured and lists both plans."""
    import onnxruntime as ort

    calls = _synthetic(monkeypatch, optimism=1.5)
    model = _model()
    res = rewrite(model, str(tmp_path / "out.onnx"), target_latency=0.5)
    rep = res.report
    rounds = rep.latency_rounds
    assert len(rounds) >= 2 and len(calls) == len(rounds)
    assert rounds[0]["planned"] <= 0.5 + 1e-9 < rounds[0]["measured"]
    kept = [r for r in rounds if r.get("kept")]
    assert len(kept) == 1 and kept[0]["measured"] <= 0.5 and kept[0]["scale"] > 1
    assert rep.time_ratio == pytest.approx(kept[0]["measured"])
    assert "onnxruntime" in rep.time_runtime and rep.rewritten
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
    x = np_rng().standard_normal((1, 8, 16, 16)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.shape == (1, 64, 16, 16) and np.isfinite(y).all()
    assert "latency plan 2:" in rep.table()


def test_onnx_target_latency_refused_when_no_plan_reaches_it(monkeypatch):
    _synthetic(monkeypatch, optimism=6.0, noise=0.02)
    with pytest.raises(DsrewriteError, match=r"target_latency=0\.5 not reached on the whole model, and no plan was "
                                             r"measured faster than the original: best measured [0-9.]+x \(noise \+-0\.02\)"):
        rewrite(_model(), target_latency=0.5)


def test_onnx_target_latency_shapes(monkeypatch):
    """A symbolic batch is planned at batch 1 and the report says so; symbolic image sizes are refused."""
    _synthetic(monkeypatch, optimism=1.0)
    model = _model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    rep = rewrite(model, target_latency=0.6).report
    assert any("planned and measured at batch 1" in n for n in rep.notes), rep.notes
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(DsrewriteError, match="needs static input shapes"):
        rewrite(model, target_latency=0.5)


def test_cli_onnx_target_latency(monkeypatch, tmp_path, capsys):
    _synthetic(monkeypatch, optimism=1.0)
    src = tmp_path / "m.onnx"
    _model(src)
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    assert main(["rewrite", str(src), "-o", str(out), "--target-latency", "0.6", "--report", str(report)]) == 0
    assert out.exists()
    text = capsys.readouterr().out
    assert "latency plan 1:" in text and "<- kept" in text, text
    import json

    assert json.loads(report.read_text())["latency_rounds"][0]["kept"]


def test_timed_sessions_sleep_instead_of_spinning(monkeypatch):
    """Every session the ONNX route times beside another (whole models, layers) has spinning pool threads off:
    one session's spinning pool takes the cores from the other's run and scatters the per-round ratios."""
    from dsrewrite.onnx import measure as omeasure

    made = []
    real = omeasure.session

    def spinning(s) -> str:
        try:
            return s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return "default"

    def recording(*args, **kwargs):
        s = real(*args, **kwargs)
        made.append((kwargs.get("once", False), spinning(s)))
        return s

    monkeypatch.setattr(omeasure, "session", recording)
    monkeypatch.setattr(olat, "session", recording)
    rep = rewrite(_model(), rank=2, measure_time=True, ort_threads=1).report
    assert "idle pool threads sleeping" in rep.time_runtime
    olat.OrtLayerTimer(threads=1, reps=2).dense_ms(ConvSpec(name="c", in_channels=4, out_channels=8, kernel=(3, 3),
                                                            out_spatial=(6, 6)))
    timed = [spin for once, spin in made if not once]
    assert len(timed) >= 3 and all(spin == "0" for spin in timed), made
    assert spinning(real(_model().SerializeToString())) == "default"  # sessions not timed keep the default


def test_onnxruntime_session_options(tmp_path, capsys):
    """The sessions the ONNX route times in follow ort_threads / ort_optimization / ort_provider and the report
    says which; bad values, a provider onnxruntime lacks and the options on the PyTorch route are refused in
    one line."""
    import torch

    import dsrewrite

    rep = rewrite(_model(), rank=2, measure_time=True, ort_threads=1, ort_optimization="basic").report
    assert rep.time_ratio is not None and rep.time_noise is not None
    assert "graph optimisation basic" in rep.time_runtime and "1 intra-op threads" in rep.time_runtime
    assert "onnxruntime" in rep.table()
    with pytest.raises(DsrewriteError, match="onnxruntime has no NoSuchExecutionProvider here"):
        rewrite(_model(), rank=2, measure_time=True, ort_provider="NoSuchExecutionProvider")
    for bad, msg in ((dict(ort_threads=0), "ort_threads must be an int >= 1"),
                     (dict(ort_optimization="max"), "ort_optimization must be one of disable, basic")):
        with pytest.raises(DsrewriteError, match=msg):
            rewrite(_model(), rank=2, **bad)
    with pytest.raises(DsrewriteError, match="'ort_threads' is not supported by the PyTorch route"):
        dsrewrite.rewrite(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), ort_threads=2)
    assert main(["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--ort-threads", "2",
                 "--no-time", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ort-threads is not supported for PyTorch models" in err and len(err.splitlines()) == 1
