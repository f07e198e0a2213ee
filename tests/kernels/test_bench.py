"""benchmarks/kernel_speed.py without a GPU: the CLI parses, --dry-run lists cases, FLOP and byte helpers are
right (FLOPs checked against FlopCounterMode on the two convs; exact integer equality)."""
import importlib.util
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import ROOT

_PATH = ROOT / "benchmarks" / "kernel_speed.py"


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
    assert all("model: HBM MB=" in L and "L2 MB=" in L for L in lines)  # the fused kernel's traffic model


def test_traffic_model_counts():
    """The fused kernel's traffic model: compulsory HBM bytes are the fused roofline bytes, FLOPs are the two
    convs' with one depthwise pass up to 256 outputs and ceil(M/256) above; unpipelined tiles read their halo
    from L2 once, pipelined ones every tap; an NCHW copy adds a read and a write of the input."""
    bench = _bench_module()
    from dsrewrite.kernels.separable_conv2d import fused_traffic

    case = bench.Case("t", "t", n=4, c=64, r=2, m=96, h=28, w=28, k=3, stride=1, dtype="fp16")
    t = bench.case_traffic(case)
    assert t["hbm_bytes"] == bench.case_bytes(case)["fused"] and t["recompute"] == 1
    assert t["flops"] == bench.case_flops(case)["total"]
    cfg = dict(TILE_H=8, TILE_W=8, BLOCK_M=128)
    args = (4, 64, 28, 28, 96, 2, 3, 3, (1, 1), (1, 1), (1, 1), 2, cfg)
    halo, taps = fused_traffic(*args, num_stages=1), fused_traffic(*args, num_stages=2)
    tiles = 4 * 4 * 4  # ceil(28 / 8) = 4 tiles per dimension per image
    weights_per_prog = (64 * 2 * 9 + 64 * 2 * 128) * 2
    out = 4 * 96 * 28 * 28 * 2
    assert halo["l2_bytes"] == tiles * (10 * 10 * 64 * 2 + weights_per_prog) + out
    assert taps["l2_bytes"] == tiles * (9 * 64 * 64 * 2 + weights_per_prog) + out
    wide = fused_traffic(4, 64, 28, 28, 600, 1, 3, 3, (1, 1), (1, 1), (1, 1), 2, dict(cfg, BLOCK_M=256))
    assert wide["recompute"] == 3 and wide["flops"] == 2 * 4 * 28 * 28 * 64 * (9 * 3 + 600)
    copied = fused_traffic(*args, nchw_copy=True)
    assert copied["hbm_bytes"] - halo["hbm_bytes"] == 2 * 4 * 64 * 28 * 28 * 2


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
