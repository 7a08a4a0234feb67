"""Rows of a stored sparse weight (memfit.formats.sparse), rebuilt dense a tile at a time.

`SparseLinear`'s forward (where no sparse kernel takes the layer) multiplies by the dense weight
rebuilt from the stored format. Rebuilding the whole (out, in) matrix at once holds several
full-size temporaries per call (for int values: the mask, the codes, the float32 weight and its
masked copy: ~10 bytes per weight, ~600 MB for a 14336x4096 layer); `dense_rows(r0, r1)` rebuilds
rows [r0, r1) from byte ranges of the stored tensors, so a forward over row tiles holds one
tile's temporaries (benchmarks/sparse_forward.py; numbers in benchmarks/RESULTS.md).

Where a tile starts inside the stored streams: the bitmask holds bit r * in + c for (r, c); the
2:4 indices hold 2-bit code r * in / 2 + slot; kept int codes are one bit stream, row-major, so
row r's first code is the number of kept weights before it: for 2:4 r * in / 2, for a bitmask
`row_offsets` (counted once per module, out + 1 integers). Bit streams follow
memfit.kernels.packing (code j at bits [j * bits, (j + 1) * bits)), so any code starts a
byte-aligned unit a few codes before it: a unit is lcm(bits, 8) bits.

Also here: the 1-bit and 2-bit packing of the masks and indices."""

from __future__ import annotations

import math

import torch

