"""The CLI's option-value errors are one ``dsrewrite: error:`` line (argparse's own too: no usage block), shapes
are parsed strictly, and a FLOPs line that is a partial count (an ONNX model with symbolic dims, no
--input-shape) says so on the line itself, in the terminal, Markdown and JSON reports."""
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsrewrite.cli import build_parser, main

pytest.importorskip("onnx")


def one_error_line(args, capsys) -> str:
    """Run the CLI; assert it failed with exactly one ``dsrewrite: error:`` line on stderr, nothing on stdout."""
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 2, (out, err)
    assert out == "" and "usage:" not in err and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsrewrite: error: "), err
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["rewrite", "m.onnx", "-o", "o.onnx", "--rank", "0"], ["--rank", "rank must be >= 1, got 0"]),
    (["rewrite", "m.onnx", "-o", "o.onnx", "--rank", "two"], ["--rank", "'two'"]),
    (["rewrite", "m.onnx", "--target-flops", "1.5"], ["--target-flops", "'1.5'", "(0, 1]"]),
    (["rewrite", "m.onnx", "--target-latency", "0"], ["--target-latency", "'0'"]),
    (["rewrite", "m.onnx", "--backend", "cuda"], ["--backend", "invalid choice: 'cuda'"]),
    (["rewrite", "m.onnx", "--calib-max-images", "many"], ["--calib-max-images", "invalid int value: 'many'"]),
    (["rewrite", "m.onnx", "--ort-threads", "1.5"], ["--ort-threads", "'1.5'"]),
    (["rewrite", "m.onnx", "--calib-mean", "a,b"], ["--calib-mean", "'a,b'"]),
    (["rewrite", "m.onnx", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["rewrite", "m.onnx", "--rank"], ["--rank", "expected one argument"]),
    (["rewrite", "--rank", "2"], ["required: src"]),
    (["rewrit", "m.onnx"], ["invalid choice: 'rewrit'"]),
    (["report", "r.json", "--format", "html"], ["--format", "invalid choice: 'html'"]),
    (["--debug", "rewrite", "m.onnx", "--rank", "-1"], ["--rank"]),
])
def test_option_value_errors_are_one_line(args, words, capsys):
    line = one_error_line(args, capsys)
    assert all(w in line for w in words), line


def test_one_line_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "dsrewrite", "rewrite", "m.onnx", "--target-flops", "1.5"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["dsrewrite: error: argument --target-flops: expected a fraction in (0, 1], "
                                     "got '1.5'"]


@pytest.mark.parametrize("args", [[], ["rewrite"], ["report"], ["--debug", "rewrite"]])
def test_usage_without_arguments(args, capsys):
    """The usage is for ``--help`` and for no arguments (a command alone shows that command's)."""
    assert main(args) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: dsrewrite") and (not args or f"usage: dsrewrite {args[-1]}" in out)


@pytest.mark.parametrize("text, bad", [
    ("1,x,2", "'x' is not a positive integer"),  # was read as (1, 2)
    ("1,3,,8", "an empty item"),
    ("1,3,8,", "an empty item"),
    ("1,3,0,8", "'0' is not a positive integer"),
    ("1,3,-8,8", "'-8' is not a positive integer"),
    ("1,3,8.5,8", "'8.5' is not a positive integer"),
    ("1x3,8,8", "'1x3' is not a positive integer"),
    ("x=1x3x8xx8", "an empty item"),
    ("", "an empty item"),
])
def test_input_shape_is_parsed_strictly(text, bad, capsys):
    line = one_error_line(["rewrite", "m.onnx", "-o", "o.onnx", "--input-shape", text], capsys)
    assert f"got {text!r} ({bad})" in line and "--input-shape" in line, line


@pytest.mark.parametrize("text, expected", [
    ("1,3,224,224", (None, (1, 3, 224, 224))),
    ("1x3x224x224", (None, (1, 3, 224, 224))),
    (" 1, 3, 8, 8 ", (None, (1, 3, 8, 8))),
    ("x=1x3x8x8", ("x", (1, 3, 8, 8))),
    ("images=2,3,32,48", ("images", (2, 3, 32, 48))),
])
def test_good_input_shapes(text, expected):
    a = build_parser().parse_args(["rewrite", "m.onnx", "--input-shape", text])
    assert a.input_shape == [expected]


# ------------------------------------------------------------------------------- partial FLOPs on the line
class TwoInputs(nn.Module):
    """One conv on an input of static shape, one on an input with symbolic H and W."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, z):
        return self.a(x), self.b(z)


def conv_flops(conv: nn.Module, shape) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        conv(torch.randn(*shape))
    return int(c.get_total_flops())


@pytest.fixture
def symbolic_model(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    path = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 16, 16)), str(path), dynamo=False,
                          input_names=["x", "z"], dynamic_axes={"z": {2: "h", 3: "w"}}, opset_version=17)
    return model, path


def flops_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "FLOPs" in line and "(2 x MACs" in line]
    return line


def test_partial_flops_line_says_so(symbolic_model, tmp_path, capsys):
    model, path = symbolic_model
    rep, md = tmp_path / "r.json", tmp_path / "r.md"
    code = main(["rewrite", str(path), "-o", str(tmp_path / "o.onnx"), "--rank", "full", "--no-time",
                 "--report", str(rep), "--markdown", str(md)])
    assert code == 0
    counted = conv_flops(model.a, (1, 3, 8, 8))  # only the static input's conv has known shapes
    data = json.loads(rep.read_text())
    assert data["flops_before"] == counted
    assert data["flops_partial"] == "1 of 2 convs counted; give input_shapes / --input-shape"
    for text in (capsys.readouterr().out, md.read_text()):
        line = flops_line(text)
        assert "partial: 1 of 2 convs counted; give input_shapes / --input-shape" in line, line
        assert "27.65k" in line  # the partial number itself, still shown
    assert counted == 27648


def test_complete_flops_line_is_not_partial(symbolic_model, tmp_path, capsys):
    model, path = symbolic_model
    rep = tmp_path / "r.json"
    code = main(["rewrite", str(path), "-o", str(tmp_path / "o.onnx"), "--rank", "full", "--no-time",
                 "--report", str(rep), "--input-shape", "x=1,3,8,8", "--input-shape", "z=1,3,16,16"])
    assert code == 0
    data = json.loads(rep.read_text())
    assert data["flops_partial"] is None
    assert data["flops_before"] == conv_flops(model.a, (1, 3, 8, 8)) + conv_flops(model.b, (1, 3, 16, 16))
    assert "partial" not in flops_line(capsys.readouterr().out)


def test_partial_flops_survive_the_json_round_trip(symbolic_model, tmp_path):
    from dsrewrite import Report
    from dsrewrite.onnx import rewrite

    _, path = symbolic_model
    _, report = rewrite(str(path), rank="full")
    again = Report.from_json(report.to_json())
    assert again.flops_partial == report.flops_partial == "1 of 2 convs counted; give input_shapes / --input-shape"
    assert flops_line(again.table()) == flops_line(report.table())
