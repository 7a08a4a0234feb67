"""What kernels read: plain tensors and integers, never a format class.

`IntWeight` is the stored layout of a group-wise integer weight (memfit.formats.intq documents
the format and checks it once, at construction): codes packed per row by
`memfit.kernels.packing`, per-(row, group) scales, and zero points that are packed integers,
real numbers, or absent (symmetric: z = 2**(bits-1)). A module hands this view to
`memfit.kernels.linear` on every forward without re-validating anything.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from memfit.kernels.packing import unpack


class IntWeight(NamedTuple):
    qdata: torch.Tensor            # uint8 (out, ceil(in * bits / 8))
    scale: torch.Tensor            # (out, n_groups), float16/bfloat16/float32
    zero: torch.Tensor | None      # packed uint8 (int), (out, n_groups) float (float), None (sym)
    shape: tuple[int, int]         # (out, in) of the dense weight
    bits: int
    group_size: int                # columns per group; the last group of a row may be shorter
    zero_point: str                # "int", "float" or "sym"

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    def zeros(self) -> torch.Tensor:
        """(out, n_groups) float32 zero points."""
        out, g = self.shape[0], self.n_groups
        if self.zero_point == "sym":
            return torch.full((out, g), float(2 ** (self.bits - 1)), device=self.scale.device)
        if self.zero_point == "int":
            return unpack(self.zero, self.bits, g).float()
        return self.zero.float()

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes."""
        return unpack(self.qdata, self.bits, self.shape[1])


def dequantize_rows_(tile: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int) -> None:
    """In place: float codes (r, in) -> (codes - z) * s, group-wise with a ragged last group."""
    r, k = tile.shape
    full = k // g
    if full:
        body = tile[:, : full * g].view(r, full, g)  # (r, full groups, g)
        body.sub_(zero[:, :full, None]).mul_(scale[:, :full, None])
    if full * g < k:
        rest = tile[:, full * g:]  # (r, ragged tail)
        rest.sub_(zero[:, full:]).mul_(scale[:, full:])


def dequantize(w: IntWeight) -> torch.Tensor:
    """(out, in) float32 weight (q - z) * s, computed in float32."""
    tile = w.codes().float()
    dequantize_rows_(tile, w.scale.float(), w.zeros(), w.group_size)
    return tile
