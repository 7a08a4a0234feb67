"""Unpacking helpers shared by the Triton kernels, and the one-pass dequantize of a group-wise
integer weight (`IntWeight`) into a dense 16/32-bit tensor: the dequantize + cuBLAS path of
memfit.kernels.triton_int (large M), for the stored row-by-row layout and for the tiled one of
memfit.kernels.weights.tile (the decode loop's, 4-bit: a block of RB rows holds, for each
128-code tile, the RB rows' 64-byte runs one after the other; scales and zero-point bytes the
same way, one column's RB values adjacent)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels.replay import Launch
from memfit.kernels.sizes import cdiv
from memfit.kernels.weights import IntWeight, row_slice


@triton.jit
def _unpack_tile(qb, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(BN, BK // PER) packed bytes -> (BN, BK) codes in column order (int32)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    q = qb.to(tl.int32)
    if BITS == 8 or BITS == 3:  # 3 bits: already codes in column order (`_codes3`)
        return q
    elif BITS == 4:
        return tl.reshape(tl.join(q & MASK, q >> 4), (BN, BK))
    else:  # 2 bits: join(join(c0, c2), join(c1, c3)) flattens to c0 c1 c2 c3
        c0, c1, c2, c3 = q & MASK, (q >> 2) & MASK, (q >> 4) & MASK, q >> 6
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BN, BK))


@triton.jit
def _blocks3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK: tl.constexpr, W3: tl.constexpr):
    """The (BN, BK // 8) int32 24-bit words of the 8-code blocks of a 3-bit tile from column k0
    (a multiple of 8; stored layout): block b is bytes 3b..3b+2 of the row, code 8b + i is bits
    3i..3i+2 of its word. W3 (`words3`: rows a whole number of 4-byte words): each block from
    the two aligned int32 words that hold it, shifted; else three strided byte loads a block.
    On an H100 the words read the codes 1.4x faster (benchmarks/bits3_loads.py, RESULTS.md)."""
    jb = (k0 // 8) * 3 + 3 * tl.arange(0, BK // 8)
    if W3:
        q32 = q_ptr.to(tl.pointer_type(tl.int32))
        row = q32 + rn[:, None] * (stride_qn // 4)
        ok = n_ok[:, None] & (jb < NB)[None, :]
        lo = tl.load(row + (jb // 4)[None, :], mask=ok, other=0)
        hi = tl.load(row + ((jb + 2) // 4)[None, :], mask=ok, other=0)
        both = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
        return ((both >> ((jb % 4) * 8)[None, :]) & 0xFFFFFF).to(tl.int32)
    row = q_ptr + rn[:, None] * stride_qn + jb[None, :]
    b0 = tl.load(row, mask=n_ok[:, None] & (jb < NB)[None, :], other=0).to(tl.int32)
    b1 = tl.load(row + 1, mask=n_ok[:, None] & (jb + 1 < NB)[None, :], other=0).to(tl.int32)
    b2 = tl.load(row + 2, mask=n_ok[:, None] & (jb + 2 < NB)[None, :], other=0).to(tl.int32)
    return b0 | (b1 << 8) | (b2 << 16)


@triton.jit
def _codes3(q_ptr, rn, k0, n_ok, stride_qn, NB, BN: tl.constexpr, BK: tl.constexpr,
            W3: tl.constexpr):
    """(BN, BK) int32 3-bit codes of the tile from column k0 in column order: each block's word
    shifted 8 ways and the planes interleaved (join(a, b) puts a's element before b's, so the
    nested joins below flatten to codes 0..7 of each block in turn)."""
    wd = _blocks3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK, W3)
    c0, c1, c2, c3 = wd & 7, (wd >> 3) & 7, (wd >> 6) & 7, (wd >> 9) & 7
    c4, c5, c6, c7 = (wd >> 12) & 7, (wd >> 15) & 7, (wd >> 18) & 7, wd >> 21
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.reshape(tl.join(even, odd), (BN, BK))


def words3(w: IntWeight) -> int:
    """1 if a 3-bit weight's rows can be read as aligned 32-bit words (`_blocks3`): whole
    32-code chunks (K a multiple of 32: no block's word past its row's end), rows and pointer
    4-byte aligned."""
    q = w.qdata
    return int(w.bits == 3 and w.shape[1] % 32 == 0 and q.stride(0) % 4 == 0
               and q.data_ptr() % 4 == 0)


@triton.jit
def _at(rn, c, stride, RB: tl.constexpr):
    """Element (row rn, column c) of a (rows, stride) tensor: stored row by row (RB = 0), or
    tiled in blocks of RB rows, each block column by column."""
    if RB == 0:
        return rn * stride + c
    else:
        return ((rn // RB) * stride + c) * RB + rn % RB


@triton.jit
def _byte_ptrs(q_ptr, rn, jb, j0, stride_qn, RB: tl.constexpr):
    """Pointers to bytes jb of rows rn (a (rows, cols) tile), stored row by row (RB = 0) or tiled
    (memfit.kernels.weights.tile): byte j of row n is in run j // 64 of block n // RB, row n % RB
    within it; the tile's bytes lie in one 64-byte run starting at byte j0."""
    if RB == 0:
        return q_ptr + rn[:, None] * stride_qn + jb[None, :]
    else:
        run = ((rn // RB) * (stride_qn // 64) + j0 // 64) * (RB * 64) + (rn % RB) * 64
        return q_ptr + run[:, None] + (jb % 64)[None, :]


@triton.jit
def _word_ptrs(q_ptr, rn, jw, w0, stride_qn, RB: tl.constexpr):
    """Pointers to the 32-bit words jw of rows rn (as `_byte_ptrs`, in words; the tile's words
    lie in one 16-word run starting at word w0 in the tiled layout)."""
    q32 = q_ptr.to(tl.pointer_type(tl.int32))
    if RB == 0:
        return q32 + rn[:, None] * (stride_qn // 4) + jw[None, :]
    else:
        run = ((rn // RB) * (stride_qn // 64) + w0 // 16) * (RB * 16) + (rn % RB) * 16
        return q32 + run[:, None] + (jw % 16)[None, :]


@triton.jit
def _group_params(s_ptr, z_ptr, rn, g, ok, stride_sn, stride_zn, BITS: tl.constexpr,
                  ZMODE: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr = 0):
    """(BN,) float32 scale and zero point of group g of rows rn."""
    MASK: tl.constexpr = (1 << BITS) - 1
    s = tl.load(s_ptr + _at(rn, g, stride_sn, RB), mask=ok, other=0.0).to(tl.float32)
    if ZMODE == 0:
        z = tl.full((BN,), 1 << (BITS - 1), tl.float32)
    elif ZMODE == 1:
        zb = tl.load(z_ptr + _at(rn, (g * BITS) // 8, stride_zn, RB), mask=ok, other=0)
        zb = zb.to(tl.int32)
        if BITS == 3:  # a 3-bit zero point may cross into the next byte (stored layout)
            cross = (rn * 0 + (g * BITS) % 8) > 8 - BITS
            zb |= tl.load(z_ptr + rn * stride_zn + (g * BITS) // 8 + 1, mask=ok & cross,
                          other=0).to(tl.int32) << 8
        z = ((zb >> ((g * BITS) % 8)) & MASK).to(tl.float32)
    else:
        z = tl.load(z_ptr + rn * stride_zn + g, mask=ok, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _dequant(q_ptr, s_ptr, z_ptr, w_ptr, N, K, NB, stride_qn, stride_sn, stride_zn,
             GROUP: tl.constexpr, BITS: tl.constexpr, ZMODE: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr = 0, W3: tl.constexpr = 0):
    """w[N, K] = (q - z) * s in w's dtype, one pass; a tile never crosses a group (nor, tiled,
    a 64-byte run: BK <= 128 codes of 4 bits from a multiple of 128). Measured at 3.3 TB/s of
    read + write on an H200 (benchmarks/RESULTS.md, session 10): other tile shapes within 3%.
    3 bits (stored layout): each tile's 8-code blocks read whole (`_codes3`), and consecutive
    programs walk one block of rows along K (program ids swapped): 80 -> 54 µs on an H100."""
    if BITS == 3:
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        k0 = tl.program_id(0) * BK
    else:
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        k0 = tl.program_id(1) * BK
    kk = k0 + tl.arange(0, BK)
    n_ok = rn < N
    s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, n_ok, stride_sn, stride_zn, BITS, ZMODE,
                         BN, RB)
    if BITS == 3:
        c = _codes3(q_ptr, rn, k0, n_ok, stride_qn, NB, BN, BK, W3).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // BITS
        BKP: tl.constexpr = BK // PER
        jb = k0 // PER + tl.arange(0, BKP)
        qb = tl.load(_byte_ptrs(q_ptr, rn, jb, k0 // PER, stride_qn, RB),
                     mask=n_ok[:, None] & (jb[None, :] < NB), other=0)
        c = _unpack_tile(qb, BITS, BN, BK).to(tl.float32)
    w = (c - z[:, None]) * s[:, None]
    tl.store(w_ptr + rn[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (kk[None, :] < K))


def block_k(w: IntWeight, cap: int = 128) -> int:
    """Largest power of two <= cap dividing the group size (any when the row is one group)."""
    if w.n_groups == 1:
        return cap
    bk = cap
    while bk > 1 and w.group_size % bk:
        bk //= 2
    return bk


def zmode(w: IntWeight) -> int:
    return {"sym": 0, "int": 1, "float": 2}[w.zero_point]


def dequantize_triton(w: IntWeight, dtype: torch.dtype, out: torch.Tensor | None = None,
                      plan: bool = False):
    """(out, in) dense weight of `dtype`, one kernel pass (stored or tiled layout), into `out`
    (a contiguous (out, in) tensor of `dtype`) when given. plan: (the weight, a callable
    returning a fresh one by the same launch with its arguments fixed: memfit.kernels.replay)."""
    n, k = w.shape
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=w.qdata.device)
    bk = min(block_k(w), 128)
    z = w.zero if w.zero is not None else w.scale
    bn = 16 if w.bits == 3 else 32  # 3 bits: 16 rows walked along K (see _dequant)
    grid = (cdiv(k, bk), cdiv(n, bn)) if w.bits == 3 else (cdiv(n, bn), cdiv(k, bk))
    args = (w.qdata, w.scale, z, out, n, k, w.qdata.shape[1], w.qdata.stride(0),
            w.scale.stride(0), z.stride(0))
    kw = dict(GROUP=w.group_size, BITS=w.bits, ZMODE=zmode(w), BN=bn, BK=bk, RB=w.tile_rows,
              W3=words3(w))
    kernel = _dequant[grid](*args, **kw)
    if not plan:
        return out
    launch = Launch(_dequant, kernel, grid, args, kw, ("w_ptr",))
    dev = w.qdata.device

    def call() -> torch.Tensor:
        wd = torch.empty(n, k, dtype=dtype, device=dev)
        launch(wd)
        return wd
    return out, call


def dequant_blocks(x2: torch.Tensor, w: IntWeight, bias, rows: int, ahead: int = 0
                   ) -> torch.Tensor:
    """Dequantize + cuBLAS `rows` output rows at a time through reused 16-bit buffers, small
    enough to stay in the L2 between their write and the GEMM's read (the whole dense weight
    goes to the HBM and back). On CUDA with `ahead` > 0, up to `ahead` blocks are dequantized
    ahead on a second stream, into ahead + 1 buffers, while this stream multiplies: the
    dequantize kernel runs on the SMs the GEMM's last wave leaves idle (14336x4096 at M = 2048,
    4096-row blocks, 2 ahead: 2-3% faster than one stream on an H100, benchmarks/RESULTS.md,
    session 43). `triton_int.run` runs it for `Config(0, rows, 0, pf=ahead)`; the chooser does
    not offer it: called eagerly, as a prefill calls it, it loses to whole dequantize + cuBLAS
    (memfit.kernels.launch_shapes, RESULTS.md session 48)."""
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    starts = range(0, n, rows)
    ahead = ahead if x2.device.type == "cuda" else 0
    bufs = [torch.empty(min(rows, n - a), k, dtype=x2.dtype, device=x2.device)  # (its first
            for a in starts[: ahead + 1]]  # block is its largest: never more than n rows)

    def buf(i: int) -> torch.Tensor:  # block i's rows of its buffer
        return bufs[i % len(bufs)][: min(rows, n - starts[i])]

    def dequant(i: int) -> torch.Tensor:
        a = starts[i]
        return dequantize_triton(row_slice(w, a, min(a + rows, n)), x2.dtype, buf(i))

    if not ahead:
        for i, a in enumerate(starts):  # a column block of y: cuBLAS writes it in place
            torch.mm(x2, dequant(i).t(), out=y[:, a:a + rows])
    else:
        main = torch.cuda.current_stream(x2.device)
        side = _side_stream(x2.device)
        ready = [torch.cuda.Event() for _ in starts]
        read = [torch.cuda.Event() for _ in starts]
        side.wait_stream(main)  # fork (also what joins a CUDA graph capture)
        done = 0
        for i, a in enumerate(starts):
            while done < min(i + len(bufs), len(starts)):
                with torch.cuda.stream(side):
                    if done >= len(bufs):  # its buffer's last reader: block done - len(bufs)
                        side.wait_event(read[done - len(bufs)])
                    dequant(done)
                    ready[done].record(side)
                done += 1
            main.wait_event(ready[i])
            torch.mm(x2, buf(i).t(), out=y[:, a:a + rows])
            read[i].record(main)
        main.wait_stream(side)  # join: the buffers are freed on this stream
    if bias is not None:
        y += bias.to(x2.dtype)
    return y


_SIDE: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One second stream a device for `dequant_blocks`' dequantizations ahead."""
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]
