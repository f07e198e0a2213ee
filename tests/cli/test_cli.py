"""CLI: --help everywhere, rewrite -> .pt2 / report, bad input gives one line and a non-zero exit, --debug
before or after the command, -q prints nothing (third-party warnings included)."""
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dsrewrite import DsrewriteError, Report
from dsrewrite.cli import main, quiet_third_party
from tests.conftest import np_rng


def run(*args):
    p = subprocess.run([sys.executable, "-m", "dsrewrite", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("cmd", [[], ["rewrite"], ["report"], ["demo"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: dsrewrite" in capsys.readouterr().out


def test_rewrite_to_pt2_and_report(tmp_path, capsys):
    out, rep = tmp_path / "m.pt2", tmp_path / "r.json"
    code = main(["rewrite", "torchvision:resnet18", "-o", str(out), "--rank", "2", "--report", str(rep),
                 "--markdown", str(tmp_path / "r.md"), "--input-shape", "1,3,32,32", "--no-time", "-q"])
    assert code == 0 and out.exists() and (tmp_path / "r.md").exists()
    report = Report.from_json(rep)
    assert report.rewritten and all(L.rank == 2 for L in report.rewritten)
    ep = torch.export.load(str(out))
    x = torch.randn(1, 3, 32, 32)
    assert ep.module()(x).shape == (1, 1000)
    assert main(["report", str(rep), "--format", "markdown"]) == 0
    assert "| layer |" in capsys.readouterr().out


def test_factory_source_and_weights(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).state_dict(), tmp_path / "w.pt")
    (tmp_path / "mymodels.py").write_text(
        "import torch\ndef tiny():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))\n")
    script = os.path.join(os.path.dirname(sys.executable), "dsrewrite")  # the console script, as users run it
    p = subprocess.run([script, "rewrite", "mymodels:tiny", "--weights",
                        str(tmp_path / "w.pt"), "--input-shape", "1,3,8,8", "--rank", "full", "--no-time"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)  # no PYTHONPATH: cwd imports
    assert p.returncode == 0, p.stderr
    assert "rewritten" in p.stdout


@pytest.mark.parametrize("args, msg", [
    (["rewrite", "torchvision:resnet19"], "unknown torchvision model 'resnet19' (did you mean resnet18"),
    (["rewrite", "nosuchpkg_xyz:f"], "cannot import 'nosuchpkg_xyz'"),
    (["rewrite", "resnet18"], "model source must be"),
    (["rewrite", "torchvision:resnet18", "--input-shape", "1,5,32,32"], "example inputs do not run"),
    (["rewrite", "torchvision:resnet18", "-o", "x.txt"], "output must end in"),
    (["rewrite", "torchvision:resnet18", "--weights", "/nonexistent.pt"], "weights file not found"),
    (["report", "/nonexistent.json"], "report file not found"),
])
def test_bad_input_one_line_no_traceback(args, msg, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("dsrewrite: error:") and msg in lines[-1], err


def test_bad_rank_is_usage_error_in_a_real_process():
    code, _, err = run("rewrite", "torchvision:resnet18", "--rank", "0")
    assert code == 2 and "rank must be >= 1" in err and "Traceback" not in err
    code, _, err = run("rewrite", "torchvision:resnet18", "--input-shape", "1,5,32,32", "--no-time")
    assert code == 2 and err.strip().startswith("dsrewrite: error: example inputs do not run")


def test_rewrite_to_onnx_runs_in_onnxruntime(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert main(["rewrite", "torchvision:resnet18", "-o", str(out), "--rank", "full",
                 "--input-shape", "1,3,32,32", "--no-time", "-q"]) == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert sum(1 for o in ops if o == "Conv") == 20 + 17  # 20 convs, 17 of them became pairs

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # the batch axis is dynamic
        x = np_rng().standard_normal((n, 3, 32, 32)).astype(np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert y.shape == (n, 1000) and np.isfinite(y).all()


def test_error_without_a_message_is_still_one_line(tmp_path, capsys, monkeypatch):
    """An exception with an empty message (here from torch.load) gives its type name, not an IndexError."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a checkpoint")

    def fail(*a, **k):
        raise RuntimeError()

    monkeypatch.setattr(torch, "load", fail)
    code = main(["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--weights", str(weights)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"dsrewrite: error: cannot load weights from {weights}: RuntimeError", err


def test_first_line():
    from dsrewrite.errors import first_line

    assert first_line(ValueError("\n  first  \nsecond")) == "first"
    assert first_line(ValueError("")) == "ValueError" == first_line(ValueError(" \n "), typed=True)
    assert first_line(KeyError("k"), typed=True) == "KeyError: 'k'"
    assert first_line(ValueError("abcdef"), 3) == "abc"


@pytest.mark.parametrize("argv", [["--debug", "rewrite", "torchvision:resnet19"],
                                  ["rewrite", "torchvision:resnet19", "--debug"],
                                  ["report", "/nonexistent.json", "--debug"]])
def test_debug_before_or_after_the_command_raises(argv, capsys):
    with pytest.raises(DsrewriteError):
        main(argv)
    assert main([a for a in argv if a != "--debug"]) == 2  # without it: the one-line error
    assert capsys.readouterr().err.startswith("dsrewrite: error:")


def _noisy_onnx(path):
    """A conv whose weight is also listed as a graph input, and an initializer nothing reads: onnxruntime
    warns about both when it loads the model (the measured-time step does)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np_rng()
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    unused = rng.standard_normal((16,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(unused, "unused")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_quiet_onnx_rewrite_prints_nothing(tmp_path):
    """Real processes (onnxruntime logs from C++ to the stderr file descriptor): the same command prints
    onnxruntime's warnings without -q, and nothing at all with it."""
    src = tmp_path / "noisy.onnx"
    _noisy_onnx(src)
    code, out, err = run("rewrite", str(src), "-o", str(tmp_path / "loud.onnx"), "--rank", "2")
    assert code == 0 and "rewritten" in out
    assert "onnxruntime" in err, err  # the model does make noise
    code, out, err = run("rewrite", str(src), "-o", str(tmp_path / "quiet.onnx"), "--rank", "2", "-q")
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / "quiet.onnx").exists()
    code, out, err = run("rewrite", str(src), "-o", str(tmp_path / "x.txt"), "-q")  # errors still print
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("dsrewrite: error:")


def test_quiet_third_party_silences_and_restores(capsys, caplog):
    """onnx-graphsurgeon's logger (prints to stdout), Python logging below ERROR and warnings are silenced
    inside the block and back afterwards."""
    from onnx_graphsurgeon.logger import G_LOGGER

    def noise(tag):
        G_LOGGER.warning(f"gs {tag}")
        logging.getLogger("onnxscript").warning(f"log {tag}")
        warnings.warn(f"warn {tag}", UserWarning)

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party(onnx=True):
            noise("inside")
        assert not caught
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", "")
        noise("after")
        assert [str(w.message) for w in caught] == ["warn after"]
    assert "gs after" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records] == ["log after"]


def test_input_shape_by_name_for_a_multi_input_onnx_model(tmp_path, capsys):
    """--input-shape NAME=SHAPE once per input; an unnamed shape is refused with the input names."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["a", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["b"], ["m"], keepdims=0)],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, "H", "W"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, "H", "W"]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [])], [w])
    path = str(tmp_path / "two.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = str(tmp_path / "two_ds.onnx")
    assert main(["rewrite", path, "-o", out, "--rank", "2", "--input-shape", "a=1x4x9x9",
                 "--input-shape", "b=1x3", "--report", str(tmp_path / "r.json")]) == 0
    rep = Report.from_json(str(tmp_path / "r.json"))
    assert rep.input_shapes == [[1, 4, 9, 9], [1, 3]]
    assert rep.flops_before > 0 and rep.layer("conv").rewritten
    capsys.readouterr()
    assert main(["rewrite", path, "-o", out, "--overwrite", "--input-shape", "1x4x9x9"]) == 2
    err = capsys.readouterr().err
    assert "this model has 2 inputs (a, b): give --input-shape NAME=SHAPE once per input" in err
    assert main(["rewrite", "torchvision:resnet18", "--input-shape", "x=1x3x32x32", "--no-time", "-q"]) == 2
    assert "a torch model takes one --input-shape, without a name" in capsys.readouterr().err
