"""The Triton backward of ``torch.ops.dsrewrite.separable_conv2d`` (``kernels/separable_backward.py``) against
float64 autograd of two ``F.conv2d`` calls, under the interpreter; its registration; and an AOT compile check.

Tolerances, as ``max|g - g_ref| <= tol * max|g_ref|`` per gradient: fp32 1e-5 (fp32 accumulation, ieee dots),
fp16 5e-3 (fp16 operands and depthwise-output gradient, fp32 accumulation). Every test draws fresh data.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import dsrewrite.kernels as K  # noqa: E402
from dsrewrite.kernels import separable_backward as SB  # noqa: E402

from tests._kernel_ref import assert_matches, reference  # noqa: E402

PAD_SAME = "same"


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of the Triton backward (the op's backward must run it, not the torch-ops fallback)."""
    calls = []
    real = SB.separable_conv2d_backward

    def counting(*args, **kwargs):
        calls.append(args[11])  # needs
        return real(*args, **kwargs)

    monkeypatch.setattr(SB, "separable_conv2d_backward", counting)
    return calls


def _tensors(gen, n, c, r, m, h, w, k, channels_last=False, bias=True, index=None, dtype=torch.float32, pw_scale=1.0):
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cr = c * r if index is None else len(index)
    dw = torch.randn(cr, 1, *k, generator=gen)
    pw = torch.randn(m, cr, 1, 1, generator=gen) * pw_scale / cr ** 0.5
    b = torch.randn(m, generator=gen) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, dw, pw, b)]


