"""torch.compile backend (dsrewrite.dynamo.backend): the compiled model equals rewrite() + eager at the same rank
(and the original at full rank), recompiles for new shapes reuse the factors, weights changed after compile are
refactorised, training is refused, options are checked at once, and backend="dsrewrite" needs no import.

Tolerance: TOL = 1e-4 relative L2 error of the output. Same rank means the same factors (one factorisation), so
compiled vs eager differs only by Inductor's float32 reordering (about 1e-7 measured); at full rank the float32
factors of a float64 SVD reproduce the original to about 1e-6.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dsrewrite
import dsrewrite.plan.planner
from dsrewrite import DsrewriteError
from dsrewrite.dynamo.backend import DsrewriteBackend, last_report
from tests.conftest import ROOT, rel_err

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: a fresh Dynamo and plan cache per test


def randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh init has mean 0, var 1: too easy)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(1 + 0.2 * torch.rand(n, generator=gen))
    return model


class Net(nn.Module):
    """Every kind of conv the backend meets: with/without bias, strided, depthwise (skipped), one module called
    twice (rewritten once), a functional conv on a weight computed at run time (skipped, with its reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.w = nn.Parameter(0.1 * torch.randn(16, 16, 3, 3))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.c1(x)))
        x = self.dw(self.c2(x))
        x = self.shared(F.relu(self.shared(x)))
        x = F.conv2d(x, self.w * 2.0, None, 1, 1)
        return self.fc(x.mean((2, 3)))


def small(gen: torch.Generator) -> nn.Module:
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return randomise_bn(model, gen).eval()


def causes(e: BaseException) -> list:
    """The exception and its causes (Dynamo wraps backend errors in BackendCompilerFailed)."""
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or getattr(e, "inner_exception", None)
    return out


