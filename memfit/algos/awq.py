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

Two families of scales are tried at each α (`duo`): activation-only, s = mean|x|^α, and
activation over weight, s = mean|x|^α / mean|ŵ|^(1-α), where mean|ŵ| is each input channel's mean
of |W| relative to its (row, group)'s max|W|: a channel whose weights are already large in their
group gains less from stretching. The output error picks among all of them.

When several input channels must share one scale (`tie`: o_proj after a grouped-query v_proj,
where each value head feeds several query heads' slots of o_proj's input), the statistics are
averaged over the tied channels, the search runs on the producer's channels and each scale is
copied to the channels that read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.algos.rtn import rtn
from memfit.errors import UserError
from memfit.formats.grid import IntFormat, dequantize, fake_quantize

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


def channel_scales(mean_abs: torch.Tensor, alpha: float,
                   w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = mean|x|^α (/ w_mean^(1-α) when given) / sqrt(max · min): (in,) float32, geometric
    middle at 1."""
    s = mean_abs.float().clamp(min=_MIN_ACT).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=_MIN_ACT).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def weight_magnitude(weights: list[tuple[torch.Tensor, IntFormat]]) -> torch.Tensor:
    """(in,) mean over every output row of the linears of |W| / max|W| of its (row, group)."""
    rel = []
    for w, fmt in weights:
        out, k = w.shape
        g, ng = fmt.groups(k)
        a = w.float().abs()
        if k % g:  # ragged last group: per-row max instead
            rel.append(a / a.amax(1, keepdim=True).clamp(min=1e-12))
            continue
        a = a.view(out, ng, g)  # (out, groups, g)
        rel.append((a / a.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(out, k))
    return torch.cat(rel).mean(0)


def _tied_mean(v: torch.Tensor, tie: torch.Tensor, width: int) -> torch.Tensor:
    """(width,) mean of `v` (in,) over the channels that `tie` (in,) maps to each index."""
    total = torch.zeros(width, dtype=torch.float32, device=v.device).index_add_(0, tie, v.float())
    count = torch.zeros(width, dtype=torch.float32, device=v.device).index_add_(
        0, tie, torch.ones_like(v, dtype=torch.float32))
    return total / count.clamp(min=1)


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
    duo: bool = False              # the scale divides by the weights' magnitude too
    source_scale: torch.Tensor | None = None  # (width,) per producer channel when tied


def search_scale(weights: list[tuple[torch.Tensor, IntFormat]], mean_abs: torch.Tensor,
                 hessian: torch.Tensor, grid: list[float], *, duo: bool = False,
                 tie: torch.Tensor | None = None, width: int | None = None,
                 quantize=None, patience: int | None = None, loss=None) -> AWQResult:
    """The scale minimising the summed output error of linears `weights` [(W (out, in), its
    format)] that read one input with per-channel mean |x| `mean_abs` and Hessian `hessian`:
    over the α of `grid`, activation-only and (`duo`) activation-over-weight scales.

    `quantize(W s, format, H / (s sᵀ)) -> dequantized W s`: the quantizer the error is measured
    with (default min-max RTN; pass the recipe's own, e.g. GPTQ, which sees the scaled
    Hessian; a list gives one per linear). `loss([Ŵ per linear]) -> float`: the error to minimise instead of the linears'
    summed output error (e.g. the output of the module they feed). `patience`: walk each family's α upwards and stop once the error has not improved
    for that many steps (for costly quantizers); None tries every α.
    `tie` (in,) int64 with `width`: input channel j takes the scale of producer channel tie[j]."""
    if not grid or grid[0] != 0.0:
        raise ValueError("the α grid must start at 0 (plain RTN)")
    plain = lambda w, fmt, h: scaled_rtn(w, torch.ones(()), fmt)
    quantize = quantize or plain
    quants = list(quantize) if isinstance(quantize, (list, tuple)) else [quantize] * len(weights)
    w_mean = weight_magnitude(weights) if duo else None
    if tie is not None:
        tie = tie.to(mean_abs.device)
        mean_abs = _tied_mean(mean_abs, tie, width)
        w_mean = None if w_mean is None else _tied_mean(w_mean.to(mean_abs.device), tie, width)
    best = None
    for use_w in ([False, True] if duo else [False]):
        since = 0
        for a in (grid if not use_w else [a for a in grid if a < 1]):
            src = channel_scales(mean_abs, a, w_mean if use_w else None).to(hessian.device)
            s = src if tie is None else src[tie.to(hessian.device)]
            h = hessian / (s[:, None] * s[None, :])
            w_hat = [q(w * s, fmt, h) / s for (w, fmt), q in zip(weights, quants)]
            err = loss(w_hat) if loss is not None else \
                sum(output_error(w, q, hessian) for (w, _), q in zip(weights, w_hat))
            if best is None:
                best = AWQResult(s, a, err, err, use_w, src)
            elif err < best.error:
                best.scale, best.alpha, best.error, best.duo, best.source_scale = \
                    s, a, err, use_w, src
                since = 0
                continue
            since += 1
            if patience is not None and since > patience:
                break
    return best


def search_clip(w: torch.Tensor, fmt: IntFormat, hessian: torch.Tensor, grid: int = 20,
                max_shrink: float = 0.5, two_sided: bool = False
                ) -> tuple[torch.Tensor, float, float]:
    """AWQ's clip search: per (row, group), clamp W to ±(1 - i/grid)·max|W_group| for i below
    max_shrink·grid, keep the bound whose RTN output error on that group's inputs is smallest
    (H's diagonal block of the group: d H_gg dᵀ / 2). i = 0 (no clipping) wins ties.
    `two_sided` (asymmetric formats, whose grid spans the group's min..max): the lower and upper
    ends shrink separately, [(1 - i/grid)·min, (1 - j/grid)·max] for every pair (i, j).
    -> (the clamped weight, output error after, output error before). Whole groups only."""
    out, k = w.shape
    g, ng = fmt.groups(k)
    if k % g:
        raise ValueError("clip search needs whole groups")
    w = w.float()
    wg = w.view(out, ng, g)
    hb = torch.stack([hessian[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(ng)])
    steps = range(max(1, int(max_shrink * grid)))
    if two_sided and not fmt.symmetric:
        lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
        bounds = ((lo * (1 - i / grid), hi * (1 - j / grid)) for i in steps for j in steps)
    else:
        amax = wg.abs().amax(-1, keepdim=True)
        bounds = ((-amax * (1 - i / grid), amax * (1 - i / grid)) for i in steps)
    best_w = best_err = None
    for lo_c, hi_c in bounds:
        cw = torch.maximum(torch.minimum(wg, hi_c), lo_c).reshape(out, k)
        d = (w - fake_quantize(cw, fmt)).view(out, ng, g).transpose(0, 1)  # (ng, out, g)
        err = (torch.bmm(d, hb) * d).sum(-1).T / 2  # (out, ng): d_g H_gg d_gᵀ / 2 per group
        if best_err is None:
            best_w, best_err, first = cw.view(out, ng, g), err, err.sum().item()
            continue
        better = err < best_err
        best_w = torch.where(better[..., None], cw.view(out, ng, g), best_w)
        best_err = torch.where(better, err, best_err)
    return best_w.reshape(out, k), best_err.sum().item(), first


def clipped_rtn(two_sided: bool = False):
    """A `quantize` for search_scale: AWQ's clip search on W s (output error under the scaled
    Hessian), then min-max RTN of the clamped weight."""
    def quantize(ws: torch.Tensor, fmt: IntFormat, h: torch.Tensor) -> torch.Tensor:
        if ws.shape[1] % fmt.groups(ws.shape[1])[0]:  # ragged groups: not clipped
            return scaled_rtn(ws, torch.ones(()), fmt)
        cw = search_clip(ws, fmt, h, two_sided=two_sided)[0]
        return scaled_rtn(cw, torch.ones(()), fmt)
    return quantize
