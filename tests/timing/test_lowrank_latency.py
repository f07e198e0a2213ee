"""Latency planning knows low-rank pairs (issue 22): the layer timers (eager, onnxruntime) time a linear layer and
a 1x1 conv dense and as their low-rank pairs, at a geometric set of ranks below the break-even rank; the cost
providers price low-rank specs through their pair view; ``target_latency`` over all kinds plans linear layers by
milliseconds, keeps a layer whose pair is slower dense, and checks the whole model.

Timings are not asserted to favour the pairs (CPU timing is noisy): wall-clock tests check that the timers build,
run and cache the right layers; the planning test runs on a synthetic device (FLOPs at a fixed rate plus launch
overhead), so its plan is the same on every machine. Tolerance of the ONNX pair models against numpy: 1e-4
relative (float32 GEMMs of width <= 64).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.plan import cost_model as cost
from dsrewrite.plan.cost_providers import FlopCost, LatencyCost, ParamCost
from dsrewrite.ir import ConvSpec
from dsrewrite.plan.cost_model import candidate_ranks
from dsrewrite.timing.layers import LayerTimer, layer_input
from dsrewrite.modules import LowRankConv2d, LowRankLinear


def _linear(cin=48, cout=64, rows=10, batch=2, calls=1, name="fc"):
    return ConvSpec(name=name, in_channels=cin, out_channels=cout, kernel=(), stride=(), dilation=(), bias=True,
                    batch=batch, calls=calls, pixels=rows * calls)


def _pointwise(cin=24, cout=40, hw=6, stride=2, name="pw"):
    return ConvSpec(name=name, in_channels=cin, out_channels=cout, kernel=(1, 1), stride=(stride, stride),
                    out_spatial=(hw, hw), batch=2, bias=True)


def test_candidate_ranks_of_a_lowrank_pair_are_geometric_below_break_even():
    for spec in (_linear(768, 3072, rows=197), _pointwise(64, 256), _linear(48, 64)):
        ranks = candidate_ranks(spec)
        be = cost.breakeven_rank(spec)
        assert 1 <= len(ranks) <= 7 and ranks == sorted(set(ranks))
        assert all(cost.separable_flops(spec, r) < cost.dense_flops(spec) for r in ranks)
        assert ranks[-1] == math.ceil(be) - 1  # the largest rank that still saves FLOPs is timed
        assert all(b / a <= 1.6 for a, b in zip(ranks, ranks[1:]))  # steps of about sqrt(2), not every rank
    assert candidate_ranks(_linear(768, 3072, rows=197))[-2] % 8 == 0
    assert candidate_ranks(_linear(64, 1)) == []  # break-even rank below 1: nothing to time


def test_eager_timer_times_linear_and_pointwise_layers_dense_and_as_pairs():
    t = LayerTimer("cpu", reps=2, max_seconds=0.02)
    lin, pw = _linear(calls=2), _pointwise()
    for spec, dense_cls, pair_cls in ((lin, nn.Linear, LowRankLinear), (pw, nn.Conv2d, LowRankConv2d)):
        # the timed layers are the layer itself and the pair the pass installs, on the layer's input
        dense, x = t._build(spec, None)
        pair, _ = t._build(spec, 3)
        assert type(dense) is dense_cls and type(pair) is pair_cls and pair.rank == 3
        assert tuple(x.shape) == layer_input(spec)[0]
        with torch.no_grad():
            assert dense(x).shape == pair(x).shape
        ms = [t.dense_ms(spec)] + [t.separable_ms(spec, r) for r in candidate_ranks(spec)]
        assert all(math.isfinite(v) and v > 0 for v in ms)
        assert t.form_times(spec, 3) is None and not t.gathered(spec, 3)  # one form: nothing to gather
    assert x.shape == (2, 24, 11, 11) and pair.stride == (2, 2)  # the 1x1 conv's stride on its input size
    assert layer_input(lin)[0] == (10, 48)  # rows of one call
    n = t.measured
    assert t.dense_ms(lin) == pytest.approx(2 * t.dense_ms(_linear(calls=1)))  # one call's rows, timed once, twice
    assert t.measured == n  # the same call shape: from the cache
    # the cache tells kinds apart: a KxK conv and a 1x1 conv of the same channels and output are other layers
    kxk = ConvSpec(name="k", in_channels=24, out_channels=40, kernel=(3, 3), stride=(2, 2), out_spatial=(6, 6),
                   batch=2)
    assert t.key(kxk, None) != t.key(pw, None) and t.key(kxk, 3) != t.key(pw, 3)
    assert t.key(lin, None) != t.key(_linear(rows=20, calls=1), None)  # rows are part of a linear layer's key


def test_inductor_timer_compiles_and_times_a_lowrank_pair():
    """runtime="inductor": the layer and its pair are compiled before they are timed (a rank off the candidate
    list: the pair and the dense layer only, two compiles)."""
    from dsrewrite.timing.runtimes import get_runtime

    t = get_runtime("inductor").layer_timer(torch.device("cpu"), torch.float32, "auto", "contiguous", None, False)
    t.reps, t.max_seconds = 2, 0.02
    spec = _linear()
    assert 5 not in candidate_ranks(spec)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # scalar kernels: a faster cold compile
        ms = t.separable_ms(spec, 5), t.dense_ms(spec)
    assert all(math.isfinite(v) and v > 0 for v in ms) and t.measured == 2
    assert t.key(spec, 5) != LayerTimer("cpu").key(spec, 5)  # eager and Inductor timings are cached apart


def test_lowrank_costs_use_the_pair_view():
    lin, pw = _linear(), _pointwise()
    for spec in (lin, pw):
        k = 5
        assert FlopCost().separable(spec, k) == 2 * k * (spec.in_channels + spec.out_channels) * spec.out_pixels
        assert ParamCost().separable(spec, k) == k * (spec.in_channels + spec.out_channels) + spec.out_channels * spec.bias
        assert FlopCost().candidates(spec) == list(range(1, min(spec.in_channels, spec.out_channels) + 1))
    thin = _linear(48, 1)
    assert FlopCost().no_saving(thin, 1.0, {}) == "low-rank pair saves nothing (break-even rank 0.98 <= 1)"

    class Gathering:  # a timer that would gather every pair: a low-rank pair has no gathered form
        def dense_ms(self, spec):
            return 1.0

        def separable_ms(self, spec, rank):
            return 2.0

        def gathered(self, spec, rank):
            return True

    p = LatencyCost(Gathering())
    assert not p.gathers(lin, 3) and not p.gathers(pw, 3)
    assert p.gathers(ConvSpec(name="k", in_channels=8, out_channels=8, kernel=(3, 3), out_spatial=(4, 4)), 3)
    assert p.no_saving(lin, 1.0, {3: 2.0}) == ("low-rank pair measured slower than the original "
                                               "(2.000 ms at rank 3 vs 1.000 ms)")


def test_ort_timer_times_lowrank_pairs_built_like_the_layer():
    """The onnxruntime layer timer's pair models compute the low-rank pair (checked against numpy on their own
    random weights), and it times them and the dense layer."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from dsrewrite.onnx.latency import OrtLayerTimer, conv_model, pair_model

    rng = np.random.default_rng(0)
    for spec in (_linear(), _pointwise()):
        model, shape = pair_model(spec, 4, rng)
        w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
        x = rng.standard_normal(shape).astype(np.float32)
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        if spec.kind == "linear":
            ref = x.astype(np.float64) @ w["r"].T @ w["e"].T + w["b"]
        else:
            xs = x.astype(np.float64)[:, :, ::2, ::2]  # the stride on the reduction
            ref = np.einsum("ok,kc,nchw->nohw", w["e"][:, :, 0, 0], w["r"][:, :, 0, 0], xs) + w["b"][:, None, None]
        assert y.shape == ref.shape and np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4
        dense, dshape = conv_model(spec, rng)
        assert dshape == shape and [n.op_type for n in dense.graph.node] == (
            ["Gemm"] if spec.kind == "linear" else ["Conv"])
    t = OrtLayerTimer(reps=2, max_seconds=0.02)
    for spec in (_linear(), _pointwise()):
        ms = [t.dense_ms(spec)] + [t.separable_ms(spec, r) for r in candidate_ranks(spec)]
        assert all(math.isfinite(v) and v > 0 for v in ms)


