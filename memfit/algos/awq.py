"""AWQ (activation-aware weight quantization): the per-input-channel scale search, pure math.

Linears reading one input X (n, in) are multiplied column-wise by s (in,) and their input divided
by s (the caller folds 1/s into the op that produces X), so the float function is unchanged:

    X Wᵀ = (X / s) (W s)ᵀ

but the quantizer now sees W s, whose salient columns (large mean |x|) are stretched and lose
less to rounding. For each α of a grid, s = mean|x|^α normalised by sqrt(max s · min s); W s is
quantized with round-to-nearest on the target format (min-max groups), and the output error on
the calibration inputs

    ‖X Wᵀ − (X / s) Q(W s)ᵀ‖² / n  =  tr(D H Dᵀ) / 2,   D = W − Q(W s) / s,   H = 2/n XᵀX

is computed from the input Hessian H (memfit.calib.stats.HessianStat), so every calibration
token counts and memory stays (in, in). The α with the smallest error wins; α = 0 gives s = 1,
plain RTN, and wins ties, so AWQ's error on the calibration data is never above RTN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.algos.rtn import rtn
from memfit.errors import UserError
from memfit.formats.grid import IntFormat, dequantize

_MIN_ACT = 1e-4  # dead input channels: keep their scale finite


def alphas(grid: int, max_alpha: float = 1.0) -> list[float]:
    """`grid` evenly spaced exponents from 0 to max_alpha (0 = RTN)."""
    if not isinstance(grid, int) or grid < 2:
        raise UserError(f"awq_grid={grid!r} must be an integer >= 2 (e.g. 20): the number of "
                        "exponents tried, 0 included")
    if not 0 < max_alpha <= 1:
        raise UserError(f"awq_max_alpha={max_alpha!r} is outside (0, 1]: the largest exponent "
                        "of mean |x| tried (e.g. 1.0)")
    return torch.linspace(0.0, max_alpha, grid).tolist()


def channel_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α / sqrt(max · min): (in,) float32, geometric middle at 1."""
    s = mean_abs.float().clamp(min=_MIN_ACT).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ‖X(W − Ŵ)ᵀ‖²/n summed over output rows, from H = 2/n XᵀX."""
    d = w.float() - w_hat.float()
    return float(((d @ hessian) * d).sum() / 2)


def scaled_rtn(w: torch.Tensor, s: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Q(W s) / s: the effective weight after scaling, min-max RTN on `fmt`, and unscaling."""
    ws = w.float() * s
    res = rtn(ws, fmt)
    return dequantize(res.codes, res.scale, res.zero, fmt) / s


@dataclass
class AWQResult:
    scale: torch.Tensor            # (in,) the chosen s (all ones when α = 0 wins)
    alpha: float
    error: float                   # output error at the chosen α
    rtn_error: float               # output error at α = 0 (plain RTN)


def search_scale(weights: list[tuple[torch.Tensor, IntFormat]], mean_abs: torch.Tensor,
                 hessian: torch.Tensor, grid: list[float]) -> AWQResult:
    """The α of `grid` minimising the summed output error of linears `weights` [(W (out, in),
    its format)] that read one input with per-channel mean |x| `mean_abs` and Hessian `hessian`."""
    if not grid or grid[0] != 0.0:
        raise ValueError("the α grid must start at 0 (plain RTN)")
    best = None
    for a in grid:
        s = channel_scales(mean_abs, a).to(hessian.device)
        err = sum(output_error(w, scaled_rtn(w, s, fmt), hessian) for w, fmt in weights)
        if best is None:
            best = AWQResult(s, a, err, err)
        elif err < best.error:
            best.scale, best.alpha, best.error = s, a, err
    return best


def search_clip(w: torch.Tensor, fmt: IntFormat, hessian: torch.Tensor, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, float, float]:
    """AWQ's clip search: per (row, group), clamp W to ±(1 - i/grid)·max|W_group| for i below
    max_shrink·grid, keep the bound whose RTN output error on that group's inputs is smallest
    (H's diagonal block of the group: d H_gg dᵀ / 2). i = 0 (no clipping) wins ties.
    -> (the clamped weight, output error after, output error before). Whole groups only."""
    out, k = w.shape
    g, ng = fmt.groups(k)
    if k % g:
        raise ValueError("clip search needs whole groups")
    w = w.float()
    hb = torch.stack([hessian[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(ng)])
    amax = w.view(out, ng, g).abs().amax(-1, keepdim=True)
    best_w = best_err = None
    for i in range(max(1, int(max_shrink * grid))):
        m = amax * (1 - i / grid)
        cw = torch.maximum(torch.minimum(w.view(out, ng, g), m), -m).reshape(out, k)
        res = rtn(cw, fmt)
        d = (w - dequantize(res.codes, res.scale, res.zero, fmt)).view(out, ng, g)
        err = torch.einsum("rjk,jkl,rjl->rj", d, hb, d) / 2  # (out, ng)
        if best_err is None:
            best_w, best_err, first = cw.view(out, ng, g), err, err.sum().item()
            continue
        better = err < best_err
        best_w = torch.where(better[..., None], cw.view(out, ng, g), best_w)
        best_err = torch.where(better, err, best_err)
    return best_w.reshape(out, k), best_err.sum().item(), first
