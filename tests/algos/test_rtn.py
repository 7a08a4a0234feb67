"""RTN: min-max matches the grid contract; MSE clipping never loses to min-max."""

import pytest
import torch

from memfit.algos.rtn import rtn
from memfit.errors import UserError
from memfit.formats.grid import IntFormat, fake_quantize


def _weights():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # torch.distributions draws from the global generator
    heavy = torch.distributions.StudentT(2.5).sample((96, 256))
    return {"normal": torch.randn(96, 256, generator=g), "student_t": heavy}


def _check_valid(res, fmt, shape):
    out, k = shape
    _, n_groups = fmt.groups(k)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == shape
    assert int(res.codes.max()) <= fmt.qmax
    assert res.scale.shape == res.zero.shape == (out, n_groups)
    assert torch.isfinite(res.scale).all() and (res.scale > 0).all()
    assert torch.isfinite(res.zero).all()
    # scales are exactly representable in the stored dtype
    torch.testing.assert_close(res.scale.to(fmt.torch_scale_dtype).float(), res.scale,
                               rtol=0, atol=0)


@pytest.mark.parametrize("sym", [False, True])
def test_minmax_is_the_grid_round_trip(sym):
    w = _weights()["normal"]
    fmt = IntFormat(bits=4, group_size=64, symmetric=sym)
    res = rtn(w, fmt)
    _check_valid(res, fmt, w.shape)
    torch.testing.assert_close(res.dequantize(fmt), fake_quantize(w, fmt), rtol=0, atol=0)
    assert res.error == pytest.approx((w - res.dequantize(fmt)).pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_mse_clip_beats_minmax(bits, sym):
    fmt = IntFormat(bits=bits, group_size=64, symmetric=sym)
    for name, w in _weights().items():
        mm, mse = rtn(w, fmt), rtn(w, fmt, clip="mse")
        _check_valid(mse, fmt, w.shape)
        print(f"{bits}-bit sym={sym} {name}: minmax {mm.error:.2f}  mse {mse.error:.2f}")
        assert mse.error <= mm.error
        if bits <= 3:
            assert mse.error < 0.9 * mm.error


def test_weighted_mse_clip_on_its_metric():
    w = _weights()["student_t"]
    cw = torch.rand(256, generator=torch.Generator().manual_seed(2)) ** 4 * 10
    fmt = IntFormat(bits=3, group_size=64)
    mm = rtn(w, fmt, col_weight=cw)
    mse = rtn(w, fmt, clip="mse", col_weight=cw)
    weighted = ((w - mse.dequantize(fmt)).pow(2) * cw).sum().item()
    assert mse.error == pytest.approx(weighted, rel=1e-4)
    print(f"weighted error: minmax {mm.error:.2f}  mse {mse.error:.2f}")
    assert mse.error < mm.error


def test_ragged_groups_and_float_zero():
    w = torch.randn(32, 576, generator=torch.Generator().manual_seed(3))
    for fmt in (IntFormat(bits=4, group_size=128), IntFormat(bits=3, group_size=128,
                                                             zero_point="float")):
        for clip in ("minmax", "mse"):
            res = rtn(w, fmt, clip=clip)
            _check_valid(res, fmt, w.shape)
            assert res.scale.shape == (32, 5)


def test_input_untouched_and_bf16():
    w = torch.randn(16, 64).bfloat16()
    before = w.clone()
    res = rtn(w, IntFormat(bits=4, group_size=32), clip="mse")
    assert torch.equal(w, before) and res.codes.shape == (16, 64)


def test_user_errors():
    w = torch.randn(8, 64)
    fmt = IntFormat(bits=4, group_size=32)
    with pytest.raises(UserError, match="clip"):
        rtn(w, fmt, clip="percentile")
    with pytest.raises(UserError, match="col_weight"):
        rtn(w, fmt, col_weight=torch.ones(10))
    with pytest.raises(UserError, match="NaN"):
        rtn(torch.full((8, 64), float("nan")), fmt)
    with pytest.raises(UserError, match="max_shrink"):
        rtn(w, fmt, clip="mse", max_shrink=1.0)
