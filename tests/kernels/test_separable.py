"""Forward numerics of the Triton kernels (fused and split paths) against two float64 ``F.conv2d`` calls.

Runs the Triton interpreter on CPU (``TRITON_INTERPRET=1``, set in conftest.py). Tolerances, as
``max|y - ref| <= tol * max|ref|``: fp32 1e-5 (``tl.dot`` in ieee precision), fp16 5e-3 (fp16 operands
and intermediate, fp32 accumulation). bf16 is not available in the interpreter: the GPU benchmark checks it.
"""
import random

import pytest
import torch

pytest.importorskip("triton")

from dsrewrite.kernels import separable_conv2d  # noqa: E402

from tests._kernel_ref import assert_matches, reference  # noqa: E402

KERNELS = [(3, 3), (5, 5), (3, 1), (1, 7)]
CHANNELS = [3, 5, 8, 12, 16, 24, 33, 40]


def _draw_case(rnd: random.Random) -> dict:
    kh, kw = rnd.choice(KERNELS)
    dil = (rnd.choice([1, 2]), rnd.choice([1, 2]))
    stride = (rnd.choice([1, 2]), rnd.choice([1, 2]))
    pad_kind = rnd.choice([0, 1, "same"])
    pad = (dil[0] * (kh - 1) // 2, dil[1] * (kw - 1) // 2) if pad_kind == "same" else (pad_kind, pad_kind)
    lo_h = max(5, dil[0] * (kh - 1) + 1 - 2 * pad[0])  # at least one output row
    lo_w = max(5, dil[1] * (kw - 1) + 1 - 2 * pad[1])
    h, w = rnd.randint(lo_h, max(lo_h, 9)), rnd.randint(lo_w, max(lo_w, 9))
    return dict(n=rnd.choice([1, 2]), c=rnd.choice(CHANNELS), r=rnd.randint(1, 3), m=rnd.choice(CHANNELS),
                h=h, w=w, k=(kh, kw), stride=stride, pad_kind=pad_kind, pad=pad, dil=dil,
                bias=rnd.random() < 0.5, act=rnd.choice([None, "relu", "relu6", "silu"]),
                channels_last=rnd.random() < 0.5)


# a fixed sample of the configuration space (the data are fresh each run); ids show the case
_RND = random.Random(20240603)
CASES = [_draw_case(_RND) for _ in range(18)]


def _tensors(case, gen, dtype=torch.float32):
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=gen).to(dtype)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    cr = case["c"] * case["r"]
    dw = torch.randn(cr, 1, *case["k"], generator=gen).to(dtype)
    pw = (torch.randn(case["m"], cr, 1, 1, generator=gen) / cr ** 0.5).to(dtype)
    b = torch.randn(case["m"], generator=gen).to(dtype) if case["bias"] else None
    return x, dw, pw, b


def _case_id(case):
    return (f"c{case['c']}r{case['r']}m{case['m']}-k{case['k'][0]}x{case['k'][1]}"
            f"-s{case['stride'][0]}{case['stride'][1]}"
            f"-p{case['pad_kind']}-d{case['dil'][0]}{case['dil'][1]}-{case['act']}"
            f"{'-bias' if case['bias'] else ''}{'-cl' if case['channels_last'] else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("path", ["fused", "split"])
def test_matches_float64_reference(case, path, gen):
    x, dw, pw, b = _tensors(case, gen)
    y = separable_conv2d(x, dw, pw, b, stride=case["stride"], padding=case["pad_kind"],
                         dilation=case["dil"], activation=case["act"], path=path)
    ref = reference(x, dw, pw, b, case["stride"], case["pad"], case["dil"], case["act"])
    assert_matches(y, ref, 1e-5)
    assert y.dtype == x.dtype
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), f"output strides {y.stride()} not in the input's format"


@pytest.mark.parametrize("path", ["fused", "split"])
def test_float16(path, gen):
    case = dict(n=2, c=24, r=2, m=40, h=8, w=7, k=(3, 3), stride=(1, 1), pad_kind=1, pad=(1, 1), dil=(1, 1),
                bias=True, act="relu6", channels_last=True)
    x, dw, pw, b = _tensors(case, gen, torch.float16)
    y = separable_conv2d(x, dw, pw, b, padding=1, activation="relu6", path=path)
    assert y.dtype == torch.float16
    assert_matches(y, reference(x, dw, pw, b, 1, 1, 1, "relu6"), 5e-3)


