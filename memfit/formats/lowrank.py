"""`LowRankLinear`: y = A (B x) + bias with A (out, r), B (r, in) as two thin nn.Linear layers.

Trainable for healing; either factor may be swapped for a `QuantLinear` (quantized factors), and
then `A`/`B` dequantize it. At rank r an (out, in) layer stores r·(out + in) values instead of
out·in, so it saves bytes only below r = out·in / (out + in).
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.grid import IntFormat


class LowRankLinear(nn.Module):
    """y = A (B x) + bias: `down` holds B (r, in), `up` holds A (out, r) and the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise UserError(f"rank={rank} is invalid for a {out_features}x{in_features} layer; "
                            f"use [1, {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "LowRankLinear":
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise UserError(f"factors do not chain: A {tuple(A.shape)} must be (out, r) and "
                            f"B {tuple(B.shape)} must be (r, in)")
        if bias is not None and tuple(bias.shape) != (A.shape[0],):
            raise UserError(f"bias has shape {tuple(bias.shape)}, expected ({A.shape[0]},)")
        m = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype,
                device=A.device)
        with torch.no_grad():
            m.up.weight.copy_(A)
            m.down.weight.copy_(B.to(A.dtype))
            if bias is not None:
                m.up.bias.copy_(bias.to(A.dtype))
        return m

    @property
    def fmt(self) -> IntFormat | None:
        """The IntFormat of quantized factors, None when they are floats."""
        return getattr(self.up, "fmt", None)

    @property
    def A(self) -> torch.Tensor:
        return _factor(self.up)

    @property
    def B(self) -> torch.Tensor:
        return _factor(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def nbytes(self) -> int:
        """Stored weight bytes of both factors (packed when quantized); bias excluded."""
        return sum(m.nbytes() if hasattr(m, "nbytes") else m.weight.numel() * m.weight.element_size()
                   for m in (self.down, self.up))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight A @ B."""
        return (self.A.float() @ self.B.float()).to(dtype)

    def describe(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None,
                "fmt": None if self.fmt is None else self.fmt.to_dict()}


def _factor(m: nn.Module) -> torch.Tensor:
    return m.weight if isinstance(m, nn.Linear) else m.dequantize()
