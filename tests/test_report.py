"""Report rendering: JSON round-trip, Markdown and terminal table carry the same numbers."""
import json

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite import DsrewriteError, Report


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
    assert data["schema"] == 1 and data["flops_before"] == report.flops_before
    assert {"name", "rewritten", "reason", "rank", "in_channels", "out_channels", "kernel", "params_before",
            "params_after", "flops_before", "flops_after", "error"} <= set(data["layers"][0])


def test_renderings_show_layers_totals_and_time(report):
    table, md = report.table(), report.to_markdown()
    for L in report.layers:
        assert L.name in table and L.name in md
    assert "skipped: 1x1 kernel" in table
    assert "FLOPs (2 x MACs)" in table and "MACs" in md
    assert "measured time" in table and "ms" in table
    assert md.count("\n|") >= len(report.layers) + 2


def test_bad_report_files(tmp_path):
    with pytest.raises(DsrewriteError, match="not found"):
        Report.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DsrewriteError, match="not valid JSON"):
        Report.from_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(DsrewriteError, match="not a dsrewrite report"):
        Report.from_json(tmp_path / "other.json")
