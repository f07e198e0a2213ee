"""Report rendering: JSON round-trip, Markdown and terminal table carry the same numbers."""
import dataclasses
import json

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite import DsrewriteError, Report
from dsrewrite.report import LayerReport


@pytest.fixture
def report(gen):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 8, 1)).eval()
    return dsrewrite.rewrite(model, torch.randn(1, 3, 16, 16, generator=gen), rank=2).report


def test_json_round_trip(report, tmp_path):
    text = report.to_json(tmp_path / "r.json")
    back = Report.from_json(text)
    assert back == report
    assert Report.from_json(tmp_path / "r.json") == report
    data = json.loads(text)
    assert data["schema"] == 2 and data["flops_before"] == report.flops_before
    assert {"name", "rewritten", "reason", "rank", "in_channels", "out_channels", "kernel", "params_before",
            "params_after", "flops_before", "flops_after", "error", "kind", "origin"} <= set(data["layers"][0])


def test_renderings_show_layers_totals_and_time(report):
    table, md = report.table(), report.to_markdown()
    for L in report.layers:
        assert L.name in table and L.name in md
    assert "skipped: 1x1 conv: kind 'pointwise' not chosen" in table
    assert "FLOPs (2 x MACs)" in table and "MACs" in md
    assert md.count("\n|") >= len(report.layers) + 2


def test_measured_time_line_only_when_measured(report):
    timed = dataclasses.replace(report, time_before_ms=2.0, time_after_ms=1.5, time_device="cpu",
                                time_backend=None, time_runtime=None, time_noise=None, time_median_ratio=None)
    untimed = dataclasses.replace(report, time_before_ms=None, time_after_ms=None)
    for text in (timed.table(), timed.to_markdown()):
        assert "measured time (cpu): 2.00 ms -> 1.50 ms (0.75x the original's time)" in text
    where = dataclasses.replace(timed, time_runtime="PyTorch eager, channels_last", time_noise=0.031)
    assert ("measured time (cpu, PyTorch eager, channels_last): 2.00 ms -> 1.50 ms (0.75x the original's time, "
            "noise +-0.03)") in where.table()
    median = dataclasses.replace(where, time_median_ratio=0.781)
    assert "(0.75x the original's time, noise +-0.03; median per round 0.78x)" in median.table()
    for text in (untimed.table(), untimed.to_markdown()):
        assert "measured time" not in text and " ms ->" not in text and "time: not measured" in text


def _unknown_shape_report() -> Report:
    """One conv with known FLOPs, one whose output shape is unknown (FLOPs 0 in memory, by convention)."""
    known = LayerReport("known", True, rank=2, in_channels=4, out_channels=8, kernel=(3, 3), stride=(1, 1),
                        params_before=296, params_after=144, flops_before=36864, flops_after=17408, error=0.5)
    unknown = LayerReport("unknown", True, rank=2, in_channels=8, out_channels=8, kernel=(3, 3), stride=(1, 1),
                          params_before=584, params_after=280, error=0.4)
    skipped = LayerReport("skipped_unknown", False, reason="1x1 kernel", in_channels=8, out_channels=8,
                          kernel=(1, 1), stride=(1, 1), params_before=64)
    return Report(layers=[known, unknown, skipped], model="m", route="onnx", params_before=944, params_after=488,
                  flops_before=36864, flops_after=17408)


def _row(text: str, name: str) -> list:
    (line,) = [ln for ln in text.splitlines() if ln.strip(" |").startswith(name + " ")]
    return [c.strip() for c in (line.strip("|").split("|") if line.startswith("|") else line.split("  ")) if c.strip()]


def test_unknown_flops_print_as_question_mark_and_null(tmp_path):
    r = _unknown_shape_report()
    for text in (r.table(), r.to_markdown()):
        assert _row(text, "known")[5:7] == ["36.86k->17.41k", "47.2%"]
        assert _row(text, "unknown")[5:7] == ["?", "?"]
        assert _row(text, "skipped_unknown")[5] == "?"
    data = json.loads(r.to_json())
    assert [(L["flops_before"], L["flops_after"]) for L in data["layers"]] == [(36864, 17408), (None, None),
                                                                             (None, None)]
    assert data["flops_before"] == 36864  # the total counts what is known (the ONNX route adds a note)
    assert Report.from_json(r.to_json()) == r
    assert Report.from_json(r.to_json()).table() == r.table()
    r.flops_before = r.flops_after = 0  # nothing known: the totals are unknown too, not 0
    assert "FLOPs (2 x MACs): ? (unknown shapes)" in r.table()
    data = json.loads(r.to_json())
    assert data["flops_before"] is None and data["flops_after"] is None
    assert Report.from_json(r.to_json()) == r


def test_bad_report_files(tmp_path):
    with pytest.raises(DsrewriteError, match="not found"):
        Report.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DsrewriteError, match="not valid JSON"):
        Report.from_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(DsrewriteError, match="not a dsrewrite report"):
        Report.from_json(tmp_path / "other.json")
