"""The gathered depthwise form of a uniform pair (``gather_input=True``, dsrewrite/modules.py): the same
function as the grouped form over every conv setting, timed as a second form by LayerTimer, and kept through
the report, torch.compile and ONNX export."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dsrewrite
from dsrewrite import SeparableConv1d, SeparableConv2d
from dsrewrite.ir import ConvSpec
from dsrewrite.timing.layers import GATHER_MARGIN, LayerTimer
from dsrewrite.report import Report
from tests.conftest import rel_err
from tests.test_conv_settings import conv2d_case


def _random_conv(cls, case, g):
    conv = cls(**case).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return conv


@settings(max_examples=40, deadline=None)
@given(case=conv2d_case(), rank=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_gathered_equals_grouped_and_full_rank_conv(case, rank, seed):
    g = torch.Generator().manual_seed(seed)
    conv = _random_conv(nn.Conv2d, case, g)
    x = torch.randn(2, case["in_channels"], 17, 16, generator=g, dtype=torch.float64)
    grouped = SeparableConv2d.from_conv(conv, rank, backend="torch")
    gathered = SeparableConv2d.from_conv(conv, rank, backend="torch")
    gathered.gather_input = True
    assert rel_err(gathered(x), grouped(x)) < 1e-12  # same function at any rank
    full = SeparableConv2d.from_conv(conv, conv.weight[0, 0].numel(), backend="torch")
    full.gather_input = True
    assert rel_err(full(x), conv(x)) < 1e-10  # and exact at full rank


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_gathered_conv1d(gen, padding_mode):
    conv = _random_conv(nn.Conv1d, dict(in_channels=5, out_channels=7, kernel_size=5, stride=2, padding=2,
                                        dilation=2, padding_mode=padding_mode), gen)
    x = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)
    sep = SeparableConv1d.from_conv(conv, 5, backend="torch")
    sep.gather_input = True
    assert rel_err(sep(x), conv(x)) < 1e-10
    assert "gather_input=True" in repr(sep)


def test_timer_times_both_forms_on_torch_ops(monkeypatch):
    from dsrewrite.timing import layers as latency

    monkeypatch.setattr(latency, "_CACHE", {})
    t = LayerTimer("cpu", reps=2, max_seconds=0.02)
    spec = ConvSpec(name="c", in_channels=8, out_channels=12, kernel=(3, 3), out_spatial=(6, 6))
    assert t.two_forms
    best = t.separable_ms(spec, 3)
    n = t.measured
    grouped, gathered = t.form_times(spec, 3)
    assert t.measured == n and t.key(spec, 3, True) != t.key(spec, 3, False)  # both forms in one measurement
    assert t.gathered(spec, 3) == (gathered < GATHER_MARGIN * grouped)
    assert best == (gathered if t.gathered(spec, 3) else grouped) and best > 0
    # one form only: rank 1 (the forms coincide) and ragged pairs (already gathered)
    assert t.form_times(spec, 1) is None and not t.gathered(spec, 1) and t.separable_ms(spec, 1) > 0
    assert not LayerTimer("cpu", ragged=True).two_forms


def _gathered_model(gen):
    m = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 6, 10, 10, generator=gen)
    res = dsrewrite.rewrite(m, x, rank=3, backend="torch", measure_time=False)
    ref = res.model(x)
    for mod in res.model.modules():
        if isinstance(mod, SeparableConv2d):
            mod.gather_input = True
    return res.model, x, ref


def test_gathered_model_compiles_and_exports(gen, tmp_path):
    model, x, ref = _gathered_model(gen)
    with torch.no_grad():
        out = model(x)
        assert rel_err(out, ref) < 1e-5
        # torch.compile on the CPU (aot_eager: no C++ toolchain needed) traces the gathered form
        assert rel_err(torch.compile(model, backend="aot_eager")(x), ref) < 1e-5
        # the CLI's exporters: torch.export (.pt2) and the dynamo ONNX exporter
        assert rel_err(torch.export.export(model, (x,)).module()(x), ref) < 1e-5
    import onnxruntime as ort

    path = tmp_path / "g.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(np.asarray(got)), ref) < 1e-5


def test_report_keeps_the_form():
    rep = Report(layers=[dsrewrite.report.LayerReport(name="a", rewritten=True, rank=2, gather_input=True)])
    back = Report.from_json(rep.to_json())
    assert back.layers[0].gather_input and back.layers[0].rank_text == "2 (gathered)"
