"""Round-to-nearest (RTN) weight quantization, with optional MSE-searched clipping.

- clip="minmax": each (row, group) spans exactly its min..max; nothing is clipped, so rare large
  weights stretch the grid for all the others.
- clip="mse": for every (row, group) try `grid_points` shrink factors of the range from 1.0 down
  to 1 - max_shrink and keep the one with the smallest squared error, optionally weighted per
  input column (pass e.g. `InputNormStat.norms ** 2` or diag(H) to measure error where the
  inputs are large). Shrink 1.0 is always a candidate, so MSE clipping is never worse than
  min-max on its own (weighted) metric.

Candidates are scored against the rounded (stored-dtype) scale/zero, exactly what the artifact
will hold. The search is vectorised over groups and loops over shrink factors; rows are
processed in chunks so temporaries stay ~16 MiB for any weight size.
"""

from __future__ import annotations

import torch

from memfit.algos.base import (ROW_CHUNK_ELEMENTS, QuantResult, check_col_weight, check_weight,
                               group_sq_error, row_chunks)
from memfit.errors import UserError
from memfit.formats.grid import IntFormat, dequantize, minmax_params, quantize, round_params

CLIP_MODES = ("minmax", "mse")


def _check_search(clip: str, grid_points: int, max_shrink: float) -> None:
    if clip not in CLIP_MODES:
        raise UserError(f"clip={clip!r} is invalid; use one of {CLIP_MODES}")
    if grid_points < 1:
        raise UserError(f"grid_points={grid_points} must be at least 1 (e.g. 80)")
    if not 0.0 <= max_shrink < 1.0:
        raise UserError(f"max_shrink={max_shrink} must be in [0, 1) (e.g. 0.8: try ranges "
                        "down to 20% of min..max)")


def _mse_params(w: torch.Tensor, fmt: IntFormat, col_weight: torch.Tensor | None,
                grid_points: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounded (scale, zero), each (rows, n_groups), minimising the per-group squared error."""
    g, _ = fmt.groups(w.shape[1])
    best_s = best_z = best_err = None
    for shrink in torch.linspace(1.0, 1.0 - max_shrink, grid_points).tolist():
        s, z = round_params(*minmax_params(w, fmt, shrink), fmt)
        wq = dequantize(quantize(w, s, z, fmt), s, z, fmt)
        err = group_sq_error(w, wq, g, col_weight)  # (rows, n_groups)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z


def choose_params(w: torch.Tensor, fmt: IntFormat, clip: str = "minmax", *,
                  col_weight: torch.Tensor | None = None, grid_points: int = 80,
                  max_shrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored-dtype (scale, zero), each (out, n_groups) float32, for weight `w` (out, in).

    Shared by RTN and by GPTQ (which calls it on one group's columns at a time)."""
    _check_search(clip, grid_points, max_shrink)
    w = w.float()
    if clip == "minmax":
        return round_params(*minmax_params(w, fmt), fmt)
    # ~4 live (rows, in) temporaries per shrink candidate
    parts = [_mse_params(w[rows], fmt, col_weight, grid_points, max_shrink)
             for rows in row_chunks(w.shape[0], w.shape[1], ROW_CHUNK_ELEMENTS // 4)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def rtn(w: torch.Tensor, fmt: IntFormat, *, clip: str = "minmax",
        col_weight: torch.Tensor | None = None, grid_points: int = 80,
        max_shrink: float = 0.8) -> QuantResult:
    """Round-to-nearest quantization of `w` (out, in) on `fmt`.

    `error` is Σ col_weight_j (W - Ŵ)²_ij (plain squared error without col_weight).
    Does not modify `w`; results live on w's device.
    """
    check_weight(w)
    cw = check_col_weight(col_weight, w.shape[1])
    if cw is not None:
        cw = cw.to(w.device)
    w = w.float()
    scale, zero = choose_params(w, fmt, clip, col_weight=cw, grid_points=grid_points,
                                max_shrink=max_shrink)
    codes = quantize(w, scale, zero, fmt)
    g, _ = fmt.groups(w.shape[1])
    err = group_sq_error(w, dequantize(codes, scale, zero, fmt), g, cw).sum().item()
    return QuantResult(codes=codes, scale=scale, zero=zero, error=err)
