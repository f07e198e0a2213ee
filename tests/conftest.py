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