@pytest.mark.parametrize("name, rank", [("resnet18", 2), ("mobilenet_v2", 3)])
def test_compiled_equals_rewrite_and_full_rank_equals_original(name, rank, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = randomise_bn(torchvision.models.get_model(name, weights=None), gen).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref = dsrewrite.rewrite(model, x, rank=rank, measure_time=False)
        compiled = dsrewrite.compile(model, rank=rank)
        assert rel_err(compiled(x), ref.model(x)) < TOL
        full = dsrewrite.compile(model, rank="full")
        assert rel_err(full(x), model(x)) < TOL
    rep, want = compiled.dsrewrite_reports[0], ref.report
    assert rep.route == "torch.compile" and any("compile time" in n for n in rep.notes)
    # the same convs under the same names, the same decisions and ranks, the same FLOP accounting
    assert [(L.name, L.rewritten, L.rank, L.reason) for L in rep.layers] == \
        [(L.name, L.rewritten, L.rank, L.reason) for L in want.layers]
    assert rep.rewritten and (rep.flops_before, rep.flops_after) == (want.flops_before, want.flops_after)
    assert len(full.dsrewrite_reports[0].rewritten) == len(rep.rewritten)


def test_new_batch_size_recompiles_without_refactorising(monkeypatch, gen):
    calls = []
    real = dsrewrite.plan.planner.factorize_layer
    monkeypatch.setattr(dsrewrite.plan.planner, "factorize_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = small(gen)
    x2, x5 = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(5, 3, 16, 16, generator=gen)
    with torch.no_grad():
        compiled = dsrewrite.compile(model, rank=2)
        y2 = compiled(x2)
        first = len(calls)
        y5 = compiled(x5)
        second = len(calls)
        ref = dsrewrite.rewrite(model, x2, rank=2, measure_time=False).model
        assert rel_err(y2, ref(x2)) < TOL and rel_err(y5, ref(x5)) < TOL
    r2, r5 = compiled.dsrewrite_reports
    assert first == len(r2.rewritten) == 3  # c1, c2, shared (called twice, factorised once)
    assert second == first  # Dynamo recompiled for batch 5 (second report), nothing was factorised again
    assert any("reused" in n for n in r5.notes)
    assert r5.flops_before * 2 == r2.flops_before * 5  # the recompile's report counts its own shapes
    reasons = {L.name: L.reason for L in r2.skipped}
    assert reasons["dw"].startswith("already depthwise") and "not a parameter" in next(
        r for n, r in reasons.items() if n != "dw")


def test_weight_changed_after_compile_is_refactorised(gen):
    model = small(gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        compiled = dsrewrite.compile(model, rank=2)
        before = compiled(x)
        model.c2.weight.mul_(-0.5)  # in place: Dynamo sees the same input and does not recompile
        model.shared.bias.add_(0.3)
        with pytest.warns(UserWarning, match="recomputed at the compiled ranks"):
            got = compiled(x)
        want = dsrewrite.rewrite(model, x, rank=2, measure_time=False).model(x)
    assert len(compiled.dsrewrite_reports) == 1  # no recompile: the call-time check caught the change
    assert rel_err(want, before) > 1e-2  # the change matters, so stale factors would fail the next line
    assert rel_err(got, want) < TOL


def test_training_is_refused_with_the_way_out(gen):
    model = small(gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    compiled = dsrewrite.compile(model, rank=2, compiler="eager")
    with pytest.raises(Exception) as info:
        compiled(x)  # grad enabled and weights require grad
    err = next(e for e in causes(info.value) if isinstance(e, DsrewriteError))
    assert "inference-only" in str(err) and "dsrewrite.rewrite" in str(err) and "\n" not in str(err)
    with torch.no_grad():
        assert compiled(x).shape == (2, 5)  # the same compiled model under no_grad: fine


def test_budgets_and_calibration_match_rewrite(gen):
    model = small(gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    cal = torch.randn(8, 3, 16, 16, generator=gen)
    with torch.no_grad():
        for kw in ({"target_flops": 0.7}, {"target_params": 0.6}, {"energy": 0.6},
                   {"target_flops": 0.7, "calibration": cal}):
            ref = dsrewrite.rewrite(model, x, measure_time=False, **kw)
            compiled = dsrewrite.compile(model, compiler="eager", **kw)
            got = compiled(x)
            rep = compiled.dsrewrite_reports[0]
            assert rep.rewritten, kw
            assert [L.rank for L in rep.layers] == [L.rank for L in ref.report.layers], kw
            assert rel_err(got, ref.model(x)) < TOL, kw
    assert any(n.startswith("calibrated") for n in rep.notes)


def test_triton_op_inside_inductor_graph(monkeypatch, gen):
    """backend="triton" emits torch.ops.dsrewrite.separable_conv2d (what "auto" does on CUDA); Inductor keeps it."""
    import dsrewrite.kernels.dispatch as ops

    ran = []
    real = ops.run_kernels
    monkeypatch.setattr(ops, "run_kernels", lambda *a: ran.append(1) or real(*a))
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        got = dsrewrite.compile(model, rank=2, backend="triton")(x)
        want = dsrewrite.rewrite(model, x, rank=2, backend="torch", measure_time=False).model(x)
    assert ran and rel_err(got, want) < TOL


def test_ragged_triton_pairs_under_torch_compile(gen):
    """Ragged pairs on the Triton op compile: inside the dsrewrite backend's Inductor graph (the index is a
    buffer of the rewritten graph) and in a user's torch.compile(fullgraph=True) of a rewritten model (the
    index is not read on the host while tracing)."""
    pytest.importorskip("triton")
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval()
    scale = torch.tensor([0.02, 0.5, 1.0, 3.0])[None, :, None, None]  # uneven channels: a ragged split
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(8, 4, 3, 3, generator=gen) * scale)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        want = dsrewrite.rewrite(m, x, rank=2, backend="torch", ragged=True, measure_time=False).model(x)
        got = dsrewrite.compile(m, rank=2, backend="triton", ragged=True)(x)
        assert rel_err(got, want) < TOL
        tri = dsrewrite.rewrite(m, x, rank=2, backend="triton", ragged=True, measure_time=False).model
        assert rel_err(torch.compile(tri, backend="aot_eager", fullgraph=True)(x), want) < TOL


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, "rank must be >= 1"),
    ({"target_latency": 0.5}, "'target_latency' is not supported by the torch.compile backend"),
    ({"rank": 2, "target_flops": 0.5}, "either rank or target_flops"),
    ({"target_flops": 0.5, "energy": 0.9}, "one budget at a time"),
    ({"ranks": 2}, "unknown option 'ranks'"),
    ({"compiler": "tvm"}, "compiler must be one of"),
    ({"include": 3}, "include must be"),
    ({"target_flops": 1.5}, "target_flops"),
    ({"mode": "fastest"}, "mode must be one of Inductor's modes"),
])
def test_bad_options_fail_at_once_in_one_line(options, match):
    with pytest.raises(DsrewriteError, match=match) as info:
        dsrewrite.compile(nn.Conv2d(3, 4, 3), **options)
    assert "\n" not in str(info.value)
    with pytest.raises(DsrewriteError, match=match):  # what torch.compile(backend="dsrewrite", options=...) builds
        DsrewriteBackend(**options)


def test_registered_backend_needs_no_import(tmp_path):
    """The torch_dynamo_backends entry point: a fresh process that never imports dsrewrite itself."""
    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        x = torch.randn(2, 3, 12, 12)
        assert "dsrewrite" not in sys.modules
        with torch.no_grad():
            y = torch.compile(m, backend="dsrewrite", options={"rank": "full", "compiler": "eager"})(x)
            err = float((y - m(x)).norm() / m(x).norm())
        try:
            with torch.no_grad():
                torch.compile(m, backend="dsrewrite", options={"rank": 0})(x)
        except Exception as e:  # Dynamo wraps it: BackendCompilerFailed(inner_exception=DsrewriteError)
            bad = type(getattr(e, "inner_exception", None) or e).__name__
        from dsrewrite.dynamo.backend import last_report
        print(len(last_report().rewritten), err, bad)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    n, err, bad = p.stdout.split()
    assert int(n) == 2 and float(err) < TOL and bad == "DsrewriteError"


def test_last_report_and_string_backend_options(gen):
    model = small(gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        y = torch.compile(model, backend="dsrewrite", options={"rank": 2, "compiler": "eager",
                                                               "include": "c*", "name": "net"})(x)
        want = dsrewrite.rewrite(model, x, rank=2, include="c*", measure_time=False).model(x)
    rep = last_report()
    assert rep.model == "net" and {L.name for L in rep.rewritten} == {"c1", "c2"}
    assert rel_err(y, want) < TOL


def test_compile_benchmark_dry_run(tmp_path):
    """benchmarks/compile.py --dry-run: the GPU benchmark's code path on a tiny CNN on the CPU."""
    import importlib.util
    import json

    path = ROOT / "benchmarks" / "compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--dry-run", "--out", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "c.json").read_text())
    rows = {r["rank"]: r for r in out["rows"]}
    assert out["meta"]["dry_run"] and rows.keys() == {"2", "full"}
    assert rows["2"]["flops_ratio"] < 1 < rows["full"]["flops_ratio"]  # full rank costs more, and says so
    assert all(r["rel_err_vs_eager_rewrite"] < TOL and r["original_ms"] > 0 and r["rewritten_ms"] > 0
               and r["latency_ratio"] == pytest.approx(r["rewritten_ms"] / r["original_ms"]) for r in rows.values())
    assert "| tiny | fp32 | 2 | default | 2 |" in (tmp_path / "c.md").read_text()
