"""Tensor-core decode kernel for 4-bit codes (M <= 32): mma.sync on codes made bf16 by bit tricks.

Why: the word kernels (memfit.kernels.triton_words) compile to 5.5-8 SASS instructions per 4-bit
code in their inner loop (mask, magic subtraction, FMA, and the activations' loads, conversions
and pre-scaling; counted in the compiled loop for sm_90), so at M = 1 they were bound by
instruction issue (~25 µs on 14336x4096, where the bytes need ~8 µs). Here each 32-bit word of
codes becomes 16-bit (BASE + c) pairs with two bit operations per pair and is multiplied by two
warp-wide `mma.sync.m16n8k16`, float32 accumulation; the mma's spare rows return XS = the sum of
the activations, and the tile adds s * (D - (BASE + z) * XS) = s * sum (c - z) x per (row, group)
(the PTX: memfit.kernels.mma_ptx). About 2.7 SASS instructions per code, against 5.5-8.

Layout: nothing repacked, no extra bytes: memfit's stored rows read as 32-bit words, or the same
bytes tiled by memfit.kernels.weights.tile (RB rows per block: a warp reads 512 contiguous bytes).
A tile is (BN rows, 16 words) = 128 codes of each row. Triton lays such an int32 tile out in
16-byte vectors with 4 lanes along a row and 8 rows per warp: lane 4g + j holds words 4j..4j+3 of
its row. That is the mma's A-fragment pattern: the 4 lanes of a quad hold one row (mma row g), and
lanes with equal j hold equal columns (the same k labels), so the B fragment is each lane's own
activations: pairs (x_i, x_{i+4}) made by one PRMT from two loaded bf16 pairs (M = 1: loaded in
the asm, one 16-byte vector a word, `mma_ptx.xload`).
`mma_ptx.check_layout` reads the compiled TTGIR once per kernel and refuses any other layout
(MmaLayoutError; the caller dequantizes instead), so a compiler that lays it out otherwise cannot
give wrong sums.
- M = 1 (MT = 1): every B column holds x; lane j carries mma columns 2j, 2j + 1. With groups of
  32/64 codes (NSUB = 4/2 groups per tile), B column n holds only the lanes of group n % NSUB
  (the other lanes load zeros: `_xptr` points them at a 64-byte zero buffer once a tile).
- M <= 8 (MT = 8): B column n is token n (lane g supplies token g, the row's r % 8), loaded
  inside the asm from a pointer (a (rows, 16) activation load would pull the asm into another
  layout); MT = 16, 32: 2, 4 token sets, one mma chain each (lane g supplies token 8h + g of
  set h). The rows of a lane share g, so one asm call takes `reps` of them and loads
  each word's activations of a set once (mma_ptx.shared_asm). Element e of a row's 4 words holds
  set 2q's column 2j + e (e < 2) or set 2q + 1's (e >= 2) in accumulator q (tokens 16q..16q+15).
`_col` says which mma column each element of the tile holds; the rest are masked at the store.
Loop variants: the next tile's words, scales and zero points are loaded before the current one
computes (U = 1; PF = 2: the next two, faster at M = 1 with groups >= 128, RESULTS.md session
12); U = 2/4 adjacent tiles are loaded together (loads in the loop body, pipelined by Triton
through shared memory with num_stages > 1, slower at M = 1: session 10); EPI (M = 1, U = 1):
the scales and zero points loaded by asm in the mma layout and the tile folded into the
accumulator in the asm (no per-tile layout conversion through shared memory; faster with groups
of 64 codes and in the stored layout, slower at g128 tiled: the chooser times both). Split-K and
its one-launch reduction are triton_words'.

Measured (one H200, benchmarks/RESULTS.md, session 10): 14336x4096 g128 M = 1, tiled, 15.4 µs
(1.97x bf16 cuBLAS); the same loop with the asm's arithmetic removed 10.5 µs; a plain read of the
codes alone 8.7 µs. Session 13 (two tiles in flight, two rows per mma): 14.2 µs (2.14x); M = 16
18.8 µs (1.61x). Session 26 (activations loaded in the asm as 16-byte vectors, zero lanes
instead of a select per register, both groups of 64 codes' parameters in one asm call), best
launch shape, one machine: g128 tiled 14.37 -> 13.28 µs, g64 tiled 16.33 -> 15.47. Session 27
(the time follows the instruction count: zero points made floats with one subtraction, M = 1's
last tiles peeled off so the prefetch needs no tile check): g64 tiled 15.7 -> 13.2-13.5 µs,
within 2-5% of g128 (12.9-13.1). Session 28 (FOLD: g128 two tiles ahead folds the tile in the
asm too, 279 -> 263 SASS a tile): 14336x4096 tiled 12.96 -> 12.71 µs, 4096x14336 12.83 -> 12.13.

Takes: 4-bit codes, integer or symmetric zero points, group size 32, 64 (M = 1) or a multiple
of 128, rows of a multiple of 128 codes, 16-bit activations; `mma_ineligibility` says why not.
On the CPU (TRITON_INTERPRET=1) the asm blocks are replaced by the same sums in plain Triton
(`ASM=False`), so tests cover the tiling, the groups, split-K and the store mapping; the GPU
tests check the asm path against the same reference, and tests/kernels/sm90_build.py builds every
asm variant for sm_90 on any machine.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from memfit.kernels import mma_ptx, pdl
from memfit.kernels.mma_ptx import MmaLayoutError  # noqa: F401 (re-exported)
from memfit.kernels.mma_tiles import _col, _epi_params, _fold, _params, _tile
from memfit.kernels.replay import Launch
from memfit.kernels.sizes import cdiv
from memfit.kernels.triton_dequant import _at
from memfit.kernels.triton_words import _finish, split_buffers, zeroed
from memfit.kernels.weights import IntWeight

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# M = 1: launch shapes with the scales loaded and the tile folded in the asm (mma_ptx.epi_asm) are
# candidates (0: never; benchmarks A/B it)
EPI = os.environ.get("MEMFIT_MMA_EPI", "1") != "0"


@triton.jit
def _mma_gemv(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr, zx_ptr, M, N, ITERS,
              STEPS, stride_xm, stride_qn, stride_sn, stride_zn, stride_ps, ids_ptr, t_ptr, X_DIV,
              GROUP: tl.constexpr,
              ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr, F16: tl.constexpr, MT: tl.constexpr,
              NSUB: tl.constexpr, HALVES: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
              U: tl.constexpr, ASM: tl.constexpr, ASM_TEXT: tl.constexpr,
              CONSTRAINTS: tl.constexpr, RB: tl.constexpr = 0, PDL: tl.constexpr = False,
              EPI: tl.constexpr = False, EPI_TEXT: tl.constexpr = "",
              PARAM_TEXT: tl.constexpr = "", PACK: tl.constexpr = 4, PF: tl.constexpr = 1,
              EPI_CONS: tl.constexpr = "", EVEN: tl.constexpr = False,
              FOLD: tl.constexpr = False, ROUTED: tl.constexpr = 0):
    """y[:M, rn] (or split-K partials) for BN rows; program pid_k streams ITERS x U tiles of 16
    words from tile pid_k * ITERS * U on (the last program fewer: STEPS steps of U tiles in
    all, so a split need not divide a row's tiles); each tile adds s * (D - (BASE + z) * XS)
    per (row, mma column) into a (BN, 16) float32 accumulator (D = sum of (BASE + c) * x, XS =
    sum of x).
    U = 1: the next tile's (PF = 2: next two tiles') loads are issued before this one computes;
    U = 2 or 4: U adjacent tiles are loaded together (128-256 contiguous bytes a row), then computed.
    RB > 0: the weight is tiled (memfit.kernels.tiling): a tile's BN x 64 bytes, its scales and
    zero points are contiguous runs (RB rows each), the next tile RB x 16 words further on.
    EPI (M = 1, GPU, U = 1): the scales and zero points are loaded by `mma_ptx.param_asm` and the tile
    folded into the accumulator by `mma_ptx.epi_asm`; the accumulator's slots then hold the columns
    that matter (as the other paths' do after the store's masking). FOLD (M = 1, U = 1, GPU):
    the scales and zero points loaded by Triton, the tile folded in by `mma_ptx.epi_asm`.
    ROUTED (M = 1 a program): r, a mixture of experts' (token, slot) pair, is program_id(0)
    (ROUTED 2: the programs of one weight tile for every pair run together, so pairs of one
    expert share its reads through the L2) or program_id(2) (ROUTED 1); its expert ids[r]'s
    tensors sit at the element offsets of row ids[r] of the (experts, 4) table t (codes in
    words, scales, zero points, bias), its activations are row r // X_DIV of x, its output row
    r of y (memfit.kernels.triton_moe.moe_mma)."""
    pid_n = tl.program_id(1 if ROUTED == 2 else 0)
    pid_k = tl.program_id(2 if ROUTED == 2 else 1)
    if ROUTED:
        r = tl.program_id(0 if ROUTED == 2 else 2)
        t_ptr += tl.load(ids_ptr + r).to(tl.int64) * 4
        q_ptr += tl.multiple_of(tl.load(t_ptr), 4)  # 16-byte aligned rows (Table checks)
        s_ptr += tl.load(t_ptr + 1)
        z_ptr += tl.load(t_ptr + 2)
        b_ptr += tl.load(t_ptr + 3)
        x_ptr += (r // X_DIV).to(tl.int64) * stride_xm
        y_ptr += r.to(tl.int64) * N
        p_ptr += r.to(tl.int64) * N
        c_ptr += r * tl.num_programs(1 if ROUTED == 2 else 0)  # its own arrival counters
    rn = pid_n * BN + tl.arange(0, BN)
    rw = tl.arange(0, 16)
    n_ok = tl.full((BN,), 1, tl.int1) if EVEN else rn < N  # EVEN: BN divides N
    rg = rn % 8  # the row's lane quad g within its warp (8 rows per warp)
    col = _col(rw, HALVES)
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    acc1 = acc  # tokens 16..31 (MT = 32)
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    zx32 = zx_ptr.to(tl.pointer_type(tl.int32))  # 64 bytes of zeros (M = 1, NSUB > 1: _xptr)
    w0 = pid_k * ITERS * U * 16
    its = tl.minimum(ITERS, STEPS - pid_k * ITERS)  # this program's steps (an uneven split)
    QS: tl.constexpr = 16 if RB == 0 else 16 * RB  # words from one tile of a row to the next
    if RB == 0:
        qp = q_ptr + rn[:, None] * stride_qn + (w0 + rw)[None, :]  # (BN, 16) word pointers
    else:
        qp = q_ptr + (((rn // RB) * (stride_qn // 16) + w0 // 16) * QS + (rn % RB) * 16)[:, None] \
            + rw[None, :]
    if EPI:  # M = 1 on the GPU: scales and zero points loaded and the tile folded in asm
        GS: tl.constexpr = RB if RB > 0 else 1
        s_row = _at(rn, 0, stride_sn, RB)
        z_row = _at(rn, 0, stride_zn, RB)
        cg = tl.where(rw % 4 < 2, (2 * (rw // 4) + rw % 4) % NSUB, 0)  # column 2j + e's group
        wd = tl.load(qp, mask=n_ok[:, None], other=0)
        s, nz = _epi_params(s_ptr, z_ptr, s_row, z_row, (w0 * 8) // GROUP, cg, n_ok, GS,
                            ZMODE, PARAM_TEXT, NSUB)
        if PF == 2:  # the tile after it too
            ok1 = n_ok & ((rn * 0 + 1) < its)
            wd1 = tl.load(qp + QS, mask=ok1[:, None], other=0)
            s1, nz1 = _epi_params(s_ptr, z_ptr, s_row, z_row, ((w0 + 16) * 8) // GROUP, cg, ok1,
                                  GS, ZMODE, PARAM_TEXT, NSUB)
        pdl.wait(PDL)
        for it in range(its - PF):  # the tile PF ahead exists: its loads need no tile check
            nwd = tl.load(qp + PF * QS, mask=n_ok[:, None], other=0)
            ns, nnz = _epi_params(s_ptr, z_ptr, s_row, z_row, ((w0 + 16 * PF) * 8) // GROUP, cg,
                                  n_ok, GS, ZMODE, PARAM_TEXT, NSUB)
            acc = _fold(acc, wd, s, nz, x32, zx32, w0 + rw, rg, rw, NSUB, EPI_TEXT, EPI_CONS,
                        PACK)
            if PF == 2:
                wd, s, nz = wd1, s1, nz1
                wd1, s1, nz1 = nwd, ns, nnz
            else:
                wd, s, nz = nwd, ns, nnz
            qp += QS
            w0 += 16
        for it in range(tl.maximum(its - PF, 0), its):  # the last PF tiles: nothing to load
            acc = _fold(acc, wd, s, nz, x32, zx32, w0 + rw, rg, rw, NSUB, EPI_TEXT, EPI_CONS,
                        PACK)
            if PF == 2:
                wd, s, nz = wd1, s1, nz1
            w0 += 16
    elif U == 1:
        wd, s, zc, zw = _params(qp, s_ptr, z_ptr, rn, n_ok, w0, rw, col, stride_sn, stride_zn,
                                GROUP, ZMODE, NSUB, RB)
        if PF == 2:  # the tile after it too
            ok1 = n_ok & ((rn * 0 + 1) < its)
            wd1, s1, zc1, zw1 = _params(qp + QS, s_ptr, z_ptr, rn, ok1, w0 + 16, rw, col,
                                        stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
        pdl.wait(PDL)  # the first tile's weights are in flight; x is the previous kernel's
        # M = 1: the last PF tiles peeled off (below), so the loop's loads need no tile check;
        # M > 1 keeps one loop (M = 16 measured 0-4% slower peeled: RESULTS.md, session 27)
        for it in range(its - PF if MT == 1 else its):
            nxt = n_ok if MT == 1 else n_ok & ((rn * 0 + it + PF) < its)
            nwd, ns, nzc, nzw = _params(qp + PF * QS, s_ptr, z_ptr, rn, nxt, w0 + 16 * PF, rw,
                                        col, stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
            acc, acc1 = _tile(
                acc, acc1, wd, s, zc, zw, w0 + rw, x32, zx32, x_ptr,
                rn, rg, rw, M, stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS, PACK,
                FOLD, EPI_TEXT, EPI_CONS)
            if PF == 2:
                wd, s, zc, zw = wd1, s1, zc1, zw1
                wd1, s1, zc1, zw1 = nwd, ns, nzc, nzw
            else:
                wd, s, zc, zw = nwd, ns, nzc, nzw
            qp += QS
            w0 += 16
        for it in range(tl.maximum(its - PF, 0) if MT == 1 else its, its):  # nothing to load
            acc, acc1 = _tile(
                acc, acc1, wd, s, zc, zw, w0 + rw, x32, zx32, x_ptr,
                rn, rg, rw, M, stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS, PACK,
                FOLD, EPI_TEXT, EPI_CONS)
            if PF == 2:
                wd, s, zc, zw = wd1, s1, zc1, zw1
            w0 += 16
    else:
        pdl.wait(PDL)
        for it in range(its):
            wd0, s0, zc0, zw0 = _params(qp, s_ptr, z_ptr, rn, n_ok, w0, rw, col, stride_sn,
                                        stride_zn, GROUP, ZMODE, NSUB, RB)
            wd1, s1, zc1, zw1 = _params(qp + QS, s_ptr, z_ptr, rn, n_ok, w0 + 16, rw, col,
                                        stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
            if U == 4:
                wd2, s2, zc2, zw2 = _params(qp + 2 * QS, s_ptr, z_ptr, rn, n_ok, w0 + 32, rw, col,
                                            stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
                wd3, s3, zc3, zw3 = _params(qp + 3 * QS, s_ptr, z_ptr, rn, n_ok, w0 + 48, rw, col,
                                            stride_sn, stride_zn, GROUP, ZMODE, NSUB, RB)
            acc, acc1 = _tile(
                acc, acc1, wd0, s0, zc0, zw0, w0 + rw, x32, zx32, x_ptr,
                rn, rg, rw, M, stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS, PACK,
                FOLD, EPI_TEXT, EPI_CONS)
            acc, acc1 = _tile(
                acc, acc1, wd1, s1, zc1, zw1, w0 + 16 + rw, x32, zx32, x_ptr,
                rn, rg, rw, M, stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS, PACK,
                FOLD, EPI_TEXT, EPI_CONS)
            if U == 4:
                acc, acc1 = _tile(
                    acc, acc1, wd2, s2, zc2, zw2, w0 + 32 + rw, x32, zx32, x_ptr,
                    rn, rg, rw, M, stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS,
                    PACK, FOLD, EPI_TEXT, EPI_CONS)
                acc, acc1 = _tile(
                    acc, acc1, wd3, s3, zc3, zw3, w0 + 48 + rw, x32, zx32, x_ptr,
                    rn, rg, rw, M, stride_xm, F16, MT, NSUB, HALVES, ASM, ASM_TEXT, CONSTRAINTS,
                    PACK, FOLD, EPI_TEXT, EPI_CONS)
            qp += QS * U
            w0 += 16 * U
    if MT > 1:
        ok = n_ok[:, None] & (col < M)[None, :]
        off = col[None, :] * N + rn[:, None]
    else:
        off = rn[:, None] + col[None, :] * 0
        ok = n_ok[:, None] & (rw == 0)[None, :]
        if NSUB > 1:  # the NSUB group sums of a row sit in lanes j = 0, 1: add them into slot 0
            acc = tl.where(ok, tl.sum(tl.where((col < NSUB)[None, :], acc, 0.0), axis=1)[:, None],
                           0.0)
    # MT = 32: acc1 holds tokens 16..31, written with acc (one split-K arrival for the two)
    _finish(acc, off, ok, rn[:, None] + col[None, :] * 0, y_ptr, p_ptr, c_ptr, b_ptr, pid_n, pid_k,
            stride_ps, HAS_BIAS, SPLIT_K, acc1, off + 16 * N, n_ok[:, None] & (col + 16 < M)[None, :],
            MT == 32)


def mma_ineligibility(w: IntWeight, m: int, dtype: torch.dtype) -> str | None:
    """Why `_mma_gemv` cannot take `w` with M rows of `dtype` activations (None when it can)."""
    k = w.shape[1]
    if w.bits != 4 or w.zero_point == "float":
        return "the mma decode kernel takes 4-bit codes with integer or symmetric zero points"
    if k % 128:
        return f"rows of {k} codes are not a multiple of 128"
    if w.group_size not in (32, 64) and w.group_size % 128:
        return f"group size {w.group_size} is not 32, 64 or a multiple of 128"
    if dtype not in (torch.bfloat16, torch.float16) or m > 32:
        return "the mma decode kernel takes 16-bit activations and M <= 32"
    if m > 1 and w.group_size < 128:
        return "the mma decode kernel takes groups of 32 or 64 codes at M = 1 only"
    if not w.qdata.is_contiguous() or w.qdata.data_ptr() % 16:
        return "the packed codes are not a contiguous, 16-byte aligned tensor"
    return None


def run_mma(x2: torch.Tensor, w: IntWeight, bias, bn: int, split_k: int, num_warps: int,
            unroll: int = 1, epi: bool = False, reps: int = 1, prefetch: int = 1,
            maxnreg: int = 0, plan: bool = False, route: tuple | None = None):
    """(M, in) -> (M, out) through `_mma_gemv` (see mma_ineligibility for what it takes); epi:
    the asm epilogue where it applies (M = 1, one tile a step, registers prefetch, GPU); reps:
    rows of a lane per asm call (it must divide the lane's rows, BN / (8 * num_warps)): M > 1
    they share their activation loads (mma_ptx.shared_asm), and an even number of rows is
    paired two to an mma (at M = 1 too: mma_ptx.paired_chain); prefetch: tiles in flight (1, 2);
    maxnreg: ptxas's cap on registers a thread (0: its own choice, which at M = 1 sinks the next
    tile's loads below most of the mma chain to stay at 96-103 registers); plan: also return
    a callable x2 -> y that launches the compiled kernel again with everything but the
    activations and outputs fixed (memfit.kernels.replay); route: (ids, table, x_div, ROUTED)
    of memfit.kernels.triton_moe.moe_mma (w: the first expert's weight; y: a row per id)."""
    m, k = x2.shape
    pairs = m if route is None else route[0].numel()
    if route is not None:
        m = 1
    n = w.shape[0]
    mt = 1 if m == 1 else max(8, 1 << (m - 1).bit_length())  # token columns: 1, 8, 16, 32
    if mt == 1 and not mma_ptx.PAIRED:
        reps = 1  # M = 1, unpaired rows (the A/B's): one row a call
    if mt > 16 and unroll > 1:
        raise ValueError("memfit.kernels.triton_mma: M > 16 takes one tile a step (unroll 1)")
    if reps > 1 and (bn // (8 * num_warps)) % reps:
        raise ValueError(f"memfit.kernels.triton_mma: {reps} rows per asm call do not divide a "
                         f"lane's {bn // (8 * num_warps)} rows")
    why = mma_ineligibility(w, m, x2.dtype)
    if why is not None:
        raise ValueError(f"memfit.kernels.triton_mma: {why}")
    if prefetch not in (1, 2):
        raise ValueError(f"memfit.kernels.triton_mma: prefetch {prefetch} is not 1 or 2 tiles")
    f16 = x2.dtype == torch.float16
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # the asm loads 16-byte vectors of activations (M > 1)
        x2 = x2.clone()
    steps = k // 128 // unroll
    iters = cdiv(steps, split_k)  # steps a program; the last one may have fewer
    if steps * unroll != k // 128 or unroll not in (1, 2, 4) or (split_k - 1) * iters >= steps:
        raise ValueError(f"unroll {unroll} (1, 2 or 4) does not divide the {k // 128} 128-code "
                         f"tiles of a row, or split_k {split_k} leaves a program none")
    q = w.qdata.view(torch.int32)
    z = w.zero if w.zero is not None else w.scale
    b = bias if bias is not None else w.scale
    y = torch.empty(pairs, n, dtype=x2.dtype, device=x2.device)
    grid = ((cdiv(n, bn), split_k) if route is None else
            (pairs, cdiv(n, bn), split_k) if route[3] == 2 else (cdiv(n, bn), split_k, pairs))
    tiles = cdiv(n, bn)
    part, cnt = split_buffers(y, split_k, tiles * pairs, q)
    sdt = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}.get(w.scale.dtype)
    epi = epi and not INTERPRET and mt == 1 and unroll == 1 and sdt is not None
    # the stored layout's two adjacent 16-bit scales of a tile in one 32-bit load (EPI, g64)
    wide = (epi and w.group_size == 64 and not w.tile_rows and sdt != "f32" and route is None
            and w.scale.data_ptr() % 4 == 0 and w.scale.stride(0) % 2 == 0)
    args = (x2, q, w.scale, z, b, y, part, cnt, _zeros(x2.device), m, n, iters, steps,
            x2.stride(0), q.stride(0), w.scale.stride(0), z.stride(0), pairs * n,
            *(route[:3] if route else (q, q, 1)))
    kw = dict(**constants(mt, w.group_size, 0 if w.zero_point == "sym" else 1, sdt, f16, bn,
                          split_k, unroll, w.tile_rows, epi, reps, bias is not None,
                          not INTERPRET, prefetch, mt == 1 and n % bn == 0, wide),
              num_warps=num_warps, num_stages=1, ROUTED=route[3] if route else 0, **pdl.launch_kw(),
              **({"maxnreg": maxnreg} if maxnreg and not INTERPRET else {}))
    kernel = _mma_gemv[grid](*args, **kw)
    LAST[0] = kernel
    if not INTERPRET:
        mma_ptx.check_layout(kernel)
    if not plan:
        return y
    launch = Launch(_mma_gemv, kernel, grid, args, kw, ("x_ptr", "y_ptr", "p_ptr", "c_ptr"))
    dev, dt = x2.device, x2.dtype

    def call(x2: torch.Tensor) -> torch.Tensor:  # x2: contiguous, 16-byte aligned (replay.Plans)
        y = torch.empty(m, n, dtype=dt, device=dev)
        launch(x2, y, *split_buffers(y, split_k, tiles, q))
        return y
    return y, call


def constants(mt: int, group: int, zmode: int, sdt: str | None, f16: bool, bn: int, split_k: int,
              unroll: int, rb: int, epi: bool, reps: int, has_bias: bool, asm: bool,
              prefetch: int = 1, even: bool = False, wide: bool = False) -> dict:
    """`_mma_gemv`'s compile-time arguments (see `_constants`), built once per launch shape:
    building the asm strings took 48-148 µs of host time a call (this 2-core CPU), which an
    eager decode pays on every packed linear."""
    return _constants(mt, group, zmode, sdt, f16, bn, split_k, unroll, rb, epi, reps, has_bias,
                      asm, prefetch, mma_ptx.PAIRED, even, wide)


@functools.lru_cache(maxsize=1024)
def _constants(mt: int, group: int, zmode: int, sdt: str | None, f16: bool, bn: int,
               split_k: int, unroll: int, rb: int, epi: bool, reps: int, has_bias: bool,
               asm: bool, prefetch: int, paired: bool, even: bool = False,
               wide: bool = False) -> dict:
    """`_mma_gemv`'s compile-time arguments for a launch (also what tests/kernels/sm90_build.py
    builds ahead of time): mt token columns (1, 8, 16, 32), zmode 0 symmetric / 1 integer
    zero points, sdt the scales' dtype ("f16", "bf16", "f32"), wide: EPI's two scales of a
    tile in one 32-bit load (the caller checked the scales' 4-byte alignment)."""
    halves = 2 if mt >= 16 else 1
    nsub = max(1, 128 // group) if mt == 1 else 1
    pf = prefetch if unroll == 1 else 1
    # M = 1, groups >= 128, two tiles ahead: the tile folded in the asm with Triton's (one row a
    # thread) scales and zero points (14336x4096 tiled 12.96 -> 12.71 µs, 4096x14336 12.83 ->
    # 12.13; one tile ahead read 2-6% slower so: RESULTS.md, session 28)
    fold = mt == 1 and nsub == 1 and pf == 2 and not epi
    return dict(GROUP=group, ZMODE=zmode, HAS_BIAS=has_bias, F16=f16, MT=mt, NSUB=nsub,
                HALVES=halves, BN=bn, SPLIT_K=split_k, U=unroll, ASM=asm,
                ASM_TEXT=(mma_ptx.mma_asm(f16, reps) if mt == 1
                          else mma_ptx.shared_asm(mt // 8, f16, reps)),
                CONSTRAINTS=mma_ptx.constraints(0 if mt == 1 else mt // 8, reps), PACK=4 * reps,
                RB=rb,
                PF=pf, EVEN=even, EPI=epi, FOLD=fold,
                EPI_TEXT=mma_ptx.epi_asm(f16, nsub, reps) if epi or fold else "",
                EPI_CONS=mma_ptx.epi_constraints(reps) if epi or fold else "",
                PARAM_TEXT=(mma_ptx.param_asm(sdt, zmode, f16, 2 if nsub == 2 else 1, rb or 1,
                                              wide and nsub == 2 and not rb and sdt != "f32")
                            if epi else ""))


def _zeros(device) -> torch.Tensor:
    """64 bytes of zeros on `device` (`triton_words.zeroed`), for the lanes that `_xptr`
    points away from their word's activations."""
    return zeroed(_ZEROS, device, 16)


_ZEROS: dict = {}
LAST: list = [None]  # the last launched compiled kernel (benchmarks read n_regs, n_spills)
