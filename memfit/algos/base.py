"""What every weight-quantization algorithm returns, and the small helpers they share.

An algorithm chooses values on the integer grid of `memfit.formats.grid` (codes, per-group scale
and zero); a packed format later chooses the bytes. `QuantResult` is that hand-off: plain
tensors, already on the stored grid (scales/zeros rounded to the format's dtypes), so the
artifact reproduces exactly what the algorithm measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.errors import UserError
from memfit.formats.grid import IntFormat, dequantize, group_view

# Elements per temporary (out_chunk x in) tensor when an algorithm works on a chunk of rows:
# 4M float32 values = 16 MiB, small next to any weight worth quantizing.
ROW_CHUNK_ELEMENTS = 1 << 22


@dataclass
class QuantResult:
    """codes: uint8 (out, in); scale, zero: float32 (out, n_groups); error: the algorithm's own
    objective (documented by each algorithm), for logging only."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    error: float | None = None

    def dequantize(self, fmt: IntFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) reconstructed weight of `dtype`."""
        return dequantize(self.codes, self.scale, self.zero, fmt, dtype)


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    """UserError unless `w` is a finite floating-point (out, in) matrix."""
    if w.dim() != 2:
        raise UserError(f"{name} must be a 2-D (out, in) matrix, got shape {tuple(w.shape)}; "
                        "reshape it (e.g. conv kernels to (out, in*k*k)) before quantizing")
    if not w.is_floating_point():
        raise UserError(f"{name} has dtype {w.dtype}; quantize the floating-point weight, "
                        "not an already-quantized one")
    if not torch.isfinite(w).all():
        raise UserError(f"{name} contains NaN or inf; the checkpoint is corrupt or overflowed. "
                        "Reload it in float32/bfloat16 before quantizing")


def check_col_weight(col_weight: torch.Tensor | None, in_features: int) -> torch.Tensor | None:
    """Validate a per-input-column importance vector; returns it as float32 or None."""
    if col_weight is None:
        return None
    if col_weight.shape != (in_features,):
        raise UserError(f"col_weight has shape {tuple(col_weight.shape)} but the weight has "
                        f"{in_features} input columns; pass one non-negative value per column")
    cw = col_weight.float()
    if not torch.isfinite(cw).all() or (cw < 0).any():
        raise UserError("col_weight must be finite and non-negative (e.g. squared input norms); "
                        "check the calibration statistics")
    return cw


def group_sq_error(w: torch.Tensor, wq: torch.Tensor, group_size: int,
                   col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(out, n_groups) sum of (optionally column-weighted) squared errors over each group's real
    columns (the ragged tail's padding is masked out)."""
    d = (w.float() - wq.float()).pow_(2)
    if col_weight is not None:
        d = d * col_weight
    dg, mask = group_view(d, group_size)  # (out, n_groups, group_size)
    return (dg * mask).sum(-1)


def row_chunks(out_features: int, in_features: int, budget: int = ROW_CHUNK_ELEMENTS):
    """Row slices whose (rows x in_features) temporaries stay within `budget` elements."""
    step = max(1, budget // max(1, in_features))
    return [slice(r, min(r + step, out_features)) for r in range(0, out_features, step)]
