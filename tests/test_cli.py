"""CLI: --help everywhere, rewrite -> .pt2 / report, bad input gives one line and a non-zero exit."""
import os
import subprocess
import sys

import pytest
import torch

from dsrewrite import Report
from dsrewrite.cli import main


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

    x = np.random.default_rng().standard_normal((1, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert y.shape == (1, 1000) and np.isfinite(y).all()


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
