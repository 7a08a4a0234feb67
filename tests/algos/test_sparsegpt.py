"""SparseGPT: error ordering against Wanda and magnitude, exact patterns, joint quantization."""

import pytest
import torch

from memfit.algos.prune import magnitude_mask, wanda_mask
from memfit.algos.sparsegpt import SparseQuantResult, sparsegpt
from memfit.errors import UserError
from memfit.formats.grid import IntFormat, dequantize, fake_quantize


def _data(n=2048, k=256, out=128, seed=0):
    """Correlated inputs (random mixing) with 16 outlier columns at random positions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.3 * torch.eye(k)
    X = torch.randn(n, k, generator=g) @ mix
    X[:, torch.randperm(k, generator=g)[:16]] *= 20.0
    W = torch.randn(out, k, generator=g)
    return X, W, 2.0 / n * X.T @ X


def _out_err(X, W, Wp):
    return float((X @ (W - Wp).T).norm() / (X @ W.T).norm())


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"nm": (2, 4)}])
def test_sparsegpt_beats_wanda_beats_magnitude(data, spec):
    X, W, H = data
    e_mag = _out_err(X, W, W * magnitude_mask(W, **spec))
    e_wanda = _out_err(X, W, W * wanda_mask(W, X.norm(dim=0), **spec))
    w_new, mask = sparsegpt(W, H, **spec)
    e_sgpt = _out_err(X, W, w_new)
    print(f"\n{spec}: relative output error magnitude={e_mag:.4f} wanda={e_wanda:.4f} "
          f"sparsegpt={e_sgpt:.4f}")
    assert e_sgpt < 0.9 * e_wanda < 0.9 * e_mag
    assert (w_new[~mask] == 0).all()
    assert mask.float().mean() == 0.5


def test_unstructured_count_is_exact_with_ragged_block():
    X, W, H = _data(n=512, k=200, out=24, seed=1)
    w_new, mask = sparsegpt(W, H, sparsity=0.3, block_size=64)  # blocks 64,64,64,8
    assert int((~mask).sum()) == round(0.3 * 24 * 200)  # 1440
    assert (w_new[~mask] == 0).all() and (w_new[mask] != 0).all()
    assert w_new.dtype == W.dtype


def test_four_eight_pattern_in_every_group():
    X, W, H = _data(n=512, k=64, out=16, seed=2)
    w_new, mask = sparsegpt(W, H, nm=(4, 8), block_size=32)
    assert (mask.view(16, 8, 8).sum(-1) == 4).all()
    assert ((w_new != 0).view(16, 8, 8).sum(-1) <= 4).all()


def test_joint_quantization_on_grid_and_better_than_wanda_then_rtn(data):
    X, W, H = data
    fmt = IntFormat(bits=4, group_size=64)
    r = sparsegpt(W, H, sparsity=0.5, fmt=fmt)
    assert isinstance(r, SparseQuantResult)
    assert r.codes.dtype == torch.uint8 and r.scale.shape == (128, 4) == r.zero.shape
    assert torch.equal(dequantize(r.codes, r.scale, r.zero, fmt) * r.mask, r.weight)
    assert (r.weight[~r.mask] == 0).all() and r.mask.float().mean() == 0.5
    e_joint = _out_err(X, W, r.weight)
    e_base = _out_err(X, W, fake_quantize(W * wanda_mask(W, X.norm(dim=0), 0.5), fmt))
    print(f"\n50% + int4 g64: sparsegpt joint={e_joint:.4f} wanda-then-rtn={e_base:.4f}")
    assert e_joint < 0.9 * e_base


def test_joint_quantization_ragged_group_and_nm():
    X, W, H = _data(n=512, k=200, out=16, seed=3)
    fmt = IntFormat(bits=3, group_size=64, symmetric=True)  # groups 64,64,64,8
    r = sparsegpt(W, H, nm=(2, 4), block_size=32, fmt=fmt)
    assert r.scale.shape == (16, 4)
    assert (r.mask.view(16, 50, 4).sum(-1) == 2).all()
    assert torch.equal(dequantize(r.codes, r.scale, r.zero, fmt) * r.mask, r.weight)


def test_dead_inputs_and_rank_deficient_hessian():
    X, W, H = _data(n=64, k=128, out=8, seed=4)  # 64 samples < 128 inputs: singular H
    X[:, 5] = 0.0
    H = 2.0 / 64 * X.T @ X
    w_new, mask = sparsegpt(W, H, sparsity=0.5, damp=0.0)  # damping must be raised
    assert torch.isfinite(w_new).all() and (w_new[:, 5] == 0).all()
    w_new, mask = sparsegpt(W, H, sparsity=0.5)  # default damping copes with few samples
    assert (w_new[:, 5] == 0).all() and mask.float().mean() == 0.5
    e_sgpt = _out_err(X, W, w_new)
    e_wanda = _out_err(X, W, W * wanda_mask(W, X.norm(dim=0), 0.5))
    print(f"\n64 samples, 128 inputs: sparsegpt={e_sgpt:.4f} wanda={e_wanda:.4f}")
    assert e_sgpt < e_wanda


def test_validation_errors():
    W, H = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(UserError, match="sparsity"):
        sparsegpt(W, H, sparsity=1.0)
    with pytest.raises(UserError, match="2:3"):
        sparsegpt(W, H, nm=(2, 3))
    with pytest.raises(UserError, match="block_size=12"):
        sparsegpt(W, H, nm=(2, 8), block_size=12)
    with pytest.raises(UserError, match=r"\(16, 16\)"):
        sparsegpt(W, torch.eye(8), sparsity=0.5)
    with pytest.raises(UserError, match="NaN"):
        sparsegpt(W, torch.full((16, 16), float("nan")), sparsity=0.5)


def test_zero_sparsity_is_identity_and_with_a_format_beats_rtn(data):
    X, W, H = data
    w_new, mask = sparsegpt(W, H, sparsity=0.0)
    assert torch.equal(w_new, W) and mask.all()
    for fmt in (IntFormat(bits=4, group_size=None), IntFormat(bits=4, group_size=32,
                                                              zero_point="float")):
        r = sparsegpt(W, H, sparsity=0.0, fmt=fmt)
        e_q, e_rtn = _out_err(X, W, r.weight), _out_err(X, W, fake_quantize(W, fmt))
        print(f"\nint4 g={fmt.group_size} {fmt.zero_point}: sweep={e_q:.4f} rtn={e_rtn:.4f}")
        assert e_q < 0.9 * e_rtn
