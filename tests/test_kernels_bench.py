"""benchmarks/kernels.py without a GPU: the CLI parses, --dry-run lists cases, FLOP and byte helpers are
right (FLOPs checked against FlopCounterMode on the two convs; exact integer equality)."""
import importlib.util
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_every_requested_case(capsys):
    bench = _bench_module()
    argv = ["--dry-run", "--suite", "mobilenet", "resnet50", "--n", "1", "8", "--dtype", "fp16", "bf16"]
    assert bench.main(argv) == 0
    lines = [L for L in capsys.readouterr().out.splitlines() if "GFLOP=" in L]
    want = 2 * 2 * (len(bench.MOBILE_LAYERS) + len(bench.RESNET50_CONVS) * len(bench.RANKS))
    assert len(lines) == want
    assert any("effb0-b10 N=8 672x14^2 r=1 -> 112 k=5" in L for L in lines)


def test_flop_and_byte_formulas_match_the_two_convs():
    bench = _bench_module()
    case = bench.Case("t", "t", n=2, c=6, r=3, m=5, h=9, w=9, k=5, stride=2, dtype="fp16")
    x = torch.empty(2, 6, 9, 9, device="meta")
    dw = torch.empty(18, 1, 5, 5, device="meta")
    pw = torch.empty(5, 18, 1, 1, device="meta")
    with FlopCounterMode(display=False) as fc:
        z = F.conv2d(x, dw, None, 2, case.pad, 1, 6)
        y = F.conv2d(z, pw)
    assert bench.case_flops(case)["total"] == fc.get_total_flops()
    assert tuple(y.shape[2:]) == case.out_hw
    by = bench.case_bytes(case)
    weights = dw.numel() + pw.numel() + 5
    assert by["fused"] == 2 * (x.numel() + y.numel() + weights)
    assert by["unfused"] - by["fused"] == 2 * 2 * z.numel()


def test_gpu_check_script_dry_run():
    """benchmarks/gpu_check.sh --dry-run (issue 13): stages the package as installed, prints the plan, and
    validates the steps' scripts and flags without a GPU (about 6 s)."""
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        import pytest

        pytest.skip("needs bash and coreutils timeout")
    script = _PATH.parent / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    for step in ("correctness", "configs", "kernels", "max-autotune", "end-to-end"):
        assert f"## {step}" in out
    assert "- device:" in out and "Triton" in out and "cases (dry run: nothing launched)" in out
    assert out.rstrip().endswith("all steps passed")