from memfit.formats.intq import zeros_float
from memfit.kernels.cpu import buffer
from memfit.kernels.packing import pack, packed_width, unpack
from memfit.kernels.weights import dequantize_rows_

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """1-D bool -> uint8, 8 per byte, element 8i+b in bit b of byte i; tail padded with 0."""
    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, reuse: bool = False) -> torch.Tensor:
    """Inverse of pack_bits: the first `n` bits as a 1-D bool tensor (reuse: in this thread's
    kept buffers, valid until the next such call; CPU)."""
    nb, dev = packed.numel(), packed.device
    fields = torch.bitwise_and(packed.unsqueeze(1), _BIT_WEIGHTS.to(dev),
                               out=buffer("sparse_fields", 8 * nb, torch.uint8, reuse, dev).view(nb, 8))
    return torch.ne(fields, 0, out=buffer("sparse_keep", 8 * nb, torch.bool, reuse, dev).view(nb, 8)
                    ).view(-1)[:n]


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """1-D uint8 codes in [0, 3] -> uint8, 4 per byte, code 4i+b in bits 2b..2b+1 of byte i
    (memfit.kernels.packing's layout for one row)."""
    return pack(codes.reshape(1, -1).to(torch.uint8), 2)[0]


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_2bit: the first `n` codes as 1-D int64."""
    return unpack(packed.reshape(1, -1), 2, n)[0].to(torch.int64)


def stream_codes(packed: torch.Tensor, bits: int, start: int, count: int,
                 reuse: bool = False) -> torch.Tensor:
    """Codes [start, start + count) of a 1-D bit stream of `bits`-bit codes (uint8, or bool for
    bits = 1), reading only the bytes that hold them (reuse: bits in kept buffers, CPU)."""
    unit_bits = math.lcm(bits, 8)
    per, nbytes = unit_bits // bits, unit_bits // 8  # codes and bytes per aligned unit
    first = start // per
    skip = start - first * per
    byte0 = first * nbytes
    n = skip + count
    if bits == 1:
        return unpack_bits(packed[byte0: byte0 + -(-n // 8)], n, reuse)[skip:]
    width = packed_width(n, bits)
    return unpack(packed[byte0: byte0 + width].reshape(1, -1), bits, n)[0, skip:]


def scatter_kept(keep: torch.Tensor, src: torch.Tensor, reuse: bool = False) -> torch.Tensor:
    """A tensor shaped like `keep` (bool) holding src's values at its True places, in row-major
    order, and zeros elsewhere. One gather: each kept place reads src at its running count of
    kept places (1-based), every other place reads a zero put in front of src. On this CPU
    (1536x576, half kept, float32) 1.29 ms against 3.13 for a gather then a masked fill of the
    dropped places and 2.83 for assignment through the boolean index, which first lists the
    places (benchmarks/RESULTS.md, sessions 35-36). reuse (CPU): the index, the padded values
    and the result in this thread's kept buffers (memfit.kernels.cpu.scratch): the result is
    valid until the next such call on this thread."""
    flat = keep.reshape(-1)
    n, kept, dev = flat.numel(), src.numel(), src.device
    wide = torch.int64 if n >= 2**31 else torch.int32
    ones = buffer("sparse_ones", n, wide, reuse, dev).copy_(flat)  # (cumsum and mul_ on a bool
    idx = torch.cumsum(ones, 0, out=buffer("sparse_idx", n, wide, reuse, dev)).mul_(ones)  # cast)
    padded = buffer("sparse_src", kept + 1, src.dtype, reuse, dev)
    padded[0] = 0
    padded[1:].copy_(src)
    out = buffer("sparse_rows", n, src.dtype, reuse, dev)
    return torch.index_select(padded, 0, idx, out=out).view(keep.shape)


def row_offsets(bitmask: torch.Tensor, shape, tile_rows: int) -> torch.Tensor:
    """(out + 1,) int64: kept weights before each row of a bitmask (counted tile by tile)."""
    out, k = shape
    counts = [stream_codes(bitmask, 1, r * k, (min(r + tile_rows, out) - r) * k)
              .view(-1, k).sum(1) for r in range(0, out, tile_rows)]
    return torch.nn.functional.pad(torch.cat(counts).cumsum(0), (1, 0))


def dense_rows(layout: str, fmt, shape, t: dict, r0: int, r1: int,
               offsets: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
    """Rows [r0, r1) of the dense weight of a sparse format's tensors `t` (values / qdata,
    scale, zero, and the bitmask or 2:4 indices): the values' dtype for float values, float32 for
    int values. A bitmask tile that does not start at row 0 needs `offsets` (row_offsets).
    reuse (CPU): the tile is built in this thread's kept buffers (memfit.kernels.cpu.scratch),
    valid until the next such call: for a forward that multiplies it at once."""
    codes, keep = _kept_rows(layout, fmt, shape, t, r0, r1, offsets, reuse)
    if fmt is None:
        return codes
    rows, k = codes.shape
    on_cpu = reuse and codes.device.type == "cpu"
    z = _zeros(fmt, t, r0, r1, k)
    # (codes - z) * s in place, then the dropped places zeroed: grid.dequantize's arithmetic
    w = buffer("sparse_rows", rows * k, torch.float32, on_cpu, codes.device).view(rows, k)
    w.copy_(codes)
    dequantize_rows_(w, t["scale"][r0:r1].float(), z, fmt.groups(k)[0])
    return w.mul_(keep)


def _zeros(fmt, t: dict, r0: int, r1: int, k: int) -> torch.Tensor:
    """(r1 - r0, n_groups) float32 zero points of rows [r0, r1)."""
    zero = t.get("zero")
    return zeros_float(None if zero is None else zero[r0:r1], fmt, r1 - r0, fmt.groups(k)[1],
                       t["scale"].device)


def _kept_rows(layout: str, fmt, shape, t: dict, r0: int, r1: int, offsets, reuse: bool):
    """(rows [r0, r1) with the kept values or codes in place and 0 elsewhere, the (rows, in)
    bool mask of kept places, or None for 2:4 float values)."""
    k = shape[1]
    rows = r1 - r0
    if layout == "2:4":  # every row keeps k / 2 slots: scatter them to their positions
        src = t["values"][r0:r1] if fmt is None else \
            stream_codes(t["qdata"], fmt.bits, r0 * k // 2, rows * k // 2)
        pos = stream_codes(t["indices"], 2, r0 * k // 2, rows * k // 2).long()
        pos = pos.view(rows, k // 4, 2)
        on_cpu, dev = reuse and src.device.type == "cpu", src.device
        name = "sparse_rows" if fmt is None else "sparse_codes"
        dense = buffer(name, rows * k, src.dtype, on_cpu, dev).view(rows, k // 4, 4).zero_()
        dense = dense.scatter_(-1, pos, src.reshape(rows, k // 4, 2)).view(rows, k)
        if fmt is None:
            return dense, None
        keep = buffer("sparse_keep", rows * k, torch.bool, on_cpu, dev).view(rows, k // 4, 4)
        return dense, keep.zero_().scatter_(-1, pos, True).view(rows, k)
    on_cpu = reuse and t["bitmask"].device.type == "cpu"
    keep = stream_codes(t["bitmask"], 1, r0 * k, rows * k, on_cpu).view(rows, k)
    if offsets is not None:
        start, stop = int(offsets[r0]), int(offsets[r1])
    else:
        assert r0 == 0, "a bitmask tile after row 0 needs the row offsets"
        start, stop = 0, int(keep.sum())
    src = t["values"][start:stop] if fmt is None else \
        stream_codes(t["qdata"], fmt.bits, start, stop - start)
    return scatter_kept(keep, src, on_cpu), keep


def kernel_layout(view, layout: str, fmt, t: dict, offsets: torch.Tensor | None):
    """The CPU kernel layout (memfit.kernels.cpu.prepare_cpu) of the dense codes of a sparse
    weight with integer values (`view`: SparseLinear.kernel_view, its IntWeight fields), each
    dropped place holding its group's integer zero point, so its weight is (z - z) s = 0; None
    where no kernel takes it. The dense codes are packed PREPARE_ROWS rows at a time (the
    transient is that packed copy, 1/2 byte a weight at 4 bits, freed once converted)."""
    from memfit.kernels.cpu import PREPARE_ROWS, kernel_ineligibility, prepare_cpu

    out, k = view.shape
    if view.scale.device.type != "cpu" or kernel_ineligibility(view) is not None:
        return None
    w = view._replace(qdata=torch.empty(out, packed_width(k, fmt.bits), dtype=torch.uint8))
    for r0 in range(0, out, PREPARE_ROWS):
        r1 = min(out, r0 + PREPARE_ROWS)
        codes, keep = _kept_rows(layout, fmt, view.shape, t, r0, r1, offsets, False)
        z = _zeros(fmt, t, r0, r1, k).to(torch.uint8).repeat_interleave(w.group_size, dim=1)
        w.qdata[r0:r1] = pack(torch.where(keep, codes, z[:, :k]), fmt.bits)
    return prepare_cpu(w)
