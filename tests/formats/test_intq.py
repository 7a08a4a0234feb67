"""PackedIntWeight: construction checks, exact codes/zeros round trip, nbytes == the formula."""

import pytest
import torch

from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight, format_nbytes

FORMATS = [
    IntFormat(bits=2, group_size=32),
    IntFormat(bits=3, group_size=64),
    IntFormat(bits=4, group_size=64, symmetric=True),
    IntFormat(bits=4, group_size=128, zero_point="float"),
    IntFormat(bits=4, group_size=None, scale_dtype="bfloat16"),
    IntFormat(bits=8, group_size=None, symmetric=True),
    IntFormat(bits=8, group_size=32, scale_dtype="float32"),
]


def quantized(fmt, out=48, k=576, seed=0):
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(seed))
    scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
    return grid.quantize(w, scale, zero, fmt), scale, zero


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("k", [576, 200])  # 200: ragged last group for every group size here
def test_round_trip_and_nbytes(fmt, k):
    codes, scale, zero = quantized(fmt, k=k)
    pw = PackedIntWeight.from_codes(codes, scale, None if fmt.symmetric else zero, fmt)
    assert torch.equal(pw.codes(), codes)
    assert torch.equal(pw.zeros(), zero)
    assert torch.equal(pw.scale.float(), scale)
    dense = pw.dequantize(torch.float32)
    assert torch.equal(dense, grid.dequantize(codes, scale, zero, fmt))
    assert pw.nbytes == format_nbytes(fmt, 48, k)
    assert 8 * pw.nbytes == round(fmt.bits_per_weight(48, k) * 48 * k + _zero_pad_bits(fmt, 48, k))
    again = PackedIntWeight.from_tensors(pw.tensors(), fmt, (48, k))
    assert torch.equal(again.dequantize(), dense)


def _zero_pad_bits(fmt, out, k):
    """Padding bits per row that bits_per_weight (a pure formula) does not count."""
    n_groups = fmt.groups(k)[1]
    pad = (-k * fmt.bits) % 8
    if not fmt.symmetric and fmt.zero_point == "int":
        pad += (-n_groups * fmt.bits) % 8
    return out * pad


def test_nbytes_formula_numbers():
    # 1536 x 576, 4-bit, group 64: codes 442368 B, fp16 scales 1536*9*2, 4-bit zeros 1536*5 B
    assert format_nbytes(IntFormat(bits=4, group_size=64), 1536, 576) == 442368 + 27648 + 7680
    # 3-bit, in=576 group 128 (ragged: 4 full groups + one of 64): 216 B codes/row, 5 groups
    assert format_nbytes(IntFormat(bits=3, group_size=128), 10, 576) == 10 * (216 + 10 + 2)
    assert format_nbytes(IntFormat(bits=8, group_size=None, symmetric=True), 4, 8) == 4 * (8 + 2)


def test_constructor_rejects_inconsistent_tensors():
    fmt = IntFormat(bits=4, group_size=64)
    codes, scale, zero = quantized(fmt)
    pw = PackedIntWeight.from_codes(codes, scale, zero, fmt)
    with pytest.raises(UserError, match="qdata has shape"):
        PackedIntWeight(pw.qdata[:, :-1], pw.scale, pw.zero, (48, 576), fmt)
    with pytest.raises(UserError, match="scale has shape .* dtype torch.float32"):
        PackedIntWeight(pw.qdata, pw.scale.float(), pw.zero, (48, 576), fmt)
    with pytest.raises(UserError, match="zero is missing"):
        PackedIntWeight(pw.qdata, pw.scale, None, (48, 576), fmt)
    sym = IntFormat(bits=4, group_size=64, symmetric=True)
    with pytest.raises(UserError, match="stores no zero"):
        PackedIntWeight(pw.qdata, pw.scale, pw.zero, (48, 576), sym)
    with pytest.raises(UserError, match="unexpected tensors"):
        PackedIntWeight.from_tensors({**pw.tensors(), "bias": scale}, fmt, (48, 576))


def test_from_codes_refuses_values_storage_would_change():
    fmt = IntFormat(bits=4, group_size=64)
    codes, scale, zero = quantized(fmt)
    with pytest.raises(UserError, match="round_params"):
        PackedIntWeight.from_codes(codes, scale * (1 + 1e-6), zero, fmt)
    with pytest.raises(UserError, match="whole numbers"):
        PackedIntWeight.from_codes(codes, scale, zero + 0.5, fmt)
    with pytest.raises(UserError, match="whole numbers"):
        PackedIntWeight.from_codes(codes, scale, zero + 16, fmt)
    with pytest.raises(UserError, match="does not fit in 4 bits"):
        PackedIntWeight.from_codes(codes | 16, scale, zero, fmt)
    sym = IntFormat(bits=4, group_size=64, symmetric=True)
    with pytest.raises(UserError, match="zero = 8 everywhere"):
        PackedIntWeight.from_codes(codes, scale, zero, sym)
    with pytest.raises(UserError, match="larger than the input width"):
        PackedIntWeight.from_codes(codes[:, :32], scale[:, :1], zero[:, :1], fmt)