def _synthetic(monkeypatch):
    """A deterministic device: time = launch overhead + FLOPs at 10 GFLOP/s; a pair pays two launches (0.2 ms
    against 0.02 ms), so a layer with little work is slower as a pair. Each timed variant is still built (the
    modules the timer would run) and run once."""
    from dsrewrite import api
    from dsrewrite.plan import inputs as plan_inputs
    from dsrewrite.timing import layers as latency

    monkeypatch.setattr(latency, "_CACHE", {})

    def ms(spec, rank):
        flops = cost.dense_flops(spec) if rank is None else cost.separable_flops(spec, rank)
        return (0.02 if rank is None else 0.2) + flops * 1e-7

    built = []

    def measure(self, spec, variants):
        for r, g in variants:
            mod, x = self._build(spec, r, g)
            with torch.no_grad():
                mod(x)
            built.append((spec.kind, type(mod).__name__))
        return [ms(spec, r) / latency.calls_scale(spec) for r, _ in variants]  # one call's time

    specs = {}

    def model_time(model):
        t = 0.3
        for name, spec in specs.items():
            mod = model.get_submodule(name)
            t += ms(spec, mod.rank if hasattr(mod, "rank") else None)
        return t

    def fake_time_models(original, new, args, report, memory_format=None, **kw):
        report.time_before_ms, report.time_after_ms = model_time(original), model_time(new)
        report.time_noise = 0.0

    monkeypatch.setattr(latency.LayerTimer, "_measure_variants", measure)
    monkeypatch.setattr(plan_inputs, "time_fn", lambda fn, args, **kw: 0.3 + sum(ms(s, None) for s in specs.values()))
    monkeypatch.setattr(api, "time_models", fake_time_models)
    return specs, built


