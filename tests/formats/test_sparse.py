"""Sparse storage formats and modules: exact round trips, exact byte counts, checks, forward."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from memfit.algos.prune import magnitude_mask
from memfit.errors import UserError
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import (BitmaskWeight, Sparse24Weight, SparseLinear,
                                   pack_2bit, pack_bits, unpack_2bit, unpack_bits)


def _sparse(out=128, k=256, dtype=torch.float16, seed=0, **spec):
    W = torch.randn(out, k, generator=torch.Generator().manual_seed(seed))
    return (W * magnitude_mask(W, **spec)).to(dtype)


def test_bit_packing_round_trips():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(37, generator=g) > 0.5
    packed = pack_bits(bits)
    assert packed.shape == (5,) and torch.equal(unpack_bits(packed, 37), bits)
    assert pack_bits(torch.tensor([True] + [False] * 6 + [True])).item() == 0b10000001
    codes = torch.randint(0, 4, (23,), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_2bit(pack_2bit(codes), 23), codes.long())
    assert pack_2bit(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).item() == 0b00111001


def test_bitmask_50pct_fp16_bytes_and_round_trip():
    w = _sparse(sparsity=0.5)
    b = BitmaskWeight.from_dense(w)
    dense_bytes = 128 * 256 * 2  # 65536
    assert b.nbytes == 128 * 128 * 2 + 128 * 256 // 8 == 36864  # 0.5625 x dense
    assert b.nbytes <= 0.6 * dense_bytes
    out = b.to_dense()
    assert out.dtype == torch.float16 and torch.equal(out, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_any_pattern_and_odd_shape(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 13, generator=g).to(dtype)  # 65 weights: bitmask has 1 padding byte
    w[torch.rand(5, 13, generator=g) < 0.7] = 0
    w[0, 0] = -0.0  # a negative zero is a zero
    b = BitmaskWeight.from_dense(w)
    assert b.bitmask.shape == (9,)
    assert b.values.numel() == int((w != 0).sum())
    assert torch.equal(b.to_dense(), w)
    b2 = BitmaskWeight.from_tensors(load(save(b.tensors())))
    assert torch.equal(b2.to_dense(), w) and b2.shape == (5, 13)
    assert torch.equal(BitmaskWeight.from_dense(torch.zeros(3, 3)).to_dense(), torch.zeros(3, 3))


def test_bitmask_construction_checks():
    b = BitmaskWeight.from_dense(_sparse(8, 16, sparsity=0.5))
    with pytest.raises(UserError, match="marks 64 non-zeros but values holds 63"):
        BitmaskWeight(values=b.values[:-1], bitmask=b.bitmask, shape=(8, 16))
    with pytest.raises(UserError, match="uint8 of shape"):
        BitmaskWeight(values=b.values, bitmask=b.bitmask[:-1], shape=(8, 16))
    bad = pack_bits(torch.ones(10, dtype=torch.bool))  # 2 bytes, bits 8..9 set past 9 weights
    with pytest.raises(UserError, match="padding"):
        BitmaskWeight(values=torch.ones(9), bitmask=bad, shape=(3, 3))


def test_sparse24_fp16_bytes_and_round_trip():
    w = _sparse(nm=(2, 4))
    s = Sparse24Weight.from_dense(w)
    assert s.values.shape == (128, 128) and s.indices.shape == (128 * 256 // 8,)
    assert s.nbytes == 128 * 128 * 2 + 4096 == 36864
    assert s.nbytes <= 0.6 * 128 * 256 * 2
    assert torch.equal(s.to_dense(), w)
    s2 = Sparse24Weight.from_tensors(load(save(s.tensors())))
    assert torch.equal(s2.to_dense(), w)


def test_sparse24_sparser_groups_and_canonical_fill():
    w = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    s = Sparse24Weight.from_dense(w)
    assert unpack_2bit(s.indices, 6).tolist() == [0, 2, 0, 1, 0, 3]
    assert s.values.tolist() == [[0.0, 5.0, 0.0, 0.0, 1.0, 2.0]]
    assert torch.equal(s.to_dense(), w)


def test_sparse24_checks():
    w = torch.ones(3, 8)
    w[:, ::2] = 0
    w[1, 4] = 7.0  # row 1, inputs 4..7 has 3 non-zeros
    with pytest.raises(UserError, match="row 1, inputs 4..7 hold 3"):
        Sparse24Weight.from_dense(w)
    with pytest.raises(UserError, match="multiple of 4"):
        Sparse24Weight.from_dense(torch.zeros(2, 6))
    s = Sparse24Weight.from_dense(_sparse(2, 8, nm=(2, 4)))
    swapped = pack_2bit(torch.tensor([1, 0] * 4, dtype=torch.uint8))  # decreasing positions
    with pytest.raises(UserError, match="strictly increasing"):
        Sparse24Weight(values=s.values, indices=swapped, shape=(2, 8))
    with pytest.raises(UserError, match=r"values must have shape \(2, 4\)"):
        Sparse24Weight(values=s.values[:, :3], indices=s.indices, shape=(2, 8))


@pytest.mark.parametrize("layout,spec", [("bitmask", {"sparsity": 0.7}), ("2:4", {"nm": (2, 4)})])
def test_sparse_linear_matches_dense(layout, spec):
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(magnitude_mask(lin.weight, **spec))
    m = SparseLinear.from_linear(lin, layout)
    x = torch.randn(5, 64)
    assert torch.equal(m(x), F.linear(x, lin.weight, lin.bias))
    m2 = SparseLinear(m.weight_format(), torch.zeros(32))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
    assert m.nbytes() == m.weight_format().nbytes  # bias excluded
    assert m.weight_format().nbytes < 64 * 32 * 4 * (0.6 if layout == "2:4" else 0.35)


def test_low_rank_linear():
    g = torch.Generator().manual_seed(0)
    A, B, bias = torch.randn(48, 8, generator=g), torch.randn(8, 96, generator=g), torch.randn(48)
    m = LowRankLinear.from_factors(A, B, bias)
    x = torch.randn(4, 96, generator=g)
    diff = (m(x) - (x @ (A @ B).T + bias)).abs()
    print(f"\nLowRankLinear vs dense: max err {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 1e-4
    assert torch.equal(m.A, A) and torch.equal(m.B, B)
    assert m.nbytes() == (48 * 8 + 8 * 96) * 4  # 4608 vs 18432 dense (bias apart)
    assert LowRankLinear.from_factors(A.half(), B.half()).nbytes() == (48 * 8 + 8 * 96) * 2
    with pytest.raises(UserError, match="do not chain"):
        LowRankLinear.from_factors(A, B[:4])
    with pytest.raises(UserError, match="rank=0"):
        LowRankLinear(96, 48, 0)
