"""Budgeted rank allocation (dsrewrite/budget.py, pipeline.plan_sites budgets): budgets met and checked against
FlopCounterMode, allocation not uniform, infeasible budgets refused with the smallest reachable value, energy."""
import random
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsrewrite
from dsrewrite.plan import cost_model as cost
from dsrewrite.plan.allocate import LayerOptions, Option, allocate
from dsrewrite.errors import DsrewriteError
from dsrewrite.plan.factorize import rank_errors
from dsrewrite.ir import ConvSite, ConvSpec
from dsrewrite.timing.measure import count_params
from dsrewrite.plan.planner import PlanInputs, Totals, plan_sites

from tests.conftest import derived_seed, rel_err

X64 = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return int(c.get_total_flops())


def test_allocate_meets_saving_and_no_layer_can_be_raised():
    rng = random.Random(derived_seed("allocate", 63))
    for _ in range(50):
        layers = []
        for k in range(rng.randint(1, 5)):
            dense = rng.uniform(5, 10)
            opts = [Option(r, dense * r / 6 * rng.uniform(0.7, 1.0), (1 - r / 6) ** 2 * rng.uniform(0.5, 1.5))
                    for r in range(1, 6)]
            layers.append(LayerOptions(k, dense, opts))
        most = sum(L.dense - min(o.cost for o in L.options) for L in layers)
        need = rng.uniform(0, most)
        choice = allocate(layers, need)
        cost_of = lambda L, o: L.dense if o is None else o.cost  # noqa: E731
        saved = sum(L.dense - cost_of(L, choice[L.key]) for L in layers)
        assert saved >= need - 1e-9
        # local optimality: no layer can move to a lower-error option and still meet the saving
        for L in layers:
            cur = choice[L.key]
            for o in L.options + [None]:
                err_o = 0.0 if o is None else o.error
                err_c = 0.0 if cur is None else cur.error
                if err_o < err_c - 1e-12:
                    assert saved - (cost_of(L, o) - cost_of(L, cur)) < need - 1e-9
    with pytest.raises(ValueError):
        allocate([LayerOptions(0, 10.0, [Option(1, 6.0, 0.5)])], 5.0)


def test_target_flops_met_on_resnet18_and_not_uniform(resnet18):
    x = torch.randn(X64)
    r = dsrewrite.rewrite(resnet18, x, target_flops=0.5, measure_time=False)
    rep = r.report
    measured = _flops(r.model, x)
    assert rep.flops_before == _flops(resnet18, x)
    assert measured == rep.flops_after
    assert measured / rep.flops_before <= 0.5 + 1e-9
    assert measured / rep.flops_before > 0.45  # the budget is used, not overshot wildly
    ranks = {L.rank for L in rep.rewritten if L.kernel == (3, 3)}
    assert len(ranks) > 1 or any("allocation" in (L.reason or "") for L in rep.skipped)
    assert all(L.policy == "target_flops" for L in rep.rewritten)
    with torch.no_grad():
        assert torch.isfinite(r.model(x)).all()


def test_target_params_met_on_resnet18(resnet18):
    x = torch.randn(X64)
    r = dsrewrite.rewrite(resnet18, x, target_params=0.6, measure_time=False)
    assert count_params(r.model) / count_params(resnet18) <= 0.6 + 1e-9
    assert r.report.params_after == count_params(r.model)
    assert {L.policy for L in r.report.rewritten} == {"target_params"}


def test_infeasible_budget_states_the_smallest_reachable_value(resnet18):
    x = torch.randn(X64)
    with pytest.raises(DsrewriteError, match=r"target_flops=0.01 is not achievable") as e:
        dsrewrite.rewrite(resnet18, x, target_flops=0.01, measure_time=False, strict=True)
    least = float(re.search(r"smallest reachable is ([0-9.]+)", str(e.value)).group(1))
    # every eligible layer (a budget plans all kinds) at rank 1 is cheaper than dense here: the floor is the
    # rank-1 model of every kind
    floor = dsrewrite.rewrite(resnet18, x, rank=1, kinds="all", measure_time=False)
    assert least == pytest.approx(_flops(floor.model, x) / floor.report.flops_before, abs=1e-4)
    # best effort (the default): that cheapest plan, with a first note saying the budget was not met
    cheapest = dsrewrite.rewrite(resnet18, x, target_flops=0.01, measure_time=False)
    assert cheapest.report.notes[0].startswith(f"target_flops=0.01 NOT MET: the smallest reachable is {least:.4f}")
    assert _flops(cheapest.model, x) / cheapest.report.flops_before == pytest.approx(least, abs=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(target_flops=0.5, target_params=0.5), "one budget at a time"),
    (dict(target_flops=1.5), r"target_flops must be in \(0, 1\]"),
    (dict(energy=0.0), r"energy must be in \(0, 1\]"),
    (dict(target_flops="half"), "must be a number"),
    (dict(target_flops=0.5, rank=4), "either rank or target_flops"),
])
def test_bad_budget_arguments(kw, match):
    m = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(DsrewriteError, match=match):
        dsrewrite.rewrite(m, torch.randn(1, 3, 8, 8), measure_time=False, **kw)


