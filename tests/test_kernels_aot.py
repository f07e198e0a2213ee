"""The kernels compile with Triton's real NVIDIA pipeline (down to a cubin), on this GPU-less machine.

The interpreter checks the arithmetic; this checks what only the GPU compiler sees: that ``tl.dot`` becomes
tensor-core instructions for 16-bit operands (and fp32 with tf32), that the configs the runtime would keep fit
the architecture's shared memory, and that the depthwise-only kernel needs no shared memory at all.
"""
import pytest

pytest.importorskip("triton.backends.nvidia")

from dsrewrite.kernels._aot import SHARED_LIMIT, compile_many  # noqa: E402
from dsrewrite.kernels.depthwise import DEPTHWISE_CONFIGS  # noqa: E402
from dsrewrite.kernels.pointwise import POINTWISE_CONFIGS  # noqa: E402
from dsrewrite.kernels.separable_conv2d import (FUSED_CONFIGS, FUSED_FALLBACK_CONFIGS, fused_configs_for,  # noqa: E402
                                                fused_shared_bytes)

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
NCHW_UNIT = ["sxw", "syw", "stride_h", "stride_w", "dil_h", "dil_w", "pad_h", "pad_w"]  # as the JIT specialises


def _largest(configs):
    return max(configs, key=lambda c: (c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_M"], c.num_stages))


def _fused(cfg, dtype, arch, kh=3, kw=3, precision="tf32", ragged=False):
    return dict(kernel="fused", constexprs=dict(KH=kh, KW=kw, HAS_BIAS=True, ACT=3, PRECISION=precision,
                                                HAS_INDEX=ragged, **cfg.kwargs),
                dtype=dtype, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages, ones=NCHW_UNIT,
                pointer_dtypes={"idx_ptr": "i64"})


# (dtype, arch, precision, expected dot instructions) for the largest config the runtime keeps at 3x3
INSTRUCTIONS = [("fp16", 90, "tf32", "wgmma"), ("bf16", 80, "tf32", "mma"), ("fp32", 90, "ieee", "fma")]
KEPT_7X7_FP32 = fused_configs_for(4, SHARED_LIMIT[90], 7, 7)
KEPT_3X3_FP32 = fused_configs_for(4, SHARED_LIMIT[90], 3, 3)
DROPPED_3X3_FP32 = min((c for c in FUSED_CONFIGS if c not in KEPT_3X3_FP32), key=lambda c: fused_shared_bytes(c, 4, 3, 3))


@pytest.fixture(scope="module")
def compiled():
    """One child process compiles every case of this module (a few seconds each)."""
    cases = {f"instr-{d}-{a}": _fused(_largest(fused_configs_for(ITEMSIZE[d], SHARED_LIMIT[a], 3, 3)), d, a,
                                      precision=p) for d, a, p, _ in INSTRUCTIONS}
    cases["3x3-dropped"] = _fused(DROPPED_3X3_FP32, "fp32", 90)
    cases["7x7-fallback"] = _fused(FUSED_FALLBACK_CONFIGS[0], "fp32", 90, 7, 7)
    dwc, pwc = DEPTHWISE_CONFIGS[-1], POINTWISE_CONFIGS[0]
    cases["depthwise"] = dict(kernel="depthwise", constexprs=dict(KH=5, KW=5, HAS_INDEX=True, **dwc.kwargs),
                              dtype="bf16", arch=90, num_warps=dwc.num_warps, num_stages=dwc.num_stages,
                              ones=["sxw", "szw"], pointer_dtypes={"idx_ptr": "i64"})
    # ragged ranks: the channel index is one more load per channel block; the tensor-core path must survive it
    cases["ragged-fp16-90"] = _fused(_largest(fused_configs_for(2, SHARED_LIMIT[90], 3, 3)), "fp16", 90, ragged=True)
    cases["pointwise"] = dict(kernel="pointwise", constexprs=dict(HAS_BIAS=True, ACT=1, PRECISION="tf32", **pwc.kwargs),
                              dtype="fp16", arch=90, num_warps=pwc.num_warps, num_stages=pwc.num_stages,
                              ones=["szc", "sym"])
    return dict(zip(cases, compile_many(list(cases.values()))))


@pytest.mark.parametrize("dtype, arch, precision, expect", INSTRUCTIONS)
def test_fused_kernel_compiles_to_the_expected_instructions(compiled, dtype, arch, precision, expect):
    info = compiled[f"instr-{dtype}-{arch}"]
    cfg = _largest(fused_configs_for(ITEMSIZE[dtype], SHARED_LIMIT[arch], 3, 3))
    assert info["mma"] == expect
    assert info["fits"], f"{cfg} needs {info['shared_bytes']} bytes of shared memory on sm_{arch}"
    assert fused_shared_bytes(cfg, ITEMSIZE[dtype], 3, 3) >= info["shared_bytes"]  # the estimate is an upper bound


def test_large_fp32_kernels_keep_only_configs_that_fit(compiled):
    """fp32 inputs are staged through shared memory by the pipeliner, once per tap: at 7x7 all but the
    smallest pipelined config overflow even Hopper's 227 KB (and all of them the 99 KB of sm_86/sm_89, where a
    rewritten 7x7 ResNet stem could not run). Those are pruned; the unpipelined fallbacks always remain."""
    assert all(c in KEPT_7X7_FP32 for c in FUSED_FALLBACK_CONFIGS)
    assert all(c.num_stages == 1 for c in fused_configs_for(4, SHARED_LIMIT[86], 7, 7))  # 99 KB: fallbacks only
    assert sum(c.num_stages > 1 for c in KEPT_7X7_FP32) < sum(c.num_stages > 1 for c in FUSED_CONFIGS) // 2
    assert not compiled["3x3-dropped"]["fits"]  # the compiler agrees that a pruned config had to go
    assert compiled["7x7-fallback"]["fits"] and compiled["7x7-fallback"]["mma"] == "wgmma"
    assert len(fused_configs_for(2, SHARED_LIMIT[90], 7, 7)) > len(KEPT_7X7_FP32)  # 16-bit inputs are not staged


def test_split_kernels_compile(compiled):
    dw, pw = compiled["depthwise"], compiled["pointwise"]
    assert dw["mma"] == "fma" and dw["shared_bytes"] == 0  # pure register FMAs, nothing staged
    assert pw["mma"] == "wgmma" and pw["fits"]


def test_ragged_fused_kernel_keeps_tensor_cores(compiled):
    """Reading the depthwise channels through an index (ragged ranks) keeps the wgmma path and fits."""
    info = compiled["ragged-fp16-90"]
    cfg = _largest(fused_configs_for(2, SHARED_LIMIT[90], 3, 3))
    assert info["mma"] == "wgmma" and info["fits"]
    assert fused_shared_bytes(cfg, 2, 3, 3) >= info["shared_bytes"]
