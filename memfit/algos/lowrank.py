"""Low-rank factorisation of a linear weight: W (out, in) ≈ A (out, r) · B (r, in).

Three ways to get the factors, all pure functions:

- `svd_factors`: truncated SVD, optimal for ‖W − AB‖_F, blind to the inputs.
- `whitened_svd_factors` (SVD-LLM style): what matters is the layer *output* error
  ‖X Wᵀ − X (AB)ᵀ‖_F = ‖(W − AB) S‖_F where S Sᵀ = XᵀX. So take the Cholesky factor S of the
  (damped) Gram matrix, truncate the SVD of W·S — optimal in that norm — and fold S⁻¹ back into
  B. Directions the inputs use much (outlier channels) are kept first.
- `randomized_svd_factors`: Halko-Martinsson-Tropp range finder (Gaussian sketch, power
  iterations with QR re-orthonormalisation), much cheaper than a full SVD when r ≪ min(out, in)
  and close to it when the spectrum decays.

Factor convention: the singular values are split evenly, A = U_r·√Σ_r and B = √Σ_r·V_rᵀ (times S⁻¹
when whitened), so both factors have similar ranges (friendlier to fp16 and to later quantizing
the factors). Factors come back as float32. The exact SVDs run in float64 (the whitened one
multiplies by S and S⁻¹, whose conditioning follows the outlier channels); the randomized one
runs in float32 because speed is its point.

Rank selection: `rank_for_energy` (smallest r keeping a share of Σσ²) and `rank_for_params`
(largest r with r·(out+in) ≤ keep_fraction·out·in).
"""

from __future__ import annotations

import torch

from memfit.algos.hessian import damped_cholesky
from memfit.errors import UserError


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-SVD factors (A (out, r), B (r, in)) minimising ‖W − AB‖_F."""
    check_rank(w, rank)
    U, S, Vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return _split(U[:, :rank], S[:rank], Vh[:rank])


def whitened_svd_factors(w: torch.Tensor, H: torch.Tensor, rank: int,
                         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors minimising the output error ‖X Wᵀ − X (AB)ᵀ‖_F, given H ∝ XᵀX (in, in).

    Any positive multiple of XᵀX gives the same factors (e.g. H = 2/n XᵀX). The damping
    λ = damp·mean(diag H) is raised ×10 and retried when the Cholesky factorisation fails.
    """
    check_rank(w, rank)
    k = w.shape[1]
    if tuple(H.shape) != (k, k):
        raise UserError(f"the Gram matrix has shape {tuple(H.shape)} but the weight has {k} "
                        f"input columns; pass H = 2/n XᵀX of shape ({k}, {k})")
    S, _ = damped_cholesky(H.detach().to(w.device), damp)  # (in, in) lower, S Sᵀ = H + λI
    U, sig, Vh = torch.linalg.svd(w.detach().double() @ S, full_matrices=False)
    A, C = _split(U[:, :rank], sig[:rank], Vh[:rank], dtype=torch.float64)
    B = torch.linalg.solve_triangular(S, C, upper=False, left=False)  # B·S = C
    return A.float(), B.float()


def randomized_svd_factors(w: torch.Tensor, rank: int, oversample: int = 10,
                           power_iters: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate truncated-SVD factors from a randomized range finder (fixed seed)."""
    check_rank(w, rank)
    if oversample < 0 or power_iters < 0:
        raise UserError(f"oversample={oversample} and power_iters={power_iters} must be >= 0")
    W = w.detach().float()
    out, k = W.shape
    sketch = min(rank + oversample, min(out, k))
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(k, sketch, generator=gen).to(W.device)  # (in, r+p)
    Q = torch.linalg.qr(W @ omega).Q  # (out, r+p): orthonormal basis of the sampled range
    for _ in range(power_iters):
        Z = torch.linalg.qr(W.T @ Q).Q  # (in, r+p)
        Q = torch.linalg.qr(W @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # small (r+p, in) problem
    return _split((Q @ Ub)[:, :rank], S[:rank], Vh[:rank])


def spectrum(w: torch.Tensor, H: torch.Tensor | None = None, damp: float = 0.01) -> torch.Tensor:
    """Singular values (descending, float64) of W, or of the whitened W·S when H is given: the
    spectrum that `svd_factors` / `whitened_svd_factors` truncate."""
    W = w.detach().double()
    if H is not None:
        S, _ = damped_cholesky(H.detach().to(w.device), damp)
        W = W @ S
    return torch.linalg.svdvals(W)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold at least `energy` of Σσ² (energy in (0, 1])."""
    if not 0 < energy <= 1:
        raise UserError(f"energy={energy} is invalid; use a fraction in (0, 1], e.g. 0.9")
    s2 = singular_values.detach().double().flatten() ** 2
    if s2.numel() == 0 or s2.sum() == 0:
        raise UserError("the singular values are empty or all zero; nothing to keep")
    s2 = torch.sort(s2, descending=True).values
    cum = torch.cumsum(s2, 0) / s2.sum()
    r = int(torch.searchsorted(cum, torch.tensor([energy], dtype=cum.dtype) - 1e-12)[0]) + 1
    return min(r, s2.numel())


def rank_for_params(out_features: int, in_features: int, keep_fraction: float) -> int:
    """Largest r with r·(out+in) ≤ keep_fraction·out·in (never above min(out, in))."""
    if not 0 < keep_fraction <= 1:
        raise UserError(f"keep_fraction={keep_fraction} is invalid; use a fraction in (0, 1] "
                        "of the dense parameter count")
    budget = keep_fraction * out_features * in_features
    per_rank = out_features + in_features
    r = int(budget // per_rank)
    while (r + 1) * per_rank <= budget:  # guard the float division both ways
        r += 1
    while r > 0 and r * per_rank > budget:
        r -= 1
    if r < 1:
        need = per_rank / (out_features * in_features)
        raise UserError(f"keep_fraction={keep_fraction} leaves no rank for a {out_features}x"
                        f"{in_features} weight; rank 1 needs keep_fraction >= {need:.4g}")
    return min(r, min(out_features, in_features))


def check_rank(w: torch.Tensor, rank: int) -> None:
    if w.dim() != 2:
        raise UserError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    limit = min(w.shape)
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise UserError(f"rank={rank!r} is invalid for a {w.shape[0]}x{w.shape[1]} weight; "
                        f"use an integer in [1, {limit}]")


def _split(U, S, Vh, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), Vh (r, in) -> A = U√S, B = √S Vh."""
    root = S.clamp(min=0).sqrt()
    return (U * root.unsqueeze(0)).to(dtype), (root.unsqueeze(1) * Vh).to(dtype)
