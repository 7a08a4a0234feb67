"""SmoothQuant's migration scales (Xiao et al. 2023), a pure function.

Activations of LLMs have a few input channels with outliers 10-100x the rest, which per-token
int8 rounding cannot serve; weights are flat. For a group of linears sharing an input X, a
per-input-channel s_j = max|X_j|^α / max|W_j|^(1-α) divides the activations and multiplies the
weight columns (X diag(1/s)) (diag(s) W^T) = X W^T, so the float function is unchanged and the
difficulty moves from activations to weights in the proportion α (0.5 balances them; larger
helps models with stronger outliers).
"""

from __future__ import annotations

import torch

from memfit.errors import UserError


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                  floor: float = 1e-5) -> torch.Tensor:
    """(in,) max|x| per input channel and (in,) max|W| per input column over the group's
    weights -> (in,) float32 scales s = act^α / w^(1-α), both maxima floored at `floor`, and s
    clamped to [floor, 1/floor] so a dead channel neither vanishes nor explodes."""
    if not 0 < alpha <= 1:
        raise UserError(f"smoothquant α={alpha!r} is outside (0, 1]")
    a = act_absmax.float().clamp(min=floor)
    w = weight_absmax.float().clamp(min=floor)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(floor, 1 / floor)
