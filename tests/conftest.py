"""Shared test setup. TRITON_INTERPRET must be set before triton is first imported in the process.

Random data: one seed per run, drawn from ``os.urandom`` unless given (``--seed N`` or ``DSREWRITE_TEST_SEED=N``),
shown in the header and in every failing test's report. Before each test sets up (fixtures of every scope
included), torch's, numpy's and Python's global generators are seeded from it, so a test draws the same data
alone or in any order, and the same again when replayed with that seed; the ``gen`` fixture and ``np_rng()`` give
generators seeded from it too. Hypothesis tests draw their own examples (a failure prints the falsifying one).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import random  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository root, wherever the test file sits under tests/
SEED_ENV = "DSREWRITE_TEST_SEED"
_seed = None  # this run's seed, set in pytest_configure
_draws = itertools.count()  # np_rng()'s counter, restarted before each test


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- random seed
def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None, metavar="N",
                     help=f"replay the random data of a run: the seed its report names (or {SEED_ENV}=N)")


def pytest_configure(config):
    global _seed
    seed, env = config.getoption("seed"), os.environ.get(SEED_ENV, "").strip()
    if seed is None and env:
        try:
            seed = int(env)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV}={env!r} is not an integer") from None
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if seed < 0:
        raise pytest.UsageError(f"the random seed must be >= 0, got {seed}")
    _seed = seed


def run_seed() -> int:
    """This run's seed: the one to replay it with."""
    if _seed is None:
        raise RuntimeError("no random seed: tests.conftest is used outside a pytest run")
    return _seed


def derived_seed(name: str, bits: int = 31) -> int:
    """A seed in ``[0, 2**bits)`` for one purpose (``name``), derived from the run's seed: the same in every
    test of the run, and again when the run is replayed."""
    hi, lo = np.random.SeedSequence([run_seed(), zlib.crc32(name.encode())]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) % (1 << bits)


def np_rng() -> np.random.Generator:
    """A fresh numpy generator: the next of the running test's sequence (replayed with the run's seed). Call it
    inside tests and fixtures, not at import."""
    return np.random.default_rng([run_seed(), zlib.crc32(b"np_rng"), next(_draws)])


def pytest_report_header(config):
    return f"random seed: {_seed} (replay: --seed {_seed}, or {SEED_ENV}={_seed})"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures: the global generators from the run's seed, the seed kept with the test."""
    global _draws
    _draws = itertools.count()
    torch.manual_seed(derived_seed("torch", 63))
    np.random.seed(derived_seed("numpy", 32))
    random.seed(derived_seed("random", 63))
    item.user_properties.append(("random seed", _seed))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names the seed it ran with and how to replay it."""
    report = yield
    if report.failed and _seed is not None:
        report.sections.append(("random seed", f"{_seed}: replay with {SEED_ENV}={_seed} python -m pytest "
                                               f"'{item.nodeid}' (or --seed {_seed})"))
    return report


def pytest_terminal_summary(terminalreporter):
    """After a run with failures: its seed once more, below them."""
    if _seed is not None and (terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")):
        terminalreporter.write_line(f"random seed: {_seed} (replay: --seed {_seed}, or {SEED_ENV}={_seed})")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded from the run's seed (new random data every run; replay with the seed the report names)."""
    return torch.Generator().manual_seed(derived_seed("gen", 63))


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
