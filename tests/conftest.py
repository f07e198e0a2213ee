"""Shared test setup. TRITON_INTERPRET must be set before triton is first imported in the process."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded-from-entropy generator: every run draws new random data (seed printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")  # shown by pytest for a failing test
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def taps():
    """A toy budget kind registered for one test only: the fraction of depthwise filters kept (a dense conv counts
    as ``Cin*Cout`` of them). Shows that a new kind is one provider and one ``register_budget`` call."""
    from dsrewrite.plan.cost_providers import BUDGETS, CostProvider, register_budget

    class TapCost(CostProvider):
        name, quantity = "filter", "depthwise filters"

        def dense(self, spec):
            return spec.in_channels * spec.out_channels

        def candidates(self, spec):
            return list(range(1, spec.full_rank + 1))

        def separable(self, spec, rank):
            return spec.in_channels * rank

    register_budget("target_taps", lambda timer: TapCost())
    yield "target_taps"
    del BUDGETS["target_taps"]



@pytest.fixture(params=["fx", "swap"])
def route(request, monkeypatch) -> str:
    """Both torch routes: the fx pass, and the module-swap route (whole-model tracing made to fail); the value is
    the route name the report gives."""
    if request.param == "swap":
        from dsrewrite import api

        def untraceable(*a, **k):
            raise RuntimeError("tracing disabled by the test")
        monkeypatch.setattr(api, "trace", untraceable)
    return "fx" if request.param == "fx" else "fx-submodules+module-swap"


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch (no Dynamo cache entries or plans from another test); scalar C++ kernels
    (no SIMD) make Inductor's cold CPU compile about 3x faster and change nothing the tests check. The torch.compile
    test files use it for every test (``pytestmark``)."""
    from dsrewrite.dynamo.backend import clear_cache

    torch._dynamo.reset()
    clear_cache()
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield
    torch._dynamo.reset()
