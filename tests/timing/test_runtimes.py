"""The deploy runtime (issue 14): what models and layers are timed in (``runtime=`` eager, inductor,
onnxruntime), checked options, and numerically faithful runtime callables. No speed is asserted."""
import argparse
import re

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.config import RewriteConfig
from dsrewrite.errors import DsrewriteError
from dsrewrite.timing.runtimes import compiled, get_runtime


@pytest.fixture(autouse=True)
def scalar_inductor():
    """Inductor's C++ kernels without SIMD, as tests/dynamo/test_backend.py compiles them (a cold compile is
    about 3x faster; one process mixing both settings can reuse a cached header of the other and fail)."""
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1)).eval()


def test_runtime_option_is_checked():
    with pytest.raises(DsrewriteError, match="runtime must be one of eager, inductor, onnxruntime"):
        RewriteConfig(runtime="tensorrt")
    m, x = _cnn(), torch.randn(1, 3, 8, 8)
    with pytest.raises(DsrewriteError, match="ort_threads.*runtime='onnxruntime'"):
        dsrewrite.rewrite(m, x, rank=2, ort_threads=2)
    with pytest.raises(DsrewriteError, match="'memory_format'.*onnxruntime chooses"):
        dsrewrite.rewrite(m, x, rank=2, runtime="onnxruntime", memory_format="channels_last")
    with pytest.raises(DsrewriteError, match="'runtime'.*ONNX model is timed and deployed in onnxruntime"):
        RewriteConfig(runtime="eager").check_route("onnx")
    RewriteConfig(runtime="onnxruntime").check_route("onnx")
    with pytest.raises(DsrewriteError, match="'runtime'.*torch.compile"):
        RewriteConfig(runtime="inductor").check_route("torch.compile")
    with pytest.raises(DsrewriteError, match="runtime='inductor'"):  # the refusal says what to do instead
        RewriteConfig(target_latency=0.5).check_route("torch.compile")


@pytest.mark.parametrize("out, src, expected", [("m.onnx", "torchvision:resnet18", "onnxruntime"),
                                                ("m.pt2", "torchvision:resnet18", None),
                                                ("n.onnx", "m.onnx", None)])
def test_cli_runtime_follows_the_output(out, src, expected):
    ns = argparse.Namespace(src=src, out=out, runtime=None)
    assert RewriteConfig.from_cli(ns).runtime == expected
    ns.runtime = "inductor"
    assert RewriteConfig.from_cli(ns).runtime == "inductor"


def test_onnxruntime_runtime_runs_the_export_faithfully():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    res = dsrewrite.rewrite(m, x, rank=2, runtime="onnxruntime", ort_threads=1)
    rep = res.report
    assert re.match(r"onnxruntime [0-9.]+ \(CPUExecutionProvider, graph optimisation all, 1 intra-op threads; "
                    r"timed with idle pool threads sleeping", rep.time_runtime), rep.time_runtime
    assert rep.time_before_ms > 0 and rep.time_after_ms > 0
    assert any("deploy the .onnx export" in n for n in rep.notes)
    fn = get_runtime("onnxruntime", ort_threads=1).prepare(res.model, (x,))
    with torch.no_grad():
        ref = res.model(x)
    got = torch.from_numpy(fn(x)[0])
    assert (got - ref).norm() / ref.norm() < 1e-5  # fp32 export of the same model


def test_compiled_layers_of_one_class_never_fall_back_to_eager():
    """Dynamo recompiles a shared forward for each new shape and falls back to eager after its limit (8):
    the fx wrapper gives each compiled module a code object of its own."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    n = 10
    for i in range(n):
        conv = nn.Conv2d(2 + i, 3, 3, padding=1).eval()
        x = torch.randn(1, 2 + i, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(compiled(conv, 1)(x), conv(x), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before >= n


def test_inductor_runtime_times_compiled_models():
    torch.manual_seed(0)
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    rep = dsrewrite.rewrite(m, x, rank=2, runtime="inductor").report
    assert rep.time_runtime.startswith("torch.compile (Inductor)")
    assert rep.time_before_ms > 0 and rep.time_after_ms > 0
    assert any("torch.compile(model)" in n for n in rep.notes)
