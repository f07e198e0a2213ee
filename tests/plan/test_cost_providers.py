"""Cost providers and the budget registry (dsrewrite/costs.py, budget.allocate_budget): a budget kind
registered in this test alone plans through plan_sites; the built-in providers price as the cost model."""
import pytest
import torch

from dsrewrite.plan import cost_model as cost
from dsrewrite.plan.cost_providers import FlopCost, LatencyCost, ParamCost
from dsrewrite.errors import DsrewriteError
from dsrewrite.ir import ConvSite, ConvSpec
from dsrewrite.config import RewriteConfig
from dsrewrite.plan.planner import PlanInputs, plan_sites


def _sites(gen, shapes=((8, 16), (16, 32), (32, 32), (32, 4))):
    out = []
    for i, (cin, cout) in enumerate(shapes):
        spec = ConvSpec(name=f"conv{i}", in_channels=cin, out_channels=cout, kernel=(3, 3), out_spatial=(6, 6))
        out.append(ConvSite(spec, torch.randn(cout, cin, 3, 3, generator=gen), None, handle=i))
    return out


def test_a_budget_registered_in_a_test_plans_through_plan_sites(gen, taps):
    sites = _sites(gen)
    total = sum(s.spec.in_channels * s.spec.out_channels for s in sites)
    ds = plan_sites(sites, PlanInputs(budget=(taps, 0.3)))
    after = sum(s.spec.in_channels * (d.report.rank if d.rewritten else s.spec.out_channels)
                for s, d in zip(sites, ds))
    assert after <= 0.3 * total
    assert any(d.rewritten for d in ds)
    for d in ds:
        if d.rewritten:
            assert d.report.policy == taps
        else:
            assert d.report.reason == "left dense by the target_taps allocation (others lose less per filter saved)"
    # refused with the smallest reachable fraction, in the provider's words
    least = sum(s.spec.in_channels for s in sites) / total
    with pytest.raises(DsrewriteError, match=rf"target_taps=0\.01 is not achievable: the smallest reachable is "
                                             rf"{least:.4f} of the model's depthwise filters"):
        plan_sites(sites, PlanInputs(budget=(taps, 0.01), strict=True))
    notes = []  # best effort (the default): the cheapest plan, with a note saying the budget was not met
    ds = plan_sites(sites, PlanInputs(budget=(taps, 0.01)), notes)
    assert sum(s.spec.in_channels * (d.report.rank if d.rewritten else s.spec.out_channels)
               for s, d in zip(sites, ds)) == pytest.approx(least * total)
    assert notes == [f"{taps}=0.01 NOT MET: the smallest reachable is {least:.4f} of the model's depthwise filters; "
                     "planned that, the cheapest plan (strict=True refuses)"]
    with pytest.raises(DsrewriteError, match="give one budget at a time, got target_flops, target_taps"):
        RewriteConfig(target_flops=0.5, budget=(taps, 0.5))
    with pytest.raises(DsrewriteError, match="either rank or target_taps"):
        plan_sites(sites, PlanInputs(rank=2, budget=(taps, 0.5)))


def test_unknown_budget_names_the_known_ones(gen):
    with pytest.raises(DsrewriteError, match=r"unknown budget 'target_joules' \(known: .*target_flops"):
        plan_sites(_sites(gen), PlanInputs(budget=("target_joules", 0.5)))


def test_generic_budget_equals_the_keyword(gen):
    sites = _sites(gen)
    a = plan_sites(sites, PlanInputs.from_config(RewriteConfig(target_params=0.5)))
    b = plan_sites(sites, PlanInputs(budget=("target_params", 0.5)))
    assert [(d.report.rank, d.report.reason, d.report.policy) for d in a] == \
           [(d.report.rank, d.report.reason, d.report.policy) for d in b]


def test_builtin_providers_price_as_the_cost_model():
    spec = ConvSpec(name="c", in_channels=8, out_channels=16, kernel=(3, 3), out_spatial=(5, 5))
    flops, params = FlopCost(), ParamCost()
    assert flops.dense(spec) == cost.dense_flops(spec) and flops.separable(spec, 3) == cost.separable_flops(spec, 3)
    assert params.dense(spec) == cost.dense_params(spec)
    assert params.separable(spec, 3) == cost.separable_params(spec, 3)
    unknown = ConvSpec(name="u", in_channels=8, out_channels=16, kernel=(3, 3))
    assert flops.dense(unknown) is None and flops.why_not(unknown) == "output shape unknown: no FLOPs to count"
    assert params.dense(unknown) == cost.dense_params(unknown)
    assert flops.total([spec, unknown], [], None) == cost.dense_flops(spec)
    assert flops.total([spec], [], 123.0) == 123.0


class _Timer:
    def dense_ms(self, spec):
        return 1.0

    def separable_ms(self, spec, rank):
        return 0.5 + 0.1 * rank


def test_latency_provider_reports_times_and_form():
    spec = ConvSpec(name="c", in_channels=64, out_channels=64, kernel=(3, 3), out_spatial=(8, 8))
    p = LatencyCost(_Timer())
    assert p.candidates(spec) and not p.gathered(spec, 2)  # no gathered(): one depthwise form
    assert p.total([spec], [1.0, 2.0], 2.5) == 3.0  # at least the layers' own times
    assert "measured slower than the original (1.100 ms at rank 6 vs 1.000 ms)" in p.no_saving(
        spec, 1.0, {6: 1.1, 8: 1.3})
    assert "saves nothing" in p.no_saving(spec, 1.0, {})