def test_strided_view_input_is_read_in_place(gen):
    """A non-contiguous view (neither NCHW- nor NHWC-contiguous) is read through its strides."""
    base = torch.randn(2, 10, 9, 11, generator=gen)
    x = base[:, ::2, :, 1:10]  # 5 channels, stride 2 over channels
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    dw = torch.randn(10, 1, 3, 3, generator=gen)
    pw = torch.randn(6, 10, 1, 1, generator=gen)
    for path in ("fused", "split"):
        y = separable_conv2d(x, dw, pw, None, padding=1, path=path)
        assert_matches(y, reference(x, dw, pw, None, 1, 1, 1), 1e-5)
        assert y.is_contiguous()


def _launch_all_configs(configs, run, ref, tol):
    for cfg in configs:
        c = dict(cfg.kwargs, num_warps=cfg.num_warps)
        assert_matches(run(c), ref, tol)


def test_every_fused_autotune_config(gen):
    """Each GPU autotune tile (2-D tiles 4x8..16x8, channel blocks 16..64, masks on every edge) gives the same
    result, at the layer's own BLOCK_M and at smaller ones (several output-channel blocks, depthwise recomputed)."""
    from dsrewrite.kernels.separable_conv2d import FUSED_CONFIGS, separable_conv2d_forward

    x = torch.randn(1, 20, 7, 6, generator=gen).to(memory_format=torch.channels_last)
    dw = torch.randn(40, 1, 3, 3, generator=gen)
    pw = torch.randn(24, 40, 1, 1, generator=gen)
    b = torch.randn(24, generator=gen)
    ref = reference(x, dw, pw, b, 1, 1, 1, "silu")
    configs = [c for c in FUSED_CONFIGS if c.kwargs["BLOCK_M"] in (16, 32)]
    assert len({(c.kwargs["TILE_H"], c.kwargs["TILE_W"], c.kwargs["BLOCK_C"]) for c in configs}) >= 7
    _launch_all_configs(configs, lambda c: separable_conv2d_forward(
        x, dw, pw, b, (1, 1), (1, 1), (1, 1), "silu", "ieee", config=c), ref, 1e-5)


@pytest.mark.parametrize("nchw_copy", [True, False])
def test_nchw_input_read_directly_or_through_a_copy(nchw_copy, gen):
    """An NCHW input gives the same NCHW output whether the kernel reads a channels_last copy or the input itself."""
    from dsrewrite.kernels.separable_conv2d import separable_conv2d_forward

    x = torch.randn(2, 9, 6, 5, generator=gen)
    dw = torch.randn(18, 1, 3, 3, generator=gen)
    pw = torch.randn(7, 18, 1, 1, generator=gen)
    y = separable_conv2d_forward(x, dw, pw, None, (2, 1), (1, 1), (1, 2), "none", "ieee", nchw_copy=nchw_copy)
    assert y.is_contiguous()
    assert_matches(y, reference(x, dw, pw, None, (2, 1), (1, 1), (1, 2)), 1e-5)


def test_more_outputs_than_one_program_covers(gen):
    """M > 256: the output channels take two programs, each recomputing the depthwise tile."""
    x = torch.randn(1, 4, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    dw = torch.randn(8, 1, 3, 3, generator=gen)
    pw = torch.randn(300, 8, 1, 1, generator=gen)
    b = torch.randn(300, generator=gen)
    y = separable_conv2d(x, dw, pw, b, padding=1, activation="relu", path="fused")
    assert_matches(y, reference(x, dw, pw, b, 1, 1, 1, "relu"), 1e-5)


def test_every_split_autotune_config(gen):
    from dsrewrite.kernels.depthwise import DEPTHWISE_CONFIGS, depthwise_conv2d_forward
    from dsrewrite.kernels.pointwise import POINTWISE_CONFIGS, pointwise_conv2d_forward

    x = torch.randn(1, 20, 7, 6, generator=gen)
    dw = torch.randn(40, 1, 3, 1, generator=gen)
    pw = torch.randn(24, 40, 1, 1, generator=gen)
    z_ref = reference(x, dw, torch.eye(40).reshape(40, 40, 1, 1), None, 2, (1, 0), 1)
    _launch_all_configs(DEPTHWISE_CONFIGS, lambda c: depthwise_conv2d_forward(
        x, dw, (2, 2), (1, 0), (1, 1), config=c), z_ref, 1e-6)
    z = z_ref.float()
    y_ref = reference(z, torch.ones(40, 1, 1, 1), pw, None, 1, 0, 1, "relu")
    _launch_all_configs(POINTWISE_CONFIGS, lambda c: pointwise_conv2d_forward(
        z, pw, None, "relu", "ieee", config=c), y_ref, 1e-5)
