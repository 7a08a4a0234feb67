"""Stream-K form of the tensor-core decode kernel (memfit.kernels.triton_mma): every program gets
the same number of tiles.

Why: the split-K grid of `_mma_gemv` has (rows / BN) x SPLIT_K programs of equal size, which on
14336x4096 (56 x 4 = 224 programs of 256 rows) is 1.7 waves of 132 SMs: the last wave leaves a
third of the SMs without loads in flight. A decode GEMV is bound by the bytes each SM keeps in
flight, so an SM with no work is bandwidth lost. (A plain read of the same codes over a grid of
c x 132 equal programs: 8.7 µs; the split-K kernel's loads alone: 10.4 µs; RESULTS.md sessions
9-10.) Here the (row block, 128-code tile) units, row block by row block, are cut into P equal
runs, one per program (P = a multiple of the SM count), so each program streams the same bytes
with its register prefetch full from start to end. A run that ends or crosses a row block
flushes its partial sums: a row block covered by one program is written at once; otherwise each
of its n programs stores a float32 partial in its slot (its rank among them) and the last to
arrive (an arrival counter per row block) adds the n slots in slot order, so the result does not
depend on timing. The tile arithmetic (loads, asm, layout check) is `_mma_gemv`'s.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from memfit.kernels import mma_ptx, pdl
from memfit.kernels.mma_tiles import _col, _params
from memfit.kernels.triton_mma import INTERPRET, _tile, constants, mma_ineligibility
from memfit.kernels.triton_words import _counters, _store_y
from memfit.kernels.weights import IntWeight


@triton.jit
def _owner(u, P, UT):
    """The program whose run holds unit u (runs [p UT / P, (p + 1) UT / P), floored)."""
    return ((u + 1) * P - 1) // UT


@triton.jit
def _unit(u, KT, rr, rw, q_ptr, stride_qn, BN: tl.constexpr, RB: tl.constexpr):
    """Rows, word pointers and first word of unit u = (row block u // KT, tile u % KT)."""
    rb = u // KT
    kt = u - rb * KT
    rn = rb * BN + rr
    if RB == 0:
        qp = q_ptr + rn[:, None] * stride_qn + (kt * 16 + rw)[None, :]
    else:
        qp = q_ptr + (((rn // RB) * (stride_qn // 16) + kt) * (16 * RB) + (rn % RB) * 16)[:, None] \
            + rw[None, :]
    return rn, qp, kt * 16


@triton.jit
def _flush(acc, rn, rb, pid, P, UT, KT, M, N, col, rw, y_ptr, p_ptr, c_ptr, b_ptr,
           MT: tl.constexpr, NSUB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row block rb's sums from this program: written to y when it covers the whole block, else
    stored in its slot; the block's last program to arrive adds the slots in order and writes y."""
    n_ok = rn < N
    if MT > 1:
        ok = n_ok[:, None] & (col < M)[None, :]
        off = col[None, :] * N + rn[:, None]
    else:
        off = rn[:, None] + col[None, :] * 0
        ok = n_ok[:, None] & (rw == 0)[None, :]
        if NSUB > 1:  # the NSUB group sums of a row sit in lanes j = 0, 1: add them into slot 0
            acc = tl.where(ok, tl.sum(tl.where((col < NSUB)[None, :], acc, 0.0), axis=1)[:, None],
                           0.0)
    boff = rn[:, None] + col[None, :] * 0
    first = _owner(rb * KT, P, UT)
    n = _owner(rb * KT + KT - 1, P, UT) - first + 1
    if n == 1:
        _store_y(acc, off, ok, boff, y_ptr, b_ptr, HAS_BIAS)
    else:
        slot = M * N
        tl.store(p_ptr + (pid - first) * slot + off, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is stored before the (one-thread) release
        arrived = tl.atomic_add(c_ptr + rb, 1, sem="acq_rel")
        tl.debug_barrier()
        if arrived == n - 1:
            tot = tl.zeros(acc.shape, tl.float32)
            for i in range(n):
                tot += tl.load(p_ptr + i * slot + off, mask=ok, other=0.0, cache_modifier=".cg")
            _store_y(tot, off, ok, boff, y_ptr, b_ptr, HAS_BIAS)
            tl.atomic_xchg(c_ptr + rb, 0)


@triton.jit
def _mma_stream(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr, M, N, KT, UT,
                stride_xm, stride_qn, stride_sn, stride_zn, GROUP: tl.constexpr,
                ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr, F16: tl.constexpr, MT: tl.constexpr,
                NSUB: tl.constexpr, HALVES: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr,
                ASM_TEXT: tl.constexpr, CONSTRAINTS: tl.constexpr, RB: tl.constexpr = 0,
                PDL: tl.constexpr = False, PACK: tl.constexpr = 4, PF: tl.constexpr = 1):
    """Program p streams units [p UT / P, (p + 1) UT / P) of the UT = row blocks x KT tiles, one
    tile computed while the next PF tiles' words, scales and zero points are in flight; at the end
    of a row block or of its run it flushes (`_flush`)."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    u0 = (pid * UT) // P
    u1 = ((pid + 1) * UT) // P
    rr = tl.arange(0, BN)
    rw = tl.arange(0, 16)
    rg = rr % 8  # the row's lane quad g within its warp (8 rows per warp)
    col = _col(rw, HALVES)
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    acc1 = acc  # unused (MT <= 16)
    rn, qp, w0 = _unit(u0, KT, rr, rw, q_ptr, stride_qn, BN, RB)
    wd, s, zc, zw = _params(qp, s_ptr, z_ptr, rn, (rn < N) & (rn * 0 + u0 < u1), w0, rw, col, stride_sn,
                            stride_zn, GROUP, ZMODE, NSUB, RB)
    if PF == 2:
        rn1, qp1, w01 = _unit(u0 + 1, KT, rr, rw, q_ptr, stride_qn, BN, RB)
        wd1, s1, zc1, zw1 = _params(qp1, s_ptr, z_ptr, rn1, (rn1 < N) & (rn1 * 0 + u0 + 1 < u1), w01, rw,
                                    col, stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
    pdl.wait(PDL)  # the first tiles' weights are in flight; x is the previous kernel's
    for u in range(u0, u1):
        rnn, qpn, w0n = _unit(u + PF, KT, rr, rw, q_ptr, stride_qn, BN, RB)
        nwd, ns, nzc, nzw = _params(qpn, s_ptr, z_ptr, rnn, (rnn < N) & (rnn * 0 + u + PF < u1), w0n, rw,
                                    col, stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
        acc, acc1 = _tile(acc, acc1, wd, s, zc, zw, w0 + rw, x32, x_ptr, rn, rg, rw, M,
                          stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS, PACK)
        rb = u // KT
        if (u - rb * KT == KT - 1) | (u == u1 - 1):
            _flush(acc, rn, rb, pid, P, UT, KT, M, N, col, rw, y_ptr, p_ptr, c_ptr,
                   b_ptr, MT, NSUB, HAS_BIAS)
            acc = tl.zeros((BN, 16), dtype=tl.float32)
        if PF == 2:
            rn, wd, s, zc, zw, w0 = rn1, wd1, s1, zc1, zw1, w01
            rn1, wd1, s1, zc1, zw1, w01 = rnn, nwd, ns, nzc, nzw, w0n
        else:
            rn, wd, s, zc, zw, w0 = rnn, nwd, ns, nzc, nzw, w0n


@functools.lru_cache(maxsize=256)
def slots(units: int, programs: int, tiles: int) -> int:
    """The most programs whose runs share one row block (the partial slots a call needs)."""
    def owner(u):
        return ((u + 1) * programs - 1) // units
    return max(owner(b + tiles - 1) - owner(b) + 1 for b in range(0, units, tiles))


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (8 under the CPU interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def stream_ineligibility(w: IntWeight, m: int, dtype: torch.dtype) -> str | None:
    """Why `_mma_stream` cannot take `w` with M rows of `dtype` (None when it can)."""
    why = mma_ineligibility(w, m, dtype)
    if why is None and m > 16:
        why = "the stream-K mma kernel takes M <= 16"
    return why


def run_stream(x2: torch.Tensor, w: IntWeight, bias, bn: int, per_sm: int, num_warps: int,
               reps: int = 1, prefetch: int = 1, programs: int | None = None) -> torch.Tensor:
    """(M, in) -> (M, out) through `_mma_stream` over `programs` (default per_sm x the device's
    SM count) equal runs of tiles; reps and prefetch as `triton_mma.run_mma`'s."""
    m, k = x2.shape
    n = w.shape[0]
    why = stream_ineligibility(w, m, x2.dtype)
    if why is not None:
        raise ValueError(f"memfit.kernels.triton_mma_stream: {why}")
    if prefetch not in (1, 2):
        raise ValueError(f"memfit.kernels.triton_mma_stream: prefetch {prefetch} is not 1 or 2")
    mt = 1 if m == 1 else max(8, 1 << (m - 1).bit_length())
    if mt == 1 and not mma_ptx.PAIRED:
        reps = 1
    if reps > 1 and (bn // (8 * num_warps)) % reps:
        raise ValueError(f"memfit.kernels.triton_mma_stream: {reps} rows per asm call do not "
                         f"divide a lane's {bn // (8 * num_warps)} rows")
    f16 = x2.dtype == torch.float16
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # the asm loads 16-byte vectors of activations (M > 1)
        x2 = x2.clone()
    tiles = k // 128
    blocks = triton.cdiv(n, bn)
    units = blocks * tiles
    p = max(1, min(programs or per_sm * sm_count(x2.device), units))
    q = w.qdata.view(torch.int32)
    z = w.zero if w.zero is not None else w.scale
    b = bias if bias is not None else w.scale
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    ns = slots(units, p, tiles)
    part = torch.empty(ns, m, n, dtype=torch.float32, device=x2.device) if ns > 1 else y
    cnt = _counters(x2.device, blocks) if ns > 1 else q
    sdt = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}.get(w.scale.dtype)
    c = constants(mt, w.group_size, 0 if w.zero_point == "sym" else 1, sdt, f16, bn, 1, 1,
                  w.tile_rows, False, reps, bias is not None, not INTERPRET, prefetch)
    kernel = _mma_stream[(p,)](
        x2, q, w.scale, z, b, y, part, cnt, m, n, tiles, units, x2.stride(0), q.stride(0),
        w.scale.stride(0), z.stride(0), **{key: c[key] for key in KEEP},
        num_warps=num_warps, num_stages=1, **pdl.launch_kw())
    LAST[0] = kernel
    if not INTERPRET:
        mma_ptx.check_layout(kernel)
    return y


# the compile-time arguments of `_mma_gemv` (triton_mma.constants) that `_mma_stream` takes
KEEP = ("GROUP", "ZMODE", "HAS_BIAS", "F16", "MT", "NSUB", "HALVES", "BN", "ASM", "ASM_TEXT",
        "CONSTRAINTS", "RB", "PACK", "PF")
LAST: list = [None]  # the last launched compiled kernel (benchmarks read n_regs, n_spills)