def _pads(pad, k, dil):
    if pad == PAD_SAME:
        return (dil[0] * (k[0] - 1) // 2, dil[1] * (k[1] - 1) // 2)
    return (pad, pad)


def _check_grads(gen, tensors, stride, pad, dil, act, index=None, grad_of=(True, True, True, True), tol=1e-5,
                 gy=None):
    """Forward + backward through the op, then float64 autograd of the reference; compares every gradient."""
    leaves = [t.clone().requires_grad_(want) if t is not None else None for t, want in zip(tensors, grad_of)]
    y = K.separable_conv2d(*leaves, stride=stride, padding=pad, dilation=dil, activation=act, channel_index=index)
    if gy is None:
        gy = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(gy)
    ref_leaves = [t.detach().double().requires_grad_(want) if t is not None else None
                  for t, want in zip(tensors, grad_of)]
    ref = reference(*ref_leaves, stride, _pads(pad, tensors[1].shape[2:], dil), dil, act, channel_index=index)
    ref.backward(gy.double())
    errs = {}
    for name, got, want in zip(("x", "dw", "pw", "bias"), leaves, ref_leaves):
        if got is None or not got.requires_grad:
            assert got is None or got.grad is None, name
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        assert_matches(got.grad, want.grad, tol)
        errs[name] = (got.grad.double() - want.grad).abs().max().item() / (want.grad.abs().max().item() or 1.0)
    if leaves[0].requires_grad:  # grad_x keeps x's memory format
        fmt = (torch.channels_last if leaves[0].is_contiguous(memory_format=torch.channels_last)
               and not leaves[0].is_contiguous() else torch.contiguous_format)
        assert leaves[0].grad.is_contiguous(memory_format=fmt), leaves[0].grad.stride()
    print("relative max errors", errs)
    return ref


# (c, r, m, h, w, kernel, stride, padding, dilation, activation, bias, channels_last): odd shapes, every option
CASES = [
    (3, 1, 7, 7, 9, (3, 3), (1, 1), 1, (1, 1), None, True, False),
    (5, 2, 33, 9, 7, (3, 3), (2, 1), 0, (1, 2), "relu", False, True),
    (17, 3, 7, 5, 7, (3, 3), (2, 2), PAD_SAME, (2, 1), "silu", True, False),
    (3, 2, 33, 9, 5, (5, 3), (1, 2), PAD_SAME, (1, 1), "relu6", True, True),
    (5, 3, 7, 8, 9, (1, 5), (2, 2), 1, (2, 2), "silu", False, True),
    (17, 1, 33, 7, 5, (3, 1), (1, 1), 0, (1, 1), "relu6", False, False),
]


def _id(case):
    c, r, m, h, w, k, s, p, d, act, b, cl = case
    return (f"c{c}r{r}m{m}-{h}x{w}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p}-d{d[0]}{d[1]}-{act}"
            f"{'-bias' if b else ''}{'-cl' if cl else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_backward_matches_float64_autograd(case, gen, triton_calls):
    c, r, m, h, w, k, stride, pad, dil, act, bias, cl = case
    tensors = _tensors(gen, 2, c, r, m, h, w, k, channels_last=cl, bias=bias, pw_scale=4.0 if act == "relu6" else 1.0)
    ref = _check_grads(gen, tensors, stride, pad, dil, act)
    if act == "relu6":  # the pre-activations straddle both kinks
        assert (ref == 6).any() and (ref == 0).any()
    assert triton_calls == [[True, True, True, bias]]


def test_ragged_channel_index(gen, triton_calls):
    """Input channel 1 is read by no filter (its gradient is zero), channel 0 by three, channel 4 last."""
    index = torch.tensor([0, 2, 0, 3, 0, 4, 2])
    tensors = _tensors(gen, 2, 5, 1, 33, 7, 6, (3, 3), channels_last=True, index=index)
    _check_grads(gen, tensors, (2, 1), 1, (1, 2), "silu", index=index)
    assert len(triton_calls) == 1


def test_ragged_nchw_relu_only_input_gradient(gen, triton_calls):
    index = torch.tensor([3, 3, 3, 1, 0, 2])  # 4 channels, each read 0..3 times
    tensors = _tensors(gen, 1, 4, 1, 7, 9, 7, (3, 3), index=index, bias=False)
    _check_grads(gen, tensors, (1, 1), PAD_SAME, (1, 1), "relu", index=index, grad_of=(True, False, False, False))
    assert triton_calls == [[True, False, False, False]]


@pytest.mark.parametrize("grad_of", [(True, False, False, False), (False, True, True, True),
                                     (False, False, True, False), (False, True, False, False),
                                     (False, False, False, True)],
                         ids=["x", "weights", "pw", "dw", "bias"])
def test_only_some_gradients(grad_of, gen, triton_calls):
    tensors = _tensors(gen, 1, 5, 2, 7, 7, 7, (3, 3))
    _check_grads(gen, tensors, (1, 1), 1, (1, 1), "silu", grad_of=grad_of)
    assert triton_calls == [list(grad_of)]


def test_expanded_grad_and_strided_input(gen, triton_calls):
    """x a strided view (neither NCHW nor NHWC); then ``y.sum().backward()``, whose gradient is an expanded
    tensor with all strides zero: both are read through their strides."""
    base = torch.randn(2, 10, 9, 11, generator=gen)
    x = base[:, ::2, :, 1:10]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _, dw, pw, b = _tensors(gen, 1, 5, 2, 7, 1, 1, (3, 3))
    _check_grads(gen, [x, dw, pw, b], (1, 1), 1, (1, 1), "relu6")
    leaves = [t.clone().requires_grad_() for t in (x, dw, pw, b)]
    K.separable_conv2d(*leaves, padding=1).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, dw, pw, b)]
    reference(*ref_leaves, 1, 1, 1).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert_matches(got.grad, want.grad, 1e-5)
    assert len(triton_calls) == 2


def test_float16(gen, triton_calls):
    tensors = _tensors(gen, 2, 6, 2, 20, 7, 7, (3, 3), channels_last=True, dtype=torch.float16)
    _check_grads(gen, tensors, (1, 1), 1, (1, 1), "silu", tol=5e-3)
    assert len(triton_calls) == 1


