"""Bit packing of unsigned integer codes into bytes, for 2, 3, 4 and 8 bits per code.

Layout: each row is an independent little-endian bit stream. Code j of a row occupies bits
[j * bits, (j + 1) * bits) of that row's stream, and stream bit b lives in byte b // 8 at bit
position b % 8. So for 4 bits code 2j is the low nibble of byte j; for 2 bits code 4j+i sits at bits
2i..2i+1 of byte j; for 3 bits every 8 codes fill exactly 3 bytes; 8 bits is the identity.

A row of k codes takes ceil(k * bits / 8) bytes. The unused high bits of the last byte (when
k * bits is not a multiple of 8) are zero padding: they are counted in the byte size (they are
stored) and ignored by `unpack`. Rows are never padded to a common block, so nothing is stored
twice and the byte count is the honest one.

Why this layout: it is one rule for every width (no per-width tables), packing/unpacking is a few
vectorized shifts on whole tensors (CPU and CUDA alike), and 3-bit codes cost exactly 3 bits.
Fast kernels that want another layout convert from this one at load time.
"""

from __future__ import annotations

import torch

from memfit.errors import UserError

PACK_BITS = (2, 3, 4, 8)


def packed_width(k: int, bits: int) -> int:
    """Bytes per row for k codes of `bits` bits: ceil(k * bits / 8)."""
    _check_bits(bits)
    return -(-k * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, k) uint8 codes in [0, 2**bits - 1] -> (rows, ceil(k * bits / 8)) uint8 bytes."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise UserError(
            f"pack expects a 2-D uint8 tensor of codes, got {codes.dtype} with shape "
            f"{tuple(codes.shape)}; convert with .to(torch.uint8) and reshape to (rows, k)")
    rows, k = codes.shape
    if codes.numel() and int(codes.max()) > 2**bits - 1:
        raise UserError(
            f"a code of {int(codes.max())} does not fit in {bits} bits (max {2**bits - 1}); "
            "clamp the codes to the grid before packing")
    if bits == 8:
        return codes.contiguous().clone()
    width = packed_width(k, bits)
    if bits == 3:
        return _pack3(codes, width)
    per = 8 // bits  # codes per byte
    padded = _pad_cols(codes, per)  # (rows, width * per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    parts = padded.view(rows, width, per) << shifts  # (rows, width, per)
    out = parts[..., 0].clone()
    for i in range(1, per):
        out |= parts[..., i]
    return out


def unpack(packed: torch.Tensor, bits: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, ceil(k * bits / 8)) uint8 bytes -> (rows, k) uint8 codes (the inverse of `pack`),
    written into `out` ((rows, k) uint8, contiguous) when given: the CPU tiles' reused buffer,
    so a call allocates nothing the size of its codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise UserError(
            f"unpack expects a 2-D uint8 tensor, got {packed.dtype} with shape "
            f"{tuple(packed.shape)}")
    width = packed_width(k, bits)
    if packed.shape[1] != width:
        raise UserError(
            f"{k} codes of {bits} bits take {width} bytes per row, but the packed tensor has "
            f"{packed.shape[1]}; pass the k that was packed")
    rows = packed.shape[0]
    per = 8 // bits
    if out is not None and bits in (2, 4) and k == width * per:
        _fields_into(packed, bits, out.view(rows, width, per))
        return out
    if bits == 8:
        codes = packed if out is not None else packed.contiguous().clone()
    elif bits == 3:
        codes = _unpack3(packed, k, out)
        if codes is out:
            return out
    else:
        mask = 2**bits - 1
        # scalar shifts, one field at a time: much faster on CPU than a broadcast shift tensor;
        # the lowest field needs no shift and the highest no mask (a fifth fewer passes: 4-bit
        # 0.31 -> 0.25 ns a code on this CPU)
        fields = [packed & mask] + [(packed >> s) & mask for s in range(bits, 8 - bits, bits)]
        codes = torch.stack(fields + [packed >> (8 - bits)], dim=-1)  # (rows, width, per)
        codes = codes.view(rows, width * per)[:, :k].contiguous()
    return codes if out is None else out.copy_(codes)


def _fields_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Each field of each byte into its slot of out (rows, width, per), no temporaries."""
    mask = 2**bits - 1
    torch.bitwise_and(packed, mask, out=out[..., 0])
    for i, s in enumerate(range(bits, 8, bits), start=1):
        torch.bitwise_right_shift(packed, s, out=out[..., i])
        if s + bits < 8:
            out[..., i].bitwise_and_(mask)


def _pack3(codes: torch.Tensor, width: int) -> torch.Tensor:
    rows = codes.shape[0]
    padded = _pad_cols(codes, 8).to(torch.int32)  # (rows, blocks * 8)
    blocks = padded.shape[1] // 8
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)  # (8,)
    word = (padded.view(rows, blocks, 8) << shifts).sum(dim=-1, dtype=torch.int32)  # (rows, blocks)
    byte_shifts = torch.tensor([0, 8, 16], dtype=torch.int32, device=codes.device)
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # (rows, blocks, 3)
    # the bytes past `width` hold only padding codes (zeros), so cutting them loses nothing
    return out.view(rows, blocks * 3)[:, :width].contiguous()


def _unpack3(packed: torch.Tensor, k: int, into: torch.Tensor | None = None) -> torch.Tensor:
    # Byte-wise on planes of the blocks' first, second and third bytes (uint8 ops with scalar
    # shifts, written into planes of the output): 2.3-3.5x faster on the CPU than widening each
    # block to an int32 word and shifting it by a tensor of shifts (576x1536: 0.92 -> 0.40 ms).
    rows = packed.shape[0]
    padded = _pad_cols(packed, 3)
    blocks = padded.shape[1] // 3
    b0, b1, b2 = padded.view(rows, blocks, 3).permute(2, 0, 1).contiguous()
    out = torch.empty(8, rows, blocks, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(b0, 7, out=out[0])
    torch.bitwise_and(b0 >> 3, 7, out=out[1])
    torch.bitwise_or(b0 >> 6, (b1 & 1) << 2, out=out[2])
    torch.bitwise_and(b1 >> 1, 7, out=out[3])
    torch.bitwise_and(b1 >> 4, 7, out=out[4])
    torch.bitwise_or(b1 >> 7, (b2 & 3) << 1, out=out[5])
    torch.bitwise_and(b2 >> 2, 7, out=out[6])
    torch.bitwise_right_shift(b2, 5, out=out[7])
    if into is not None and k == blocks * 8:  # straight into the caller's buffer
        into.view(rows, blocks, 8).copy_(out.permute(1, 2, 0))
        return into
    return out.permute(1, 2, 0).reshape(rows, blocks * 8)[:, :k].contiguous()


def _pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last dimension with zeros up to a multiple of `multiple`."""
    pad = -t.shape[1] % multiple
    if not pad:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, pad))


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise UserError(f"cannot pack {bits}-bit codes; use one of {PACK_BITS}")
