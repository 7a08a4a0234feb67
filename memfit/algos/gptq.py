"""GPTQ: quantize a weight column by column, pushing each rounding error onto the columns not yet
quantized so that the layer's *output* error ‖(W − Ŵ) X‖² stays small.

Math (per row w, all rows at once). With H = 2/n XᵀX (see `stats.HessianStat`), the output error
of a weight change Δ is ½ Δ H Δᵀ. Quantizing column i to q_i and optimally re-fitting the
not-yet-quantized columns F gives the update

    δ_F = −(w_i − q_i) / [H⁻¹_F]_ii · [H⁻¹_F]_{i,F}

and, processing columns in a fixed order, the rows of the *upper Cholesky factor* U of H⁻¹
(H⁻¹ = UᵀU) are exactly the [H⁻¹_F]_{i,·} / sqrt([H⁻¹_F]_ii) needed at each step. So with
err_i = (w_i − q_i) / U_ii:   w_F ← w_F − err_i · U_{i,F}.   Then W − Ŵ = E U and
½ tr((W − Ŵ) H (W − Ŵ)ᵀ) = ½ Σ err², which is the `error` reported (with the damped H).

Engineering (the paper's, re-derived):
- dead inputs (H_ii = 0, never active in calibration): weight set to 0, H_ii set to the mean
  live diagonal so H stays invertible without changing the damping scale;
- damping λ = damp · mean(diag H) on the diagonal; if a Cholesky fails, λ ×10 and retry up to
  `max_damp_tries` times, logging a warning, then a UserError;
- blocks of `block_size` columns: updates inside the block are rank-1, the rest of the matrix
  gets one matrix product per block (lazy batch update);
- groups: without act-order a group's scale/zero are chosen when the sweep enters it, from the
  already error-updated weights (pending block updates included, so they are exact). With
  act_order (columns in decreasing H_ii) and static_groups, all scale/zero are chosen upfront
  from the original weights per contiguous group, so storage stays contiguous. Codes are
  returned in the original column order.
- float32 math on the weight's device (CPU or CUDA); inputs are not modified.
"""

from __future__ import annotations

import dataclasses

import torch

from memfit.algos.base import QuantResult, check_weight
from memfit.algos.hessian import inverse_hessian_factor
from memfit.algos.rtn import CLIP_MODES, choose_params
from memfit.errors import UserError
from memfit.formats.grid import IntFormat


def _check_hessian(H: torch.Tensor, in_features: int) -> None:
    if H.shape != (in_features, in_features):
        raise UserError(f"Hessian has shape {tuple(H.shape)} but the weight has {in_features} "
                        "input columns; collect the statistic on this layer's inputs")
    if not torch.isfinite(H).all():
        raise UserError("the GPTQ Hessian contains NaN or inf: calibration activations "
                        "overflowed. Run calibration in float32/bfloat16, not float16, or use "
                        "shorter/cleaner calibration text")


def _current_group(W, W1, E1, U, i1, i2, i, end) -> torch.Tensor:
    """Columns i1+i .. end of the weight as the sweep sees them now: block columns from W1,
    later columns from W minus the block's not-yet-applied (lazy) update."""
    inside = W1[:, i:min(end, i2) - i1]
    if end <= i2:
        return inside
    pending = W[:, i2:end] - E1[:, :i] @ U[i1:i1 + i, i2:end]
    return torch.cat([inside, pending], dim=1)