def test_every_autotune_config(gen):
    """Each GPU config of both kernels (blocks 16..256, masks on every edge) gives the same gradients."""
    x, dw, pw, b = _tensors(gen, 1, 9, 2, 20, 7, 6, (3, 3), channels_last=True)
    leaves = [t.double().requires_grad_() for t in (x, dw, pw, b)]
    ref = reference(*leaves, (1, 1), (1, 1), (1, 1), "relu")
    gy = torch.randn(ref.shape, generator=gen)
    ref.backward(gy.double())
    y = K.separable_conv2d(x, dw, pw, b, padding=1, activation="relu")
    pairs = list(zip(SB.BWD_FUSED_CONFIGS, SB.BWD_INPUT_CONFIGS + SB.BWD_INPUT_CONFIGS[:1]))
    for fused_cfg, input_cfg in pairs:
        configs = tuple(dict(c.kwargs, num_warps=c.num_warps) for c in (fused_cfg, input_cfg))
        grads = SB.separable_conv2d_backward(gy, x, dw, pw, b, y, (1, 1), (1, 1), (1, 1), "relu", None,
                                             (True, True, True, True), configs=configs)
        for got, want in zip(grads, leaves):
            assert_matches(got, want.grad, 1e-5)


@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, False)], ids=["all", "x"])
def test_autotuning_reruns_leave_one_sum_and_the_weights_intact(needs, monkeypatch, gen):
    """With several configs the autotuner runs the fused kernel many times into the atomically accumulated weight
    gradients: its reset_to_zero must leave the sum of one run (and zero only the gradient buffers, never the
    weights, which unneeded outputs must not alias). Real ``Autotuner.run`` with two configs; its benchmark
    replaced by three real runs each (the interpreter has no GPU timer)."""
    tuner = SB._separable_bwd_fused_tuned
    monkeypatch.setattr(tuner, "configs", [SB.BWD_FUSED_INTERPRET_CONFIG, SB.gemm_config(16, 16, 16, 1, 1)])
    monkeypatch.setattr(tuner, "cache", {})
    runs = []

    def bench(*args, config, **meta):
        full = {**dict(zip(tuner.arg_names, args)), **meta, **config.all_kwargs()}
        for _ in range(3):
            tuner.pre_hook(full)
            tuner.fn.run(*args, **meta, **config.all_kwargs())
            runs.append(config)
        return [float(len(runs)), 1.0, 1.0]

    monkeypatch.setattr(tuner, "_bench", bench)
    x, dw, pw, b = _tensors(gen, 1, 5, 2, 17, 6, 7, (3, 3))
    dw0, pw0 = dw.clone(), pw.clone()
    y = K.separable_conv2d(x, dw, pw, b, padding=1)
    gy = torch.randn(y.shape, generator=gen)
    grads = SB.separable_conv2d_backward(gy, x, dw, pw, b, y, (1, 1), (1, 1), (1, 1), "none", None, needs)
    assert len(runs) == 6 and len(tuner.cache) == 1
    assert torch.equal(dw, dw0) and torch.equal(pw, pw0)
    leaves = [t.double().requires_grad_() for t in (x, dw, pw, b)]
    reference(*leaves, 1, 1, 1).backward(gy.double())
    for got, want, need in zip(grads, leaves, needs):
        assert (got is None) != need
        if need:
            assert_matches(got, want.grad, 1e-5)


def test_double_backward_falls_back_to_torch_ops(gen, triton_calls):
    """``create_graph=True`` needs a differentiable backward: the torch-ops formula, not the kernels."""
    x, dw, pw, b = _tensors(gen, 1, 3, 2, 5, 6, 6, (3, 3))
    leaves = [t.clone().requires_grad_() for t in (x, dw, pw, b)]
    y = K.separable_conv2d(*leaves, padding=1, activation="silu")
    (gx,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
    assert triton_calls == []  # the graph-building backward ran the torch ops
    (gdw,) = torch.autograd.grad(gx.sum(), leaves[1])  # through y too: the op's plain backward, Triton again
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, dw, pw, b)]
    ref = reference(*ref_leaves, 1, 1, 1, "silu")
    (rx,) = torch.autograd.grad(ref.square().sum(), ref_leaves[0], create_graph=True)
    (rdw,) = torch.autograd.grad(rx.sum(), ref_leaves[1])
    assert_matches(gx, rx, 1e-5)
    assert_matches(gdw, rdw, 1e-5)
    assert len(triton_calls) == 1