def test_target_latency_over_all_kinds_plans_linear_layers_by_time(monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    x = torch.randn(64, 256)
    specs, built = _synthetic(monkeypatch)
    for name in ("0", "2", "4"):
        lin = m.get_submodule(name)
        specs[name] = _linear(lin.in_features, lin.out_features, rows=64, batch=64, name=name)
    r = dsrewrite.rewrite(m, x, target_latency=0.9, kinds="all")
    rep = r.report
    by = {L.name: L for L in rep.layers}
    assert ("linear", "LowRankLinear") in built and ("linear", "Linear") in built
    for L in rep.layers:
        assert L.kind == "linear" and L.time_before_ms is not None and L.time_after_ms is not None
        assert not L.gather_input
    wide = [by[n] for n in ("0", "2") if by[n].rewritten]
    assert wide, rep.table()  # the wide layers win on the synthetic device: one is enough for 0.9
    for L in wide:
        assert L.time_after_ms < L.time_before_ms and L.policy == "target_latency"
        assert isinstance(r.model.get_submodule(L.name), LowRankLinear)
    # 256 -> 4 over 64 rows: 0.13 MFLOP, less than the pair's extra launch: measured slower, kept dense
    assert not by["4"].rewritten and "low-rank pair measured slower than the original" in by["4"].reason
    assert by["4"].time_after_ms == by["4"].time_before_ms
    rounds = rep.latency_rounds  # the whole-model check ran and kept the plan
    assert rounds and rounds[-1].get("kept") and rep.time_ratio is not None and rep.time_ratio <= 0.9
    with torch.no_grad():
        y, ref = r.model(x), m(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
