"""SparseGPT: one-shot pruning with optimal-brain-surgeon error compensation, optionally joint
with integer quantization.

Given a layer weight W (out, in) and the input Hessian H = 2/n XᵀX (in, in), we want a pruned
W' minimising ‖X Wᵀ − X W'ᵀ‖². Removing weight (r, j) costs w_rj² / [H⁻¹]_jj and is best repaired
by moving the error onto the not-yet-processed columns along row j of H⁻¹. Sweeping the columns
left to right and using the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) gives every step the
right inverse Hessian of the remaining columns for free: column j uses row j of U, pivot U_jj.

- Mask selection is lazy, per block of `block_size` columns, on the score w² / U_jj², using the
  weights *after* the error from earlier columns has been folded in (SparseGPT's adaptive mask).
  Unstructured: the lowest scores of the whole block (all rows together) are pruned; the count
  per block is cumulative-rounded so the layer prunes exactly round(sparsity·out·in) weights
  (rows may differ — that adaptivity is part of the method). N:M: chosen when the sweep reaches
  each group of m columns, keeping the n best in every row.
- Joint quantization (`fmt` given): when the sweep enters a quantization group, its scale and
  zero are taken by min-max (memfit.formats.grid) over the group's *current* values (errors of
  this block folded in exactly; weights already pruned set to 0, which min-max always covers),
  and every kept weight is rounded onto that grid before its error is propagated.
- Dead inputs (H_jj = 0) never fire: their weights are set to 0 and H_jj to 1.
- The damping λ = damp·mean(diag H) is multiplied by 10 and the factorisation retried when
  Cholesky fails (rank-deficient H from few samples).

The damped factorisations are shared with GPTQ and whitened SVD (memfit/algos/hessian.py).
GPTQ's block sweep is this one with sparsity 0; they stay two functions because GPTQ's has
act-order and searched clipping and this one the adaptive mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from memfit.algos.hessian import inverse_hessian_factor
from memfit.algos.prune import prune_count, resolve_pattern
from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.grid import IntFormat


@dataclass(frozen=True)
class SparseQuantResult:
    """SparseGPT with joint quantization: pruned weights are exact zeros, kept ones on the grid.

    weight (out, in): dequantized values with zeros where mask is False (dtype of the input).
    mask (out, in) bool keep-mask. codes (out, in) uint8; scale, zero (out, n_groups) float32,
    already rounded to `fmt`'s stored dtypes, so dequantize(codes, scale, zero) * mask == weight.
    """
    weight: torch.Tensor
    mask: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fmt: IntFormat


def sparsegpt(w: torch.Tensor, H: torch.Tensor, *, sparsity: float | None = None,
              nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
              fmt: IntFormat | None = None):
    """Prune `w` (out, in) with SparseGPT given H = 2/n XᵀX (in, in).

    Exactly one of `sparsity` (unstructured fraction in [0, 1)) or `nm=(n, m)`.
    Returns (w_new, keep_mask) — or a SparseQuantResult when `fmt` is given.
    """
    out, k = _check_inputs(w, H, block_size)
    pattern = resolve_pattern(sparsity, nm, k)
    if pattern is not None and block_size % pattern[1]:
        raise UserError(f"block_size={block_size} must be a multiple of M={pattern[1]} "
                        f"for {pattern[0]}:{pattern[1]} sparsity")
    W = w.detach().float().clone()
    H = H.detach().to(W.device).float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, damp)

    quant = _QuantState(fmt, out, k, W.device) if fmt is not None else None
    prune = torch.zeros(out, k, dtype=torch.bool, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        prune1 = prune[:, i1:i2]  # a view: filled in place
        if pattern is None:
            n_prune = prune_count(sparsity, out * i2) - prune_count(sparsity, out * i1)
            prune1[:] = _lowest(W1 ** 2 / torch.diagonal(U1).unsqueeze(0) ** 2, n_prune)
        for j in range(i2 - i1):
            if pattern is not None and j % pattern[1] == 0:
                n, m = pattern
                sc = W1[:, j:j + m] ** 2 / torch.diagonal(U1)[j:j + m].unsqueeze(0) ** 2
                drop = torch.topk(sc, m - n, dim=1, largest=False).indices
                prune1[:, j:j + m].scatter_(1, drop, True)
            col = W1[:, j]
            if quant is not None:
                if (i1 + j) % quant.g == 0:
                    quant.enter_group(i1 + j, _current_group(W, W1, err1, U, prune1, i1, j, quant.g))
                q = quant.round_column(i1 + j, col)
            else:
                q = col.clone()
            q[prune1[:, j]] = 0.0
            err = (col - q) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            err1[:, j] = err
            W1[:, j] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]

    mask = ~prune
    w_new = W.to(w.dtype)
    if quant is None:
        return w_new, mask
    codes = torch.where(mask, quant.codes, quant.zero_codes())
    return SparseQuantResult(weight=w_new, mask=mask, codes=codes, scale=quant.scale,
                             zero=quant.zero, fmt=fmt)


class _QuantState:
    """Per-group grid parameters chosen during the sweep, and the codes of every column."""

    def __init__(self, fmt: IntFormat, out: int, k: int, device):
        self.fmt = fmt
        self.g, n_groups = fmt.groups(k)
        self.k = k
        # a one-group-per-row view of the same format, used on a group's own columns
        self.col_fmt = dataclasses.replace(fmt, group_size=None)
        self.scale = torch.ones(out, n_groups, device=device)
        self.zero = torch.zeros(out, n_groups, device=device)
        self.codes = torch.zeros(out, k, dtype=torch.uint8, device=device)

    def enter_group(self, c: int, values: torch.Tensor) -> None:
        s, z = grid.round_params(*grid.minmax_params(values, self.col_fmt), self.col_fmt)
        self.scale[:, c // self.g] = s[:, 0]
        self.zero[:, c // self.g] = z[:, 0]

    def round_column(self, c: int, col: torch.Tensor) -> torch.Tensor:
        s = self.scale[:, c // self.g:c // self.g + 1]
        z = self.zero[:, c // self.g:c // self.g + 1]
        q = grid.quantize(col.unsqueeze(1), s, z, self.col_fmt)
        self.codes[:, c] = q[:, 0]
        return grid.dequantize(q, s, z, self.col_fmt)[:, 0]

    def zero_codes(self) -> torch.Tensor:
        """(out, in) codes of the value 0 in each group (what a pruned weight stores)."""
        code0 = self.zero.round().clamp(0, self.fmt.qmax).to(torch.uint8)  # (out, n_groups)
        return grid.expand_groups(code0, self.k, self.g)


def _current_group(W, W1, err1, U, prune1, i1: int, j: int, g: int) -> torch.Tensor:
    """Values of the quantization group starting at column i1+j as they stand right now:
    in-block columns from W1, later columns from W with this block's pending error folded in,
    weights already chosen for pruning set to 0."""
    cnt = W1.shape[1]
    inside = W1[:, j:min(j + g, cnt)].clone()
    inside[prune1[:, j:j + inside.shape[1]]] = 0.0
    end = i1 + j + g
    if end <= i1 + cnt:
        return inside
    i2 = i1 + cnt
    end = min(end, W.shape[1])
    outside = W[:, i2:end] - err1[:, :j] @ U[i1:i1 + j, i2:end]
    return torch.cat([inside, outside], dim=1)


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the `n` lowest entries of a 2-D tensor (over all entries)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n > 0:
        flat[torch.topk(scores.flatten(), n, largest=False).indices] = True
    return flat.view_as(scores)


def _check_inputs(w: torch.Tensor, H: torch.Tensor, block_size: int) -> tuple[int, int]:
    if w.dim() != 2:
        raise UserError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out, k = w.shape
    if tuple(H.shape) != (k, k):
        raise UserError(f"the Hessian has shape {tuple(H.shape)} but the weight has {k} input "
                        f"columns; pass H = 2/n XᵀX of shape ({k}, {k})")
    if block_size < 1:
        raise UserError(f"block_size={block_size} must be a positive number of columns (e.g. 128)")
    return out, k
