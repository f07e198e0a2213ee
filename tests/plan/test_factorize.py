"""Factorisation maths: exact at full rank, optimal (Eckart-Young) at lower rank, error monotone in rank."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsrewrite.plan.factorize import factorize, full_rank, rank_errors
from tests.conftest import np_rng, rel_err


def _dense_from(f, kernel):
    cout = f.pointwise.shape[0]
    cin = f.depthwise.shape[0] // f.rank
    dw = f.depthwise.reshape(cin, f.rank, -1).double()
    pw = f.pointwise.reshape(cout, cin, f.rank).double()
    return torch.einsum("ocr,crk->ock", pw, dw).reshape(cout, cin, *kernel)


@pytest.mark.parametrize("shape", [(16, 5, 3, 3), (4, 3, 5, 5), (8, 6, 1, 7), (7, 2, 3, 1), (6, 4, 5)])
def test_full_rank_is_exact(shape, gen):
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    f = factorize(w, full_rank(w.shape))
    assert f.rank == min(shape[0], int(np.prod(shape[2:])))
    assert f.error < 1e-12
    assert rel_err(_dense_from(f, shape[2:]), w) < 1e-12
    assert f.depthwise.shape == (shape[1] * f.rank, 1, *shape[2:])
    assert f.pointwise.shape == (shape[0], shape[1] * f.rank, *([1] * (len(shape) - 2)))


def test_rank_is_clamped_and_error_monotone(gen):
    w = torch.randn(12, 4, 3, 3, generator=gen)
    errs = [factorize(w, r).error for r in range(1, 12)]
    assert factorize(w, 100).rank == 9
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-6 and errs[0] > 0.1
    assert np.allclose(rank_errors(w)[1:10], errs[:9], atol=1e-9)


def test_error_is_reported_correctly_and_optimal(gen):
    """The reported error is the true reconstruction error, and equals the Eckart-Young optimum per channel."""
    w = torch.randn(10, 3, 3, 3, generator=gen, dtype=torch.float64)
    r = 2
    f = factorize(w, r)
    true = rel_err(_dense_from(f, (3, 3)), w)
    assert abs(true - f.error) < 1e-10
    # independent optimum: per-channel numpy SVD truncated to r
    best = 0.0
    for c in range(3):
        s = np.linalg.svd(w[:, c].reshape(10, 9).numpy(), compute_uv=False)
        best += (s[r:] ** 2).sum()
    assert abs(np.sqrt(best) / w.norm().item() - f.error) < 1e-10


def test_conv_equivalence_float64(gen):
    """Depthwise then pointwise conv equals the dense conv at full rank (F.conv2d reference)."""
    w = torch.randn(8, 5, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, 9, 11, generator=gen, dtype=torch.float64)
    f = factorize(w, 9, b)
    y = F.conv2d(F.conv2d(x, f.depthwise, None, 2, 1, 1, groups=5), f.pointwise, f.bias)
    assert rel_err(y, F.conv2d(x, w, b, 2, 1)) < 1e-12


def test_numpy_in_numpy_like_out():
    w = np_rng().standard_normal((6, 2, 3, 3)).astype(np.float32)
    f = factorize(w, 3)
    assert isinstance(f.depthwise, torch.Tensor) and f.depthwise.dtype == torch.float32


def test_zero_weight_and_bad_rank():
    f = factorize(torch.zeros(4, 2, 3, 3), 2)
    assert f.error == 0.0 and torch.isfinite(f.pointwise).all()
    with pytest.raises(ValueError):
        factorize(torch.randn(4, 2, 3, 3), 0)
