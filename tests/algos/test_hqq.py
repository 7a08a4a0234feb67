"""HQQ zero refinement: never worse than RTN min-max, clearly better on float zeros."""

import pytest
import torch

from memfit.algos.hqq import hqq
from memfit.algos.rtn import rtn
from memfit.errors import UserError
from memfit.formats.grid import IntFormat


def _weights(k=256):
    torch.manual_seed(4)
    return {"normal": torch.randn(96, k) * 0.02,
            "student_t": torch.distributions.StudentT(2.5).sample((96, k)),
            "outlier_rows": torch.randn(96, k) * torch.logspace(-2, 1, 96).unsqueeze(1)}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("zero_point", ["float", "int"])
def test_hqq_not_worse_than_rtn(bits, zero_point):
    fmt = IntFormat(bits=bits, group_size=64, zero_point=zero_point)
    for name, w in _weights().items():
        base, res = rtn(w, fmt), hqq(w, fmt)
        err = (w - res.dequantize(fmt)).pow(2).sum().item()
        print(f"{bits}-bit {zero_point} zero {name}: rtn {base.error:.4g}  hqq {err:.4g} "
              f"({err / base.error:.3f})")
        assert res.error == pytest.approx(err, rel=1e-5)
        assert err <= base.error
        if zero_point == "float":
            assert err < 0.95 * base.error


def test_stored_zero_and_codes_valid_ragged():
    torch.manual_seed(5)
    w = torch.distributions.StudentT(3.0).sample((24, 576))
    for zp in ("float", "int"):
        fmt = IntFormat(bits=3, group_size=128, zero_point=zp)
        res = hqq(w, fmt)
        assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= fmt.qmax
        assert res.scale.shape == res.zero.shape == (24, 5)
        assert torch.isfinite(res.zero).all() and torch.isfinite(res.scale).all()
        if zp == "int":
            assert torch.equal(res.zero, res.zero.round())
            assert res.zero.min() >= 0 and res.zero.max() <= fmt.qmax
        else:
            assert torch.equal(res.zero.half().float(), res.zero)
        assert res.error <= rtn(w, fmt).error


def test_hqq_rejects_symmetric_and_bad_settings():
    w = torch.randn(8, 64)
    with pytest.raises(UserError, match="symmetric"):
        hqq(w, IntFormat(bits=4, group_size=32, symmetric=True))
    with pytest.raises(UserError, match="invalid"):
        hqq(w, IntFormat(bits=4, group_size=32), p=1.5)
