"""The autotune cache keys of the Triton kernels (issue 13): a config tuned for one memory format, ragged index,
activation or dtype is never reused for another. On a GPU the fused 5x5/7x7 fp16 kernel tuned on NCHW could
otherwise be launched with that config on a same-shape channels_last input and fail with ``OutOfResources``.

Runs the installed Triton's real ``Autotuner.run`` (under the interpreter on CPU, on the GPU by
``benchmarks/gpu_check.sh``) with two configs and its benchmark replaced by a constant, then counts the cache
entries: one per distinct call.
"""
import importlib

import pytest
import torch

pytest.importorskip("triton")

from dsrewrite.kernels import depthwise, pointwise  # noqa: E402
fused = importlib.import_module("dsrewrite.kernels.separable_conv2d")  # the package exports a function of that name

from tests._kernel_ref import assert_matches, reference  # noqa: E402


def test_keys_name_layout_index_activation_and_precision():
    for key in (fused.FUSED_TUNING_KEY, fused._separable_conv2d_tuned.keys):
        assert {"sxc", "sxw", "sym", "syw", "HAS_INDEX", "HAS_BIAS", "ACT", "PRECISION"} <= set(key)
    assert {"sxc", "sxw", "szc", "szw", "HAS_INDEX"} <= set(depthwise._depthwise_conv2d_tuned.keys)
    assert {"szc", "szw", "sym", "syw", "ACT", "PRECISION"} <= set(pointwise._pointwise_conv2d_tuned.keys)
    for tuned in (fused._separable_conv2d_tuned, depthwise._depthwise_conv2d_tuned,
                  pointwise._pointwise_conv2d_tuned):
        assert set(tuned.keys) <= set(tuned.arg_names)  # a misspelt name would silently drop out of the key


def _counting_tuner(monkeypatch, module, attr, kernel, configs):
    """Swap the module's autotuned kernel for one with two configs and a constant benchmark."""
    import triton

    real = getattr(module, attr)
    tuner = triton.autotune(configs=configs, key=real.keys)(kernel)
    monkeypatch.setattr(tuner, "_bench", lambda *args, config, **meta: [1.0, 1.0, 1.0])
    monkeypatch.setattr(module, attr, tuner)
    return tuner


def test_fused_tuning_cache_splits_layout_index_activation_dtype(monkeypatch):
    import triton

    g = torch.Generator().manual_seed(0)
    tuner = _counting_tuner(monkeypatch, fused, "_separable_conv2d_tuned", fused._separable_conv2d_kernel,
                            [fused.INTERPRET_CONFIGS[0], triton.Config(dict(fused.INTERPRET_CONFIGS[0].kwargs, TILE_H=8),
                                                                      num_warps=1, num_stages=1)])
    x = torch.randn(1, 4, 6, 6, generator=g)
    dw = torch.randn(8, 1, 5, 5, generator=g)
    pw = torch.randn(16, 8, 1, 1, generator=g) / 8 ** 0.5
    index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # the same depthwise channels as r=2: same result
    ref = reference(x, dw, pw, None, 1, 2, 1, None)

    def call(inp, **kw):
        return fused.separable_conv2d_forward(inp, dw.to(inp.dtype), pw.to(inp.dtype), None, (1, 1), (2, 2),
                                              (1, 1), **kw)

    calls = [dict(), dict(), dict(channels_last=True), dict(channel_index=index), dict(activation="relu"),
             dict(dtype=torch.float16)]
    sizes = []
    for kw in calls:
        kw = dict(kw)
        inp = x.to(kw.pop("dtype", torch.float32))
        if kw.pop("channels_last", False):
            inp = inp.to(memory_format=torch.channels_last)
        y = call(inp, **kw)
        if "activation" not in kw:
            assert_matches(y, ref, 5e-3 if inp.dtype == torch.float16 else 1e-5)
        sizes.append(len(tuner.cache))
    # the repeated NCHW fp32 call hits the cache; each other variant tunes anew
    assert sizes == [1, 1, 2, 3, 4, 5]
    keys = list(tuner.cache)
    assert len(set(keys)) == 5 and any("torch.float16" in map(str, k) for k in keys)


def test_split_kernels_tuning_cache_splits_layout(monkeypatch):
    g = torch.Generator().manual_seed(1)
    dwt = _counting_tuner(monkeypatch, depthwise, "_depthwise_conv2d_tuned", depthwise._depthwise_conv2d_kernel,
                          [depthwise.INTERPRET_CONFIG, depthwise._cfg(16, 16, 1)])
    pwt = _counting_tuner(monkeypatch, pointwise, "_pointwise_conv2d_tuned", pointwise._pointwise_conv2d_kernel,
                          [pointwise.INTERPRET_CONFIG, pointwise._cfg(16, 16, 16, 1, 1)])
    x = torch.randn(1, 4, 5, 5, generator=g)
    w = torch.randn(4, 1, 3, 3, generator=g)
    pw = torch.randn(16, 4, 1, 1, generator=g)
    for inp in (x, x.to(memory_format=torch.channels_last)):
        z = depthwise.depthwise_conv2d_forward(inp, w, (1, 1), (1, 1), (1, 1))
        pointwise.pointwise_conv2d_forward(z, pw, None)
    assert len(dwt.cache) == 2 and len(pwt.cache) == 2
