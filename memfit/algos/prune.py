"""Pruning masks: magnitude, Wanda, N:M, and OWL per-layer sparsity.

Every function here is pure: a weight (out, in) and, where needed, its activation statistics go
in, a boolean keep-mask (out, in) or a number comes out. Applying the mask (`w * mask`), choosing
a storage format and walking the model are someone else's job.

Conventions (shared with memfit.algos.sparsegpt):

- A mask is a *keep* mask: True = the weight survives.
- `sparsity` is the pruned fraction in [0, 1). Unstructured masks compare scores within each
  output row and prune exactly `round_half_up(sparsity * in)` weights in every row. Wanda showed
  per-row comparison is what works for LLMs; we use it for magnitude too, so the two differ only
  in the score and the sparsity of every row is exact and equal.
- `nm=(n, m)` keeps `n` of every `m` consecutive input columns in each row ("2:4" = keep 2 of 4),
  the layout sparse tensor cores accelerate. `m` must divide the input width.
- Ties are broken by `torch.topk`, which is deterministic on one device.

OWL (outlier-weighted layer-wise sparsity): layers whose Wanda scores have more outliers are more
important and get a lower sparsity. We map the outlier ratios linearly (centred, then scaled so the
largest deviation is exactly `lam`), which keeps the mean exactly at `target` *and* every layer
inside `target ± lam`; a plain min-max map followed by a mean shift can leave that band.
"""

from __future__ import annotations

import math

import torch

from memfit.errors import UserError


def magnitude_mask(w: torch.Tensor, sparsity: float | None = None,
                   nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep mask (out, in) from the score |W_ij|: per row (unstructured) or per m-group (N:M)."""
    _check_weight(w)
    return _mask_from_scores(w.detach().float().abs(), sparsity, nm)


def wanda_mask(w: torch.Tensor, col_norms: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep mask (out, in) from the Wanda score |W_ij| * ||X_j||.

    `col_norms` (in,) are the L2 norms of each input column of the calibration activations.
    Comparison is per output row (unstructured) or per group of m consecutive inputs (N:M).
    """
    _check_weight(w)
    return _mask_from_scores(wanda_scores(w, col_norms), sparsity, nm)


def wanda_scores(w: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """(out, in) float32 scores |W_ij| * ||X_j||."""
    _check_weight(w)
    if col_norms.dim() != 1 or col_norms.shape[0] != w.shape[1]:
        raise UserError(
            f"col_norms has shape {tuple(col_norms.shape)} but the weight has {w.shape[1]} input "
            "columns; pass the per-input-column activation norms of this layer, shape (in,)")
    return w.detach().float().abs() * col_norms.detach().float().to(w.device).unsqueeze(0)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive columns of each row."""
    check_nm(n, m, scores.shape[1])
    out, k = scores.shape
    groups = scores.reshape(out, k // m, m)  # (out, in/m, m)
    keep_idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep_idx, True)
    return mask.reshape(out, k)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly round_half_up(sparsity * in) lowest scores in every row."""
    check_sparsity(sparsity)
    out, k = scores.shape
    n_keep = k - prune_count(sparsity, k)
    mask = torch.zeros(out, k, dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        mask.scatter_(1, torch.topk(scores, n_keep, dim=1).indices, True)
    return mask


def outlier_ratio(w: torch.Tensor, col_norms: torch.Tensor, m: float = 5.0) -> float:
    """Share of Wanda scores |W_ij|*||X_j|| above `m` times the layer's mean score (OWL's LOD)."""
    if m <= 0:
        raise UserError(f"outlier threshold m={m} must be positive (OWL uses 5 to 10)")
    scores = wanda_scores(w, col_norms)
    return float((scores > m * scores.mean()).float().mean())


def owl_sparsities(outlier_ratios: dict[str, float], target: float,
                   lam: float) -> dict[str, float]:
    """Per-layer sparsities: more outliers -> lower sparsity; mean == target, each in target±lam.

    The ratios are centred and scaled so that the layer furthest from the mean deviates by
    exactly `lam`; equal ratios give every layer `target`.
    """
    if not outlier_ratios:
        raise UserError("owl_sparsities got no layers; pass {layer name: outlier ratio}")
    check_sparsity(target)
    if lam < 0 or target - lam < 0 or target + lam >= 1:
        raise UserError(
            f"OWL band target±lam = {target}±{lam} must stay inside [0, 1); "
            "use a smaller lam (OWL uses 0.02 to 0.1)")
    names = list(outlier_ratios)
    r = torch.tensor([float(outlier_ratios[k]) for k in names], dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise UserError("an outlier ratio is NaN or inf; check the calibration statistics")
    d = r - r.mean()
    spread = d.abs().max()
    if spread == 0:
        return {k: float(target) for k in names}
    s = target - lam * d / spread
    return {k: float(v) for k, v in zip(names, s)}


# ----- validation and shared helpers (also used by sparsegpt) -----

def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise UserError(
            f"sparsity={sparsity!r} is invalid; use a fraction in [0, 1), e.g. 0.5 for 50%")


def check_nm(n: int, m: int, in_features: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or n >= m:
        raise UserError(
            f"N:M sparsity {n}:{m} is invalid; keep N of every M with 1 <= N < M, e.g. 2:4")
    if in_features % m:
        raise UserError(
            f"N:M sparsity {n}:{m} needs M={m} to divide the input width {in_features}; "
            "use unstructured sparsity for this layer or another M")


def prune_count(sparsity: float, k: int) -> int:
    """How many of `k` weights a sparsity prunes (round half up)."""
    return int(math.floor(sparsity * k + 0.5))


def resolve_pattern(sparsity: float | None, nm, in_features: int) -> tuple[int, int] | None:
    """Validate exactly one of sparsity / nm; return nm as (n, m) or None for unstructured."""
    if (sparsity is None) == (nm is None):
        raise UserError("give exactly one of sparsity (e.g. 0.5) or nm (e.g. (2, 4))")
    if nm is None:
        check_sparsity(sparsity)
        return None
    if not isinstance(nm, (tuple, list)) or len(nm) != 2:
        raise UserError(f"nm={nm!r} is invalid; pass a pair (n, m) such as (2, 4)")
    n, m = nm
    check_nm(n, m, in_features)
    return n, m


def _mask_from_scores(scores: torch.Tensor, sparsity, nm) -> torch.Tensor:
    pattern = resolve_pattern(sparsity, nm, scores.shape[1])
    if pattern is None:
        return row_mask(scores, sparsity)
    return nm_mask(scores, *pattern)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise UserError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