def _sweep(W, U, fmt, scale, zero, col_group, dynamic, block_size, choose, keep=None):
    """Quantize W's columns in order, in place on W; fill scale/zero when `dynamic`. Where
    `keep` (out, in) is False the code is the zero point (weight exactly 0) and the whole value
    becomes error to compensate. Returns (uint8 codes (out, in) in sweep order, Σ err²)."""
    out, k = W.shape
    g, _ = fmt.groups(k)
    codes = torch.empty(out, k, dtype=torch.uint8, device=W.device)
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1, E1 = torch.empty_like(W1), torch.zeros_like(W1)  # codes (as floats), scaled errors
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % g == 0:
                cols = _current_group(W, W1, E1, U, i1, i2, i, min(col + g, k))
                if keep is not None:
                    cols = cols * keep[:, col:col + cols.shape[1]]
                scale[:, col // g : col // g + 1], zero[:, col // g : col // g + 1] = choose(
                    cols, col, col + cols.shape[1])
            s, z = scale[:, col_group[col]], zero[:, col_group[col]]
            w = W1[:, i]
            q = torch.round(w / s + z).clamp_(0, fmt.qmax)  # same rule as grid.quantize
            if keep is not None:
                q = torch.where(keep[:, col], q, z)
            Q1[:, i] = q
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        codes[:, i1:i2] = Q1.to(torch.uint8)
        loss += E1.pow(2).sum()
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return codes, loss.item()


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: IntFormat, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
         clip: str = "minmax", max_damp_tries: int = 6,
         mask: torch.Tensor | None = None) -> QuantResult:
    """GPTQ-quantize `w` (out, in) given the input Hessian `H` (in, in) = 2/n XᵀX.

    `clip` ("minmax" | "mse") picks each group's scale/zero; "mse" weighs columns by diag(H).
    `static_groups` matters only with act_order (it is required then: the format stores no
    per-column group index). `error` = ½ Σ err² = ½ tr(ΔHΔᵀ) with the damped H, i.e. the mean
    squared output error per calibration token (summed over outputs).

    `mask` (out, in) bool, optional: a fixed sparsity pattern (e.g. Wanda's); pass the unpruned
    `w`. Weights where it is False get the zero point's code, so they dequantize to exactly 0,
    and their whole value is compensated on the later columns like any rounding error
    (SparseGPT's update with a given mask). Needs an integer or symmetric zero point.
    """
    check_weight(w)
    out, k = w.shape
    _check_hessian(H, k)
    if block_size < 1 or damp < 0 or max_damp_tries < 0:
        raise UserError(f"gptq needs block_size >= 1, damp >= 0, max_damp_tries >= 0; got "
                        f"{block_size}, {damp}, {max_damp_tries} (defaults 128, 0.01, 6)")
    if clip not in CLIP_MODES:
        raise UserError(f"clip={clip!r} is invalid; use one of {CLIP_MODES}")
    g, n_groups = fmt.groups(k)
    if act_order and not static_groups and n_groups > 1:
        raise UserError("act_order with static_groups=False would need a per-column group index, "
                        "which IntFormat does not store; keep static_groups=True")
    if mask is not None:
        if tuple(mask.shape) != (out, k) or mask.dtype != torch.bool:
            raise UserError(f"mask must be a bool tensor of shape {(out, k)}, got "
                            f"{mask.dtype} {tuple(mask.shape)}")
        if not fmt.symmetric and fmt.zero_point == "float":
            raise UserError("a sparsity mask needs an integer or symmetric zero point (a float "
                            "zero cannot hold an exact 0); use zero_point: int")
    dev = w.device
    W = w.detach().to(torch.float32).clone()
    keep = None if mask is None else mask.to(dev)
    H = H.detach().to(dev, torch.float32).clone()
    dead = H.diagonal() == 0
    live_mean = H.diagonal()[~dead].mean().item() if (~dead).any() else 1.0
    H[dead, dead] = live_mean
    W[:, dead] = 0.0
    hdiag = H.diagonal().clone()

    def choose(cols, c0, c1):  # scale/zero of one group's columns, stored dtype
        fmt_one = dataclasses.replace(fmt, group_size=None)
        return choose_params(cols, fmt_one, clip, col_weight=hdiag[c0:c1])

    if act_order:
        perm = torch.argsort(hdiag, descending=True, stable=True)
        kept = W if keep is None else W * keep
        scale, zero = choose_params(kept, fmt, clip, col_weight=hdiag)  # upfront, contiguous
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
        col_group = (perm // g).tolist()
    else:
        perm = None
        scale = torch.zeros(out, n_groups, device=dev)
        zero = torch.zeros(out, n_groups, device=dev)
        col_group = (torch.arange(k) // g).tolist()
    U = inverse_hessian_factor(H, damp, max_damp_tries, dtype=torch.float32)
    del H
    codes, loss = _sweep(W, U, fmt, scale, zero, col_group, not act_order, block_size, choose,
                         keep)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantResult(codes=codes, scale=scale, zero=zero, error=0.5 * loss)
