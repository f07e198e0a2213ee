"""Bad input to the ONNX route: one-line DsrewriteError, CLI exit code 2 without a traceback, the source
file never changed; and the CLI's happy path (report files, exit 0)."""
import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsrewrite.cli import main
from dsrewrite.errors import DsrewriteError
from dsrewrite.onnx import rewrite
from tests.conftest import np_rng


def small_model(opset: int = 17, batch=1) -> onnx.ModelProto:
    w = np_rng().standard_normal((8, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8])],
                              initializer=[numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.onnx"
    onnx.save(small_model(), str(path))
    return path


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is a text file, not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    broken = small_model()
    broken.graph.node[0].input[0] = "nowhere"  # refers to a tensor nothing produces
    unchecked = tmp_path / "unchecked.onnx"
    unchecked.write_bytes(broken.SerializeToString())
    future = small_model()
    future.opset_import[0].version = onnx.defs.onnx_opset_version() + 10
    newer = tmp_path / "future_opset.onnx"
    newer.write_bytes(future.SerializeToString())
    return {
        not_onnx: "not an ONNX model", truncated: "not an ONNX model", empty: "not an ONNX model",
        unchecked: "fails onnx.checker", newer: "cannot be expressed", tmp_path / "missing.onnx": "not found",
    }


def test_bad_files_give_one_line_errors(tmp_path, good):
    for path, message in _bad_files(tmp_path, good).items():
        before = digest(path) if path.exists() else None
        with pytest.raises(DsrewriteError, match=message) as e:
            rewrite(str(path), str(tmp_path / "out.onnx"))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out.onnx").exists()
        assert (digest(path) if path.exists() else None) == before


def test_cli_bad_files_exit_2_without_traceback(tmp_path, good, capsys):
    for path, message in _bad_files(tmp_path, good).items():
        assert main(["rewrite", str(path), "-o", str(tmp_path / "out.onnx"), "-q", "--no-time"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsrewrite: error: ") and message in err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_source_is_never_overwritten_unless_asked(tmp_path, good, capsys):
    before = digest(good)
    with pytest.raises(DsrewriteError, match="refusing to overwrite"):
        rewrite(str(good), str(good))
    os.symlink(good, tmp_path / "alias.onnx")
    with pytest.raises(DsrewriteError, match="refusing to overwrite"):
        rewrite(str(good), str(tmp_path / "alias.onnx"))
    assert main(["rewrite", str(good), "-o", str(good), "-q", "--no-time"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["rewrite", str(good), "-q", "--no-time"]) == 2  # -o is required for ONNX
    assert "-o/--out is required" in capsys.readouterr().err
    assert digest(good) == before
    # with --overwrite: replaced by a valid rewritten model, no temporary files left behind
    assert main(["rewrite", str(good), "-o", str(good), "--overwrite", "--rank", "2", "-q", "--no-time"]) == 0
    assert digest(good) != before
    ops = [n.op_type for n in onnx.load(str(good)).graph.node]
    assert ops == ["Conv", "Conv"]
    assert sorted(os.listdir(tmp_path)) == ["alias.onnx", "good.onnx"]


def test_model_proto_is_not_mutated():
    model = small_model()
    before = model.SerializeToString()
    new, report = rewrite(model, rank=2)
    assert model.SerializeToString() == before
    assert len(report.rewritten) == 1 and len(new.graph.node) == 2


def test_bad_arguments(tmp_path, good):
    with pytest.raises(DsrewriteError, match="rank"):
        rewrite(str(good), rank=0)
    with pytest.raises(DsrewriteError, match="src must be"):
        rewrite(123)
    with pytest.raises(DsrewriteError, match="output folder does not exist"):
        rewrite(str(good), str(tmp_path / "no" / "such" / "dir.onnx"))
    assert main(["rewrite", str(good), "-o", str(tmp_path / "o.onnx"), "--weights", "w.pt", "-q"]) == 2


def test_cli_writes_model_and_reports(tmp_path, good, capsys):
    assert main(["rewrite", str(good), "-o", str(tmp_path / "o.onnx"), "--input-shape", "2,4,8,8", "-q"]) == 2
    assert "static size 1 in dim 0" in capsys.readouterr().err  # a static batch cannot be changed
    onnx.save(small_model(batch="N"), str(good))
    out, rep, md = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "r.md"
    code = main(["rewrite", str(good), "-o", str(out), "--rank", "2", "--report", str(rep), "--markdown", str(md),
                 "--input-shape", "2,4,8,8"])
    assert code == 0
    text = capsys.readouterr().out
    assert "/conv/Conv" in text and f"wrote {out}" in text and "onnxruntime" in text  # latency measured
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(rep.read_text())
    assert data["route"] == "onnx" and data["input_shapes"] == [[2, 4, 8, 8]]
    layer = data["layers"][0]
    assert layer["rewritten"] and layer["rank"] == 2
    # --input-shape sets the batch: FLOPs of the original over 2 samples, 2 x (8*4*9) MACs per position
    assert data["flops_before"] == 2 * 2 * 8 * 8 * 8 * 4 * 9 and not data["flops_per_sample"]
    assert data["time_before_ms"] > 0 and data["time_after_ms"] > 0
    assert "# dsrewrite report" in md.read_text()


def test_broken_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(small_model(), str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    side = tmp_path / "ext.bin"
    side.write_bytes(side.read_bytes()[:100])  # truncated side file
    with pytest.raises(DsrewriteError, match="cannot read the external data"):
        rewrite(str(path), str(tmp_path / "out.onnx"))
    side.unlink()  # missing side file
    with pytest.raises(DsrewriteError, match="cannot read the external data"):
        rewrite(str(path), str(tmp_path / "out.onnx"))
    assert not (tmp_path / "out.onnx").exists()


def test_cli_flags_the_onnx_route_cannot_honour_are_refused(tmp_path, good, capsys):
    (tmp_path / "empty").mkdir()
    cases = [(["-o", str(tmp_path / "out.pt2")], "is an .onnx file"),
             (["-o", str(tmp_path / "out.onnx"), "--latency-cache", str(tmp_path / "c.json")],
              "--latency-cache is not supported"),
             (["-o", str(tmp_path / "out.onnx"), "--calibration", str(good)], "calibration file must be .npy"),
             (["-o", str(tmp_path / "out.onnx"), "--calib-mean", "0.5"], "--calib-mean applies to calibration"),
             (["-o", str(tmp_path / "out.onnx"), "--calibration", str(tmp_path / "empty")], "no images"),
             (["-o", str(tmp_path / "nowhere" / "out.onnx")], "output folder does not exist")]
    for extra, msg in cases:
        assert main(["rewrite", str(good), *extra, "--no-time", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def two_conv_model(h="H", w="W") -> onnx.ModelProto:
    """x -> Conv(4->16, 3x3) -> Relu -> Conv(16->16, 3x3), spatial dims symbolic by default."""
    rng = np_rng()
    w1 = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="/c1/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="/relu/Relu"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="/c2/Conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, h, w])],
                              initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_symbolic_spatial_dims_rewrite_without_input_shapes():
    model, report = rewrite(two_conv_model(), rank=2)
    assert len(report.rewritten) == 2
    assert any("symbolic dims" in n for n in report.notes)
    onnx.checker.check_model(model, full_check=True)


def test_budgets_reach_the_onnx_route():
    model = two_conv_model(16, 16)
    _, plain = rewrite(model, rank=2)
    _, budget = rewrite(model, target_flops=0.5)
    assert budget.flops_after <= 0.5 * budget.flops_before < plain.flops_before
    _, params = rewrite(model, target_params=0.6)
    assert params.params_after <= 0.6 * params.params_before
    with pytest.raises(DsrewriteError, match="not achievable"):
        rewrite(model, target_flops=0.01, strict=True)
    _, cheapest = rewrite(model, target_flops=0.01)  # best effort: the cheapest plan, said first
    assert cheapest.notes[0].startswith("target_flops=0.01 NOT MET: the smallest reachable is")
    assert 0.01 < cheapest.flops_after / cheapest.flops_before < 1
    with pytest.raises(DsrewriteError, match="unknown shapes"):
        rewrite(two_conv_model(), target_flops=0.5)
