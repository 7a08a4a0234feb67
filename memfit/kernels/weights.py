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

from memfit.kernels.packing import pack, unpack


class IntWeight(NamedTuple):
    qdata: torch.Tensor            # uint8 (out, ceil(in * bits / 8))
    scale: torch.Tensor            # (out, n_groups), float16/bfloat16/float32
    zero: torch.Tensor | None      # packed uint8 (int), (out, n_groups) float (float), None (sym)
    shape: tuple[int, int]         # (out, in) of the dense weight
    bits: int
    group_size: int                # columns per group; the last group of a row may be shorter
    zero_point: str                # "int", "float" or "sym"
    tile_rows: int = 0             # 0: stored row by row; RB: tiled in blocks of RB rows (`tile`)

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    def zeros(self) -> torch.Tensor:
        """(out, n_groups) float32 zero points."""
        if self.tile_rows:
            return untile(self).zeros()
        out, g = self.shape[0], self.n_groups
        if self.zero_point == "sym":
            return torch.full((out, g), float(2 ** (self.bits - 1)), device=self.scale.device)
        if self.zero_point == "int":
            return unpack(self.zero, self.bits, g).float()
        return self.zero.float()

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes."""
        if self.tile_rows:
            return untile(self).codes()
        return unpack(self.qdata, self.bits, self.shape[1])


def row_slice(w: IntWeight, a: int, b: int) -> IntWeight:
    """Rows [a, b) of `w` as a weight of their own (views, no copy); a tiled weight needs
    a and b on its row blocks."""
    rb = w.tile_rows
    if rb and (a % rb or (b % rb and b != w.shape[0])):
        raise ValueError(f"rows [{a}, {b}) split a block of {rb} tiled rows")
    z = None if w.zero is None else w.zero[a:b]
    return w._replace(qdata=w.qdata[a:b], scale=w.scale[a:b], zero=z,
                      shape=(b - a, w.shape[1]))


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


def _blocks(t: torch.Tensor, rb: int, cols: int, forward: bool) -> torch.Tensor:
    """(rows, C) -> the same bytes with each block of rb rows stored column-chunk by
    column-chunk (chunks of `cols` columns: forward), or back (not forward)."""
    n, c = t.shape
    if forward:
        return t.reshape(n // rb, rb, c // cols, cols).transpose(1, 2).reshape(n, c)
    return t.reshape(n // rb, c // cols, rb, cols).transpose(1, 2).reshape(n, c)


def tileable(w: IntWeight, rb: int) -> bool:
    """Whether `tile(w, rb)` applies: 4-bit codes, rows of whole 128-code tiles, rb | rows."""
    return (w.tile_rows == 0 and w.bits == 4 and w.zero_point != "float"
            and w.shape[1] % 128 == 0 and w.shape[0] % rb == 0 and w.qdata.is_contiguous())


def tile(w: IntWeight, rb: int) -> IntWeight:
    """The decode kernel's layout (memfit.kernels.triton_mma, RB = rb): the same tensors' bytes
    reordered, no extra memory once the caller drops the old ones. Within each block of rb
    rows, the rows' 64-byte runs of one 128-code tile are adjacent (a warp's load of 8 rows is
    one 512-byte run), then the next tile; scales and zero-point bytes likewise (one group's
    rb values adjacent). Row blocks stay whole, so rows [a, b) with rb | a, b are a valid tiled
    weight of their own (a module's slice of a fused tensor)."""
    if not tileable(w, rb):
        raise ValueError("memfit.kernels.weights.tile: this weight cannot be tiled")
    q = _blocks(w.qdata.view(torch.int32), rb, 16, True).view(torch.uint8)
    z = None if w.zero is None else _blocks(w.zero, rb, 1, True)
    return w._replace(qdata=q, scale=_blocks(w.scale, rb, 1, True), zero=z, tile_rows=rb)


def untile(w: IntWeight) -> IntWeight:
    """The stored row-by-row layout of a tiled weight (inverse of `tile`)."""
    rb = w.tile_rows
    q = _blocks(w.qdata.view(torch.int32), rb, 16, False).view(torch.uint8)
    z = None if w.zero is None else _blocks(w.zero, rb, 1, False)
    return w._replace(qdata=q, scale=_blocks(w.scale, rb, 1, False), zero=z, tile_rows=0)


def widen(w: IntWeight) -> IntWeight:
    """3-bit codes as 4-bit ones, the same weight exactly (the decode loop's layout on CUDA,
    where the 4-bit kernels read them: memfit.fastdecode.Tiling): codes and integer zero points
    repacked 4 bits each; symmetric codes shifted by 4 (c + 4 - 8 = c - 4)."""
    if w.bits != 3 or w.tile_rows:
        raise ValueError("memfit.kernels.weights.widen: takes a 3-bit weight in the stored layout")
    codes = unpack(w.qdata, 3, w.shape[1])
    if w.zero_point == "sym":
        codes += 4
    z = pack(unpack(w.zero, 3, w.n_groups), 4) if w.zero_point == "int" else w.zero
    return w._replace(qdata=pack(codes, 4), zero=z, bits=4)


def widen_bytes(w: IntWeight) -> int:
    """Bytes `widen` adds to a 3-bit weight (codes and integer zero points at 4 bits a row)."""
    rows, k = w.shape
    grow = lambda n: -(-n // 2) - -(-3 * n // 8)  # bytes of n codes: 4 against 3 bits
    return rows * (grow(k) + (grow(w.n_groups) if w.zero_point == "int" else 0))


def narrow(w: IntWeight) -> IntWeight:
    """The 3-bit weight `widen` made `w` from (stored layout)."""
    codes = unpack(w.qdata, 4, w.shape[1])
    if w.zero_point == "sym":
        codes -= 4
    z = pack(unpack(w.zero, 4, w.n_groups), 3) if w.zero_point == "int" else w.zero
    return w._replace(qdata=pack(codes, 3), zero=z, bits=3)


def dequantize(w: IntWeight) -> torch.Tensor:
    """(out, in) float32 weight (q - z) * s, computed in float32."""
    if w.tile_rows:
        w = untile(w)
    tile = w.codes().float()
    dequantize_rows_(tile, w.scale.float(), w.zeros(), w.group_size)
    return tile