def test_energy_policy_picks_the_smallest_rank_keeping_the_energy(gen):
    m = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2)).eval()
    x = torch.randn(1, 16, 16, 16, generator=gen)
    r = dsrewrite.rewrite(m, x, energy=0.6, measure_time=False)
    assert len(r.report.rewritten) == 2
    for L, conv in zip(r.report.rewritten, (m[0], m[2])):
        errs = rank_errors(conv.weight)
        assert L.policy == "energy"
        assert 1 - errs[L.rank] ** 2 >= 0.6 - 1e-9
        assert 1 - errs[L.rank - 1] ** 2 < 0.6
    r = dsrewrite.rewrite(m, x, energy=0.9999, measure_time=False)
    assert r.report.rewritten == []
    assert all("saves nothing" in L.reason for L in r.report.skipped)


def test_layer_that_saves_nothing_is_skipped_with_the_reason(gen):
    # Cout=1: even rank 1 costs K + 1 multiply-adds per input channel against K (break-even rank 0.9)
    m = nn.Sequential(nn.Conv2d(4, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 64, 3, padding=1)).eval()
    x = torch.randn(1, 4, 16, 16, generator=gen)
    r = dsrewrite.rewrite(m, x, target_flops=0.6, measure_time=False)
    assert "saves nothing" in r.report.layer("0").reason
    assert r.report.layer("2").rewritten


def test_plan_sites_budget_on_framework_neutral_sites(gen):
    """The ONNX frontend's route: numpy weights, no torch module; totals given by the caller."""
    sites = []
    for i, (cin, cout) in enumerate([(8, 16), (16, 32), (32, 32)]):
        w = torch.randn(cout, cin, 3, 3, generator=gen).numpy()
        spec = ConvSpec(name=f"conv{i}", in_channels=cin, out_channels=cout, kernel=(3, 3), out_spatial=(10, 10),
                        origin="onnx")
        sites.append(ConvSite(spec, w, None, handle=i))
    total = sum(cost.dense_flops(s.spec) for s in sites) * 1.2  # 20% in other ops
    ds = plan_sites(sites, PlanInputs(budget=("target_flops", 0.6), totals=Totals(flops=total)))
    after = total - sum(d.report.flops_before - d.report.flops_after for d in ds if d.rewritten)
    assert after / total <= 0.6 + 1e-12
    for d in ds:
        if d.rewritten:
            spec, f = d.site.spec, d.factors
            pw = torch.as_tensor(f.pointwise).reshape(spec.out_channels, spec.in_channels, -1).double()
            dw = torch.as_tensor(f.depthwise).reshape(spec.in_channels, f.rank, -1).double()
            dense = torch.einsum("ocr,crk->ock", pw, dw)
            w = torch.as_tensor(np.asarray(d.site.weight)).double().reshape(dense.shape)
            assert rel_err(dense, w) == pytest.approx(rank_errors(d.site.weight)[d.factors.rank], rel=1e-4)
    # the old positional call keeps working
    assert [d.report.policy for d in plan_sites(sites, PlanInputs(rank=2))] == ["uniform"] * 3


def test_data_aware_allocation_uses_calibration_statistics(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1)).eval()
    cal = torch.nn.functional.avg_pool2d(torch.randn(16, 3, 16, 16, generator=gen), 3, 1, 1)
    r = dsrewrite.rewrite(m, cal[:1], target_flops=0.5, calibration=cal, measure_time=False)
    assert r.report.flops_ratio <= 0.5 + 1e-9
    assert all(L.calib_error_after is not None and L.calib_error_after <= L.calib_error_before + 1e-9
               for L in r.report.rewritten)
