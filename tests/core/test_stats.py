"""Calibration statistics equal their closed forms, whatever the batch split."""

import pytest
import torch

from memfit.calib.stats import HessianStat, InputNormStat
from memfit.errors import UserError


def _batches(k=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 17, k, generator=g) * 3, torch.randn(50, k, generator=g),
            torch.randn(1, 5, k, generator=g) + 2, torch.randn(0, k)]


def test_hessian_equals_direct_formula():
    xs = _batches()
    stat = HessianStat(64)
    for x in xs:
        stat.update(x)
    X = torch.cat([x.reshape(-1, 64) for x in xs])
    n = X.shape[0]
    assert stat.nsamples == n == 51 + 50 + 5
    direct = 2.0 / n * X.double().T @ X.double()
    err = (stat.hessian.double() - direct).abs().max().item()
    print(f"max |H_running - 2/n XᵀX| = {err:.2e} (max entry {direct.abs().max().item():.1f})")
    assert stat.hessian.dtype == torch.float32
    torch.testing.assert_close(stat.hessian.double(), direct, rtol=1e-5, atol=1e-4)


def test_hessian_low_precision_input_and_device():
    x = torch.randn(40, 16).bfloat16()
    stat = HessianStat(16, device="cpu")
    stat.update(x)
    direct = 2.0 / 40 * x.float().T @ x.float()
    torch.testing.assert_close(stat.hessian, direct)
    assert stat.hessian.device.type == "cpu"


def test_input_norms_are_rms_per_column():
    xs = _batches()
    stat = InputNormStat(64)
    for x in xs:
        stat.update(x)
    X = torch.cat([x.reshape(-1, 64) for x in xs])
    torch.testing.assert_close(stat.norms, X.pow(2).mean(0).sqrt(), rtol=1e-5, atol=1e-6)
    # Wanda's raw column norm is norms * sqrt(n)
    torch.testing.assert_close(stat.norms * stat.nsamples**0.5, X.norm(dim=0), rtol=1e-5,
                               atol=1e-5)
    assert stat.nsamples == X.shape[0]


def test_empty_and_wrong_width():
    with pytest.raises(UserError, match="no calibration samples"):
        HessianStat(8).hessian
    with pytest.raises(UserError, match="no calibration samples"):
        InputNormStat(8).norms
    with pytest.raises(ValueError, match="features"):
        HessianStat(8).update(torch.randn(4, 9))
