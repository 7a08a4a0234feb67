"""3-bit codes widened to 4-bit words on every call, so the 4-bit kernels can read them.

Why: the kernels that read 3-bit codes where they lie (memfit.kernels.triton_bytes, the
dequantize kernel) run on CUDA cores and decode each 8-code block from a 24-bit field; at M = 1
they ran at 0.47x bf16 cuBLAS on an H200 (14336x4096 g128: 65.9 against 31.0 µs; RESULTS.md,
session 37), where the 4-bit tensor-core decode kernel (memfit.kernels.triton_mma) runs at
~2.4x. One pass here reads the 3-bit rows as 32-code chunks (three aligned int32 words: on an
H100 14.4 µs for 14336x4096 against 34.0 for the block-word reads, benchmarks/bits3_loads.py)
and writes them as 4-bit words (a code a nibble, as memfit.kernels.packing stores 4-bit rows),
the integer zero points likewise, into buffers of the caller's call (the caching allocator
reuses them; nothing is kept between calls). The result is exactly `weights.widen(w)`: the same
weight, so any 4-bit launch shape then computes what it computes for a 4-bit model.
The chooser (memfit.kernels.launch_shapes, `Config.widen`) times widen + each 4-bit shape
against the 3-bit kernels and dequantize + cuBLAS, like every other candidate. On an H200
(RESULTS.md, session 38) it took widen + the mma kernel at M = 1 (14336x4096: 28.9 µs, bf16
cuBLAS 30.7; 65.9 through the 3-bit GEMV in session 37) and widen + the weight-as-A tile kernel
at M = 16 and 64 (33.3 and 41.1 µs against 88.4 and 88.1); the codes' 51 MB of reads and writes
are most of the gap to the 4-bit kernels (~13 µs), which the decode loop avoids by widening once.

Takes: 3-bit codes with integer or symmetric zero points (float zero points are the 4-bit
kernels' exception too), rows of a whole number of 32-code chunks, 4-byte aligned (`words3`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels.sizes import cdiv, next_pow2
from memfit.kernels.triton_dequant import words3
from memfit.kernels.weights import IntWeight


@triton.jit
def _spread(f):
    """Eight 3-bit fields (bits 3i..3i+2 of a 24-bit value) into the low 3 bits of nibble i."""
    f = (f & 0xFFF) | ((f & 0xFFF000) << 4)  # fields 0-3 | fields 4-7 in the upper half
    f = (f & 0x003F003F) | ((f & 0x0FC00FC0) << 2)  # two fields a byte
    return (f & 0x07070707) | ((f & 0x38383838) << 1)  # one field a nibble


@triton.jit
def _zero_byte(z_ptr, rn, j, ok, stride_zn, NZ, G):
    """4-bit byte j (zero points 2j, 2j + 1) of rows rn from their 3-bit stream (a zero point may
    cross into the next byte; one past G is 0)."""
    out = tl.zeros(j.shape, tl.int32)
    for h in tl.static_range(2):
        g = 2 * j + h
        b = (3 * g) // 8
        lo = tl.load(z_ptr + rn * stride_zn + b, mask=ok & (g < G), other=0).to(tl.int32)
        hi = tl.load(z_ptr + rn * stride_zn + b + 1, mask=ok & (g < G) & (b + 1 < NZ),
                     other=0).to(tl.int32)
        out |= (((lo | (hi << 8)) >> ((3 * g) % 8)) & 7) << (4 * h)
    return out


@triton.jit
def _widen3(q_ptr, z_ptr, o_ptr, oz_ptr, N, K, G, NZ, stride_qn, stride_zn,
            SYM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ZB: tl.constexpr):
    """(BN rows, BK codes) a program, consecutive programs along a row block: each 32-code chunk
    (words w0, w1, w2: code i at bits 3i..3i+2 of 96) becomes 4-bit words 4c..4c+3 of the
    output row (word e: codes 8e..8e+7, code 8e + i in bits 4i..4i+3). SYM: symmetric codes
    shifted by 4 (c + 4 - 8 = c - 4). ZB > 0: the first program of a row block also widens the
    rows' integer zero points, 3 bits each -> 4 (ZB: a power of two >= ceil(G / 2), the output
    bytes a row)."""
    NC: tl.constexpr = BK // 32
    pid_k = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    c = pid_k * NC + tl.arange(0, NC)
    ok = n_ok[:, None] & (c < K // 32)[None, :]
    src = q_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (stride_qn // 4) + (3 * c)[None, :]
    w0 = tl.load(src, mask=ok, other=0)
    w1 = tl.load(src + 1, mask=ok, other=0)
    w2 = tl.load(src + 2, mask=ok, other=0)
    n0 = _spread(w0 & 0xFFFFFF)
    n1 = _spread(((w0 >> 24) & 0xFF) | ((w1 & 0xFFFF) << 8))
    n2 = _spread(((w1 >> 16) & 0xFFFF) | ((w2 & 0xFF) << 16))
    n3 = _spread((w2 >> 8) & 0xFFFFFF)
    if SYM:
        n0, n1, n2, n3 = n0 + 0x44444444, n1 + 0x44444444, n2 + 0x44444444, n3 + 0x44444444
    # join(join(n0, n2), join(n1, n3)) flattens to n0 n1 n2 n3 for each chunk
    out = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BN, 4 * NC))
    jw = pid_k * 4 * NC + tl.arange(0, 4 * NC)
    tl.store(o_ptr + rn[:, None] * (K // 8) + jw[None, :], out,
             mask=n_ok[:, None] & (jw < K // 8)[None, :])
    if ZB > 0:  # noqa: SIM102 (a constexpr and a runtime test: Triton takes them apart)
        if pid_k == 0:
            j = tl.arange(0, ZB)
            jok = n_ok[:, None] & (j < (G + 1) // 2)[None, :]
            zb = _zero_byte(z_ptr, rn[:, None], j[None, :], jok, stride_zn, NZ, G)
            tl.store(oz_ptr + rn[:, None] * ((G + 1) // 2) + j[None, :], zb.to(tl.uint8),
                     mask=jok)


def widen_ineligibility(w: IntWeight) -> str | None:
    """Why `widen_triton` cannot take `w` (None when it can)."""
    if w.bits != 3 or w.tile_rows:
        return "widening takes 3-bit codes in the stored layout"
    if w.zero_point == "float":
        return "the 4-bit kernels take integer or symmetric zero points"
    if not words3(w) or not w.qdata.is_contiguous():
        return "widening reads rows of whole 32-code chunks, 4-byte aligned"
    return None


ROWS, COLS = 8, 512  # a program's rows and codes: on an H100 both Llama shapes 20.0 µs (16 rows
# 22.2, 32 rows x 256 codes 29.9; one program a row block along the whole row was 24.2 / 38.4:
# benchmarks/bits3_loads.py --parts widen, RESULTS.md session 38)


def widen_triton(w: IntWeight) -> IntWeight:
    """`weights.widen(w)` in one kernel pass on w's device: a 4-bit weight in new buffers
    (codes 4/3 of w's bytes) sharing w's scales."""
    why = widen_ineligibility(w)
    if why:
        raise ValueError(f"memfit.kernels.triton_widen: {why}")
    n, k = w.shape
    g = w.n_groups
    dev = w.qdata.device
    q4 = torch.empty(n, k // 8, dtype=torch.int32, device=dev)
    z4 = torch.empty(n, (g + 1) // 2, dtype=torch.uint8, device=dev) if w.zero is not None else None
    z = w.zero if w.zero is not None else w.qdata
    bk = min(COLS, next_pow2(k))
    _widen3[(cdiv(k, bk), cdiv(n, ROWS))](
        w.qdata, z, q4, z4 if z4 is not None else q4, n, k, g, z.shape[1], w.qdata.stride(0),
        z.stride(0), SYM=w.zero_point == "sym", BN=ROWS, BK=bk,
        ZB=next_pow2((g + 1) // 2) if z4 is not None else 0)
    return w._replace(qdata=q4.view(torch.uint8), zero=z4, bits=4)