def test_backward_op_opcheck_and_tuning_keys(gen):
    """The backward op's schema, fake implementation (shapes, memory format) and aot dispatch; the forward op's
    opcheck (which runs its autograd, so the Triton backward) still passes; tuning keys name real arguments."""
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    x, dw, pw, b = _tensors(gen, 1, 3, 2, 5, 5, 5, (3, 3), channels_last=True)
    y = K.separable_conv2d(x, dw, pw, b, padding=1, activation="relu")
    gy = torch.randn(y.shape, generator=gen)
    for needs in ([True, True, True, True], [False, True, False, False]):
        torch.library.opcheck(torch.ops.dsrewrite.separable_conv2d_backward.default,
                              (gy, x, dw, pw, b, y, [1, 1], [1, 1], [1, 1], "relu", "ieee", None, needs))
    for t in (x, dw, pw, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.dsrewrite.separable_conv2d.default,
                          (x, dw, pw, b, [1, 1], [1, 1], [1, 1], "silu", "auto", "ieee"))
    for tuned, key in ((SB._separable_bwd_fused_tuned, SB.BWD_FUSED_TUNING_KEY),
                       (SB._separable_bwd_input_tuned, SB.BWD_INPUT_TUNING_KEY)):
        assert list(tuned.keys) == key and set(key) <= set(tuned.arg_names)
    assert {"sxc", "sxw", "sgm", "sgw", "HAS_INDEX", "PRECISION"} <= set(SB.BWD_FUSED_TUNING_KEY)
    assert {"sgxc", "sgxw", "HAS_INDEX"} <= set(SB.BWD_INPUT_TUNING_KEY)


# --- AOT: the kernels compile for sm_90 / sm_80 (Triton's real NVIDIA pipeline, no GPU needed) ---------------

_AOT_CHILD = r"""
import json, sys
from dataclasses import asdict
from dsrewrite.kernels.aot import compile_for
from dsrewrite.kernels import separable_backward as SB
out = {}
for name, case in json.loads(sys.stdin.read()).items():
    kernel = getattr(SB, case.pop("kernel"))
    out[name] = asdict(compile_for(kernel, case.pop("constexprs"), **case))
print(json.dumps(out))
"""


def test_backward_kernels_compile_for_sm90_and_sm80():
    """Representative configs compile to a cubin that fits shared memory; the fused kernel's two ``tl.dot``s
    take tensor cores (wgmma on sm_90 fp16, mma.sync on sm_80 bf16); the input kernel is pure FMAs."""
    pytest.importorskip("triton.backends.nvidia")
    fcfg, icfg = SB.BWD_FUSED_CONFIGS[1], SB.BWD_INPUT_CONFIGS[0]
    cases = {}
    for dtype, arch in (("fp16", 90), ("bf16", 80)):
        cases[f"fused-{dtype}-{arch}"] = dict(
            kernel="_separable_bwd_fused_kernel",
            constexprs=dict(KH=3, KW=3, HAS_INDEX=True, PRECISION="tf32", NEED_GZ_OUT=True, NEED_DW=True,
                            NEED_PW=True, **fcfg.kwargs),
            dtype=dtype, arch=arch, num_warps=fcfg.num_warps, num_stages=fcfg.num_stages,
            ones=["sxw", "sgw", "stride_h", "stride_w", "dil_h", "dil_w", "pad_h", "pad_w"],
            pointer_dtypes={"idx_ptr": "i64", "gdw_ptr": "fp32", "gpw_ptr": "fp32"})
        cases[f"input-{dtype}-{arch}"] = dict(
            kernel="_separable_bwd_input_kernel", constexprs=dict(KH=3, KW=3, HAS_INDEX=True, **icfg.kwargs),
            dtype=dtype, arch=arch, num_warps=icfg.num_warps, num_stages=icfg.num_stages,
            ones=["sgxw", "dil_h", "dil_w"],
            pointer_dtypes={"order_ptr": "i64", "start_ptr": "i64", "count_ptr": "i64"})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    proc = subprocess.run([sys.executable, "-c", _AOT_CHILD], input=json.dumps(cases), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, got in info.items():
        assert got["fits"], (name, got)
    assert info["fused-fp16-90"]["mma"] == "wgmma"
    assert info["fused-bf16-80"]["mma"] == "mma"
    assert info["input-fp16-90"]["mma"] == "fma" and info["input-bf16-80"]["shared_bytes"] == 0
