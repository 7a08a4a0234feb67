"""Low-rank factors: Eckart-Young, whitening beats plain SVD on outputs, randomized ≈ exact,
rank selection formulas, validation."""

import pytest
import torch

from memfit.algos.lowrank import (rank_for_energy, rank_for_params, randomized_svd_factors,
                                  svd_factors, whitened_svd_factors)
from memfit.errors import UserError


def _decaying(out=96, k=128, seed=0):
    """A weight with singular values 1/(1 + i/8) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, out, generator=g)).Q
    V = torch.linalg.qr(torch.randn(k, k, generator=g)).Q
    s = 1.0 / (1.0 + torch.arange(min(out, k)) / 8.0)
    return (U[:, :len(s)] * s) @ V[:, :len(s)].T, s


def _inputs(n=1024, k=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.3 * torch.eye(k)
    X = torch.randn(n, k, generator=g) @ mix
    X[:, torch.randperm(k, generator=g)[:8]] *= 20.0
    return X


def test_svd_factors_meet_eckart_young():
    W, s = _decaying()
    for r in (1, 16, 60):
        A, B = svd_factors(W, r)
        assert A.shape == (96, r) and B.shape == (r, 128) and A.dtype == torch.float32
        expected = float(s[r:].pow(2).sum().sqrt())
        assert float((W - A @ B).norm()) == pytest.approx(expected, rel=1e-4)
    A, B = svd_factors(W, 96)
    assert float((W - A @ B).abs().max()) < 1e-5
    # balanced split: both factors carry sqrt(sigma)
    assert torch.allclose(A.norm(dim=0), B.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("rank", [16, 32])
def test_whitened_svd_beats_plain_svd_on_outputs(rank):
    W, _ = _decaying()
    X = _inputs()
    H = 2.0 / X.shape[0] * X.T @ X
    ref = (X @ W.T).norm()
    A, B = svd_factors(W, rank)
    Aw, Bw = whitened_svd_factors(W, H, rank)
    e_plain = float((X @ (W - A @ B).T).norm() / ref)
    e_white = float((X @ (W - Aw @ Bw).T).norm() / ref)
    print(f"\nrank {rank}: relative output error svd={e_plain:.4f} whitened={e_white:.4f}")
    assert e_white < 0.7 * e_plain
    assert Aw.shape == (96, rank) and Bw.shape == (rank, 128)


def test_whitened_svd_with_identity_gram_is_plain_svd():
    W, _ = _decaying()
    A, B = svd_factors(W, 20)
    Aw, Bw = whitened_svd_factors(W, torch.eye(128), 20, damp=0.0)
    assert torch.allclose(A @ B, Aw @ Bw, atol=1e-5)


def test_whitened_svd_survives_singular_gram():
    W, _ = _decaying()
    X = _inputs(n=64)  # 64 samples < 128 inputs
    Aw, Bw = whitened_svd_factors(W, X.T @ X, 32, damp=0.0)
    assert torch.isfinite(Aw).all() and torch.isfinite(Bw).all()


def test_randomized_svd_close_to_exact():
    W, _ = _decaying()
    for r in (8, 24):
        e_exact = float((W - torch.matmul(*svd_factors(W, r))).norm())
        e_rand = float((W - torch.matmul(*randomized_svd_factors(W, r))).norm())
        print(f"\nrank {r}: ‖W-AB‖ exact={e_exact:.5f} randomized={e_rand:.5f} "
              f"(+{100 * (e_rand / e_exact - 1):.2f}%)")
        assert e_exact <= e_rand < 1.03 * e_exact
    a1 = randomized_svd_factors(W, 8, seed=3)
    a2 = randomized_svd_factors(W, 8, seed=3)
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5])  # s^2 = 9, 4, 1, 1, 0.25; total 15.25
    assert rank_for_energy(s, 0.5) == 1          # 9/15.25 = 0.59
    assert rank_for_energy(s, 0.6) == 2          # 13/15.25 = 0.852
    assert rank_for_energy(s, 0.852) == 2
    assert rank_for_energy(s, 0.9) == 3          # 14/15.25 = 0.918
    assert rank_for_energy(s, 1.0) == 5
    assert rank_for_energy(s.flip(0), 0.5) == 1  # order of the input does not matter


def test_rank_for_params():
    assert rank_for_params(4096, 4096, 0.5) == 1024        # 1024 * 8192 = 0.5 * 4096^2
    assert rank_for_params(4096, 11008, 0.3) == 895       # 0.3*4096*11008/15104 = 895.6
    for out, k, f in [(4096, 11008, 0.3), (768, 3072, 0.25), (100, 100, 1.0), (7, 13, 0.77)]:
        r = rank_for_params(out, k, f)
        assert r * (out + k) <= f * out * k
        assert r == min(out, k) or (r + 1) * (out + k) > f * out * k
    assert rank_for_params(100, 100, 1.0) == 50


def test_validation_errors():
    W = torch.randn(8, 12)
    for bad in (0, -1, 9):
        with pytest.raises(UserError, match=f"rank={bad}"):
            svd_factors(W, bad)
        with pytest.raises(UserError, match=f"rank={bad}"):
            randomized_svd_factors(W, bad)
        with pytest.raises(UserError, match=f"rank={bad}"):
            whitened_svd_factors(W, torch.eye(12), bad)
    with pytest.raises(UserError, match=r"\(12, 12\)"):
        whitened_svd_factors(W, torch.eye(8), 4)
    with pytest.raises(UserError, match="keep_fraction"):
        rank_for_params(100, 100, 0.0)
    with pytest.raises(UserError, match="rank 1 needs"):
        rank_for_params(100, 100, 0.01)
    with pytest.raises(UserError, match="energy"):
        rank_for_energy(torch.ones(3), 1.5)
