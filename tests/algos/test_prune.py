"""Magnitude / Wanda / N:M masks and OWL sparsities: exact counts, quality, validation."""

import pytest
import torch

from memfit.algos.prune import (magnitude_mask, nm_mask, outlier_ratio, owl_sparsities,
                                wanda_mask)
from memfit.errors import UserError


def _data(n=1024, k=256, out=128, seed=0):
    """Inputs with 16 outlier columns at random positions (scaled x20), and a weight."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g)
    X[:, torch.randperm(k, generator=g)[:16]] *= 20.0
    W = torch.randn(out, k, generator=g)
    return X, W


def _out_err(X, W, Wp):
    """Relative output error ‖XWᵀ − XWpᵀ‖ / ‖XWᵀ‖."""
    return float((X @ (W - Wp).T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("sparsity,k,pruned_per_row", [
    (0.0, 100, 0), (0.3, 100, 30), (0.5, 256, 128), (0.9, 100, 90), (0.25, 10, 3), (0.35, 10, 4)])
def test_unstructured_sparsity_is_exact_per_row(sparsity, k, pruned_per_row):
    W = torch.randn(7, k, generator=torch.Generator().manual_seed(1))
    norms = torch.rand(k, generator=torch.Generator().manual_seed(2)) + 0.1
    for mask in (magnitude_mask(W, sparsity), wanda_mask(W, norms, sparsity)):
        assert mask.dtype == torch.bool and mask.shape == W.shape
        assert (mask.sum(1) == k - pruned_per_row).all()


def test_magnitude_keeps_the_largest_in_each_row():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    mask = magnitude_mask(W, sparsity=0.5)
    a = W.abs()
    kept_min = torch.where(mask, a, torch.inf).amin(1)
    pruned_max = torch.where(mask, -torch.inf, a).amax(1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_keeps_exactly_n_in_every_group(n, m):
    X, W = _data(k=64, out=32)
    norms = X.norm(dim=0)
    for mask in (magnitude_mask(W, nm=(n, m)), wanda_mask(W, norms, nm=(n, m))):
        groups = mask.view(32, 64 // m, m)
        assert (groups.sum(-1) == n).all()
        assert mask.float().mean() == n / m


def test_nm_mask_picks_top_scores_in_each_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 4.0, 3.0, 2.0, 1.0]])
    expected = torch.tensor([[False, True, True, False, True, True, False, False]])
    assert torch.equal(nm_mask(scores, 2, 4), expected)


def test_wanda_with_uniform_norms_is_magnitude():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    ones = torch.full((32,), 3.0)
    assert torch.equal(wanda_mask(W, ones, 0.5), magnitude_mask(W, 0.5))
    assert torch.equal(wanda_mask(W, ones, nm=(2, 4)), magnitude_mask(W, nm=(2, 4)))


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"nm": (2, 4)}])
def test_wanda_beats_magnitude_with_outlier_columns(spec):
    X, W = _data()
    e_mag = _out_err(X, W, W * magnitude_mask(W, **spec))
    e_wanda = _out_err(X, W, W * wanda_mask(W, X.norm(dim=0), **spec))
    print(f"\n{spec}: relative output error magnitude={e_mag:.4f} wanda={e_wanda:.4f}")
    assert e_wanda < 0.8 * e_mag


def test_outlier_ratio_counts_scores_above_m_times_mean():
    W = torch.ones(10, 10)
    W[0, 0] = 1000.0  # mean score (99 + 1000)/100 = 10.99; only this one exceeds 5x that
    assert outlier_ratio(W, torch.ones(10)) == pytest.approx(0.01)
    norms = torch.ones(10)
    norms[3] = 100.0  # mean = (1000 + 10*100 + 89)/100 = 20.89: column 3 (100) > 4x, < 5x
    assert outlier_ratio(W, norms, m=4.0) == pytest.approx(0.11)
    assert outlier_ratio(W, norms, m=5.0) == pytest.approx(0.01)
    assert outlier_ratio(torch.ones(4, 4), torch.ones(4)) == 0.0


def test_owl_sparsities_mean_band_and_order():
    ratios = {"l0": 0.01, "l1": 0.05, "l2": 0.02, "l3": 0.10}
    s = owl_sparsities(ratios, target=0.6, lam=0.08)
    vals = torch.tensor(list(s.values()), dtype=torch.float64)
    assert float(vals.mean()) == pytest.approx(0.6, abs=1e-12)
    assert ((vals >= 0.6 - 0.08 - 1e-12) & (vals <= 0.6 + 0.08 + 1e-12)).all()
    assert float((vals - 0.6).abs().max()) == pytest.approx(0.08)
    assert s["l3"] < s["l1"] < s["l2"] < s["l0"]  # more outliers -> lower sparsity
    assert owl_sparsities({"a": 0.3, "b": 0.3}, 0.5, 0.1) == {"a": 0.5, "b": 0.5}


def test_validation_errors_name_the_numbers():
    W = torch.randn(4, 12)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(UserError, match="sparsity"):
            magnitude_mask(W, bad)
    with pytest.raises(UserError, match="4:4"):
        magnitude_mask(W, nm=(4, 4))
    with pytest.raises(UserError, match="5:4"):
        wanda_mask(W, torch.ones(12), nm=(5, 4))
    with pytest.raises(UserError, match="M=8 .* width 12"):
        magnitude_mask(W, nm=(2, 8))
    with pytest.raises(UserError, match="exactly one"):
        magnitude_mask(W)
    with pytest.raises(UserError, match="exactly one"):
        magnitude_mask(W, 0.5, nm=(2, 4))
    with pytest.raises(UserError, match="col_norms"):
        wanda_mask(W, torch.ones(11), 0.5)
    with pytest.raises(UserError, match="lam"):
        owl_sparsities({"a": 0.1}, target=0.7, lam=0.3)
