"""Bit packing: exact round trips for every width, honest byte counts, the documented layout."""

import pytest
import torch

from memfit.errors import UserError
from memfit.kernels.packing import pack, packed_width, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 8, 9, 15, 16, 17, 63, 576, 577])
def test_round_trip_exact_including_ragged_k(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-k * bits // 8))
    assert torch.equal(unpack(packed, bits, k), codes)
    out = torch.full((5, k), 255, dtype=torch.uint8)  # into a buffer: every code overwritten
    assert unpack(packed, bits, k, out=out) is out and torch.equal(out, codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_and_zero_padding(bits):
    k = 13  # 13 * bits is not a multiple of 8 for bits 2, 3, 4
    codes = torch.full((2, k), 2**bits - 1, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, k), codes)
    used = k * bits - 8 * (packed.shape[1] - 1)  # bits of the last byte that hold codes
    assert int(packed[0, -1]) == (1 << used) - 1  # the rest of the last byte is zero padding


def test_packed_width_is_ceil_of_bits():
    assert packed_width(576, 3) == 216  # 8 codes per 3 bytes
    assert packed_width(577, 3) == 217
    assert packed_width(9, 2) == 3
    assert packed_width(9, 4) == 5
    assert packed_width(9, 8) == 9


def test_layout_little_endian_stream():
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    codes3 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(codes3, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_errors_name_the_problem():
    with pytest.raises(UserError, match="does not fit in 2 bits"):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(UserError, match="uint8"):
        pack(torch.tensor([[1]], dtype=torch.int32), 4)
    with pytest.raises(UserError, match="use one of"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 5)
    with pytest.raises(UserError, match="take 3 bytes per row"):
        unpack(torch.zeros(1, 4, dtype=torch.uint8), 3, 8)
