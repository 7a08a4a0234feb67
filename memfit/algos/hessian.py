"""Damped factorisations of a layer's input Hessian H = 2/n XᵀX, shared by GPTQ, SparseGPT and
whitened SVD.

H is positive semi-definite; with few samples or dead inputs it is singular, so every algorithm
factorises H + λI with λ = damp·mean(diag H), and multiplies damp by 10 when a factorisation
fails (damp 0 goes to 1e-6). The precision is the caller's: SparseGPT and whitened SVD work in
float64, GPTQ in float32 (its outputs are pinned by tests).
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager

import torch

from memfit.errors import UserError

log = logging.getLogger(__name__)


def _check(H: torch.Tensor) -> float:
    if not torch.isfinite(H).all():
        raise UserError("the Hessian/Gram statistics contain NaN or inf: calibration activations "
                        "overflowed. Calibrate in float32/bfloat16, not float16, or use "
                        "shorter/cleaner calibration text")
    mean_diag = float(H.diagonal().abs().mean())
    return mean_diag if mean_diag > 0 else 1.0


def _next(damp: float) -> float:
    return damp * 10 if damp > 0 else 1e-6


def damped_cholesky(H: torch.Tensor, damp: float, max_tries: int = 8,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of H + λI (in `dtype`) and the damp that worked."""
    H = H.to(dtype)
    mean_diag = _check(H)
    eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
    d = damp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            return L, d
        d = _next(d)
    raise UserError(f"the Hessian is not positive definite even with damp={d / 10:g}; use more "
                    "calibration samples or a larger damp")


_FACTORS: dict | None = None  # see shared_factors


@contextmanager
def shared_factors():
    """Inside the block, `inverse_hessian_factor` computes each factor once per distinct H (by
    content) and hands the same read-only tensor to every later call: for building many
    formats over one Hessian (memfit.plan builds every candidate of a layer)."""
    global _FACTORS
    previous, _FACTORS = _FACTORS, {}
    try:
        yield
    finally:
        _FACTORS = previous


def inverse_hessian_factor(H: torch.Tensor, damp: float, max_tries: int = 8,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), computed in `dtype`,
    returned as float32. Damping is raised when either factorisation fails."""
    if _FACTORS is None:
        return _inverse_factor(H, damp, max_tries, dtype)
    key = (hashlib.sha1(H.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest(),
           damp, max_tries, dtype, str(H.device))
    if key not in _FACTORS:
        _FACTORS[key] = _inverse_factor(H, damp, max_tries, dtype)
    return _FACTORS[key]


def _inverse_factor(H: torch.Tensor, damp: float, max_tries: int,
                    dtype: torch.dtype) -> torch.Tensor:
    H = H.to(dtype)
    mean_diag = _check(H)
    eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
    d = damp
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("the Hessian was not positive definite at damp=%g; succeeded "
                                "with damp=%.3g after %d retries", damp, d, attempt)
                return U.float()
        d = _next(d)
    raise UserError(f"the {H.shape[0]}x{H.shape[0]} Hessian could not be factorised even with "
                    f"damp={d / 10:.3g} after {max_tries} retries; the calibration statistics "
                    "look broken. Use more calibration samples or raise damp")
