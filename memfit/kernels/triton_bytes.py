"""The two byte kernels of memfit.kernels.triton_int (which chooses among them, the word and mma
kernels and dequantize + cuBLAS by timing): they read memfit's stored layout as it is, byte j of
a row holding codes PER*j .. PER*j + PER-1 (PER = 8 // bits), a K tile inside one group.

- `_int_mm` (tensor cores, M >= 9): the packed tile is unpacked in registers into column order
  (tl.join + reshape), dequantized to the activation dtype and fed to one tl.dot per tile, as
  its B operand or (WA) its A operand; it also reads the decode loop's tiled layout (RB).
- `_int_gemv` (decode, M <= 8): no tensor cores; the *activations* are split like the codes
  (sub-column i of a tile is x[:, k0 + PER*j + i]), each code is dequantized and multiply-added
  on the CUDA cores into a float32 accumulator reduced once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memfit.kernels import pdl
from memfit.kernels.fragments import _perm_tile
from memfit.kernels.triton_dequant import (_blocks3, _byte_ptrs, _codes3, _group_params,
                                           _unpack_tile, _word_ptrs)
from memfit.kernels.triton_words import _finish


@triton.jit
def _dot_t(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b^T (IEEE float32 products for float32 operands, else the dtype's own)."""
    if IEEE:
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _magic_asm(qb, MAGIC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(BN, BK // 2) bytes of 4-bit codes -> (BN, BK) 16-bit floats BASE + c (see MAGIC), in
    PTX: each byte is doubled in place (the tensor then has the codes' shape and order), and per
    32-bit register [b, b, b', b'] one LOP3 takes the low nibbles, one SHF + LOP3 the high ones,
    and two PRMT pair them: 5 instructions for 4 codes (GPU only)."""
    qq = tl.reshape(tl.join(qb, qb), (BN, BK))
    return tl.inline_asm_elementwise(
        f"""{{ .reg .b32 a, b;
        lop3.b32 a, $2, 0x000F000F, {MAGIC * 0x10001}, 0xEA;
        shr.u32 b, $2, 12;
        lop3.b32 b, b, 0x000F000F, {MAGIC * 0x10001}, 0xEA;
        prmt.b32 $0, a, b, 0x5410;
        prmt.b32 $1, a, b, 0x7632; }}""",
        "=r,=r,r", [qq], dtype=tl.int16, is_pure=True, pack=4)


@triton.jit
def _tile_groups(s_ptr, z_ptr, rn, k0, ok, stride_sn, stride_zn, GROUP: tl.constexpr,
                 BITS: tl.constexpr, ZMODE: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr,
                 GW: tl.constexpr):
    """Scales and zero points of the tile from column k0: (s, z, s1, z1), s1 and z1 those of
    the next group when the tile spans two (GW > 0), else s and z again."""
    s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, ok, stride_sn, stride_zn, BITS, ZMODE,
                         BN, RB)
    if GW:
        s1, z1 = _group_params(s_ptr, z_ptr, rn, k0 // GROUP + 1, ok, stride_sn, stride_zn,
                               BITS, ZMODE, BN, RB)
    else:
        s1, z1 = s, z
    return s, z, s1, z1


@triton.jit
def _steps(ITERS, tiles, pid_k, SPLIT_K: tl.constexpr, RAGGED: tl.constexpr):
    """Steps of program pid_k, which reads tiles pid_k, pid_k + SPLIT_K, ... of a row's `tiles`:
    ITERS = ceil(tiles / SPLIT_K) each, or (RAGGED: the split does not divide the tiles) one
    fewer for the last programs."""
    if RAGGED:
        return tl.minimum(ITERS, (tiles - pid_k + SPLIT_K - 1) // SPLIT_K)
    return ITERS


@triton.jit
def _tiles(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, m_ok, n_ok, ITERS, pid_k, K, NB, stride_xm,
           stride_qn, stride_sn, stride_zn, GROUP: tl.constexpr, BITS: tl.constexpr,
           ZMODE: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr, BASE: tl.constexpr,
           WA: tl.constexpr, RB: tl.constexpr, PF: tl.constexpr, DQ: tl.constexpr,
           EVEN: tl.constexpr, PAIR: tl.constexpr = 0, RAGGED: tl.constexpr = 0,
           W3: tl.constexpr = 0):
    """The float32 accumulator of ITERS rounds (round `it` reads K tile it * SPLIT_K + pid_k)
    for rows rm and weight rows rn: (BN, BM) if WA else (BM, BN)."""
    if PAIR:
        return _pair_tiles(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, m_ok, n_ok, ITERS, pid_k, K,
                           stride_xm, stride_qn, stride_sn, stride_zn, GROUP, BITS, ZMODE, BM,
                           BN, BK, SPLIT_K, RB, PF, DQ, RAGGED)
    PER: tl.constexpr = 8 // BITS  # (3 bits: unused, `_codes3` reads whole 3-byte blocks)
    BKP: tl.constexpr = BK // PER
    GW: tl.constexpr = (GROUP // 8) * (GROUP < BK)  # DQ >= 2 only: a tile of two groups
    if WA:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    if PF:
        k1 = pid_k * BK
        ok = n_ok & ((rn * 0 + k1) < K)
        s_nx, z_nx, s_nx1, z_nx1 = _tile_groups(s_ptr, z_ptr, rn, k1, ok, stride_sn, stride_zn,
                                                GROUP, BITS, ZMODE, BN, RB, GW)
    for it in range(_steps(ITERS, (K + BK - 1) // BK, pid_k, SPLIT_K, RAGGED)):
        k0 = (it * SPLIT_K + pid_k) * BK
        kk = k0 + tl.arange(0, BK)
        jb = k0 // PER + tl.arange(0, BKP)
        if EVEN:  # (BM, BK); with DQ >= 2 (which needs EVEN) permuted by the caller
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None],
                        other=0.0)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        if DQ >= 2:  # (BN, BK / 8) int32 words
            jw = k0 // 8 + tl.arange(0, BK // 8)
            qw = tl.load(_word_ptrs(q_ptr, rn, jw, k0 // 8, stride_qn, RB))
        elif BITS == 3:  # (BN, BK) int32 codes, already unpacked (stored layout)
            qb = _codes3(q_ptr, rn, k0, n_ok, stride_qn, NB, BN, BK, W3)
        elif EVEN:  # (BN, BKP) uint8
            qb = tl.load(_byte_ptrs(q_ptr, rn, jb, k0 // PER, stride_qn, RB))
        else:
            qb = tl.load(_byte_ptrs(q_ptr, rn, jb, k0 // PER, stride_qn, RB),
                         mask=n_ok[:, None] & (jb[None, :] < NB), other=0)
        if PF:
            s, z, s1, z1 = s_nx, z_nx, s_nx1, z_nx1
            k1 = k0 + SPLIT_K * BK
            s_nx, z_nx, s_nx1, z_nx1 = _tile_groups(s_ptr, z_ptr, rn, k1,
                                                    n_ok & ((rn * 0 + k1) < K), stride_sn,
                                                    stride_zn, GROUP, BITS, ZMODE, BN, RB, GW)
        else:
            s, z, s1, z1 = _tile_groups(s_ptr, z_ptr, rn, k0, n_ok & ((rn * 0 + k0) < K),
                                        stride_sn, stride_zn, GROUP, BITS, ZMODE, BN, RB, GW)
        if DQ >= 2:
            w = _perm_tile(qw, z, s, x.dtype, BN, BK, DQ % 2 == 1, DQ >= 4, z1, s1, GW)
        elif DQ:
            c16 = _magic_asm(qb, MAGIC, BN, BK).to(x.dtype, bitcast=True)
            w = (c16 - (z + BASE).to(x.dtype)[:, None]) * s.to(x.dtype)[:, None]
        elif MAGIC:
            c16 = (_unpack_tile(qb, BITS, BN, BK).to(tl.int16) | MAGIC).to(x.dtype, bitcast=True)
            w = (c16 - (z + BASE).to(x.dtype)[:, None]) * s.to(x.dtype)[:, None]
        else:
            c = _unpack_tile(qb, BITS, BN, BK).to(tl.float32)
            w = ((c - z[:, None]) * s[:, None]).to(x.dtype)  # (BN, BK)
        if WA:
            acc = _dot_t(w, x, acc, IEEE)
        else:
            acc = _dot_t(x, w, acc, IEEE)
    return acc


@triton.jit
def _pair_tiles(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, m_ok, n_ok, ITERS, pid_k, K, stride_xm,
                stride_qn, stride_sn, stride_zn, GROUP: tl.constexpr, BITS: tl.constexpr,
                ZMODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, RB: tl.constexpr, PF: tl.constexpr, DQ: tl.constexpr,
                RAGGED: tl.constexpr = 0):
    """`_tiles` with PAIR (DQ >= 4, WA, EVEN, K a multiple of 2 BK): round `it` reads
    the two adjacent tiles from column (it * SPLIT_K + pid_k) 2 BK, each with its own group's
    scales and zero points, unpacks each into the fragment order and feeds both to one dot of
    K = 2 BK: the loop's own instructions (stage rotation, barriers, wgmma descriptors,
    addresses) serve twice the codes."""
    GW: tl.constexpr = (GROUP // 8) * (GROUP < BK)  # each tile of two groups
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if PF:
        k1 = pid_k * 2 * BK
        sa, za, sa1, za1 = _tile_groups(s_ptr, z_ptr, rn, k1, n_ok, stride_sn, stride_zn,
                                        GROUP, BITS, ZMODE, BN, RB, GW)
        sb, zb, sb1, zb1 = _tile_groups(s_ptr, z_ptr, rn, k1 + BK, n_ok, stride_sn, stride_zn,
                                        GROUP, BITS, ZMODE, BN, RB, GW)
    for it in range(_steps(ITERS, K // (2 * BK), pid_k, SPLIT_K, RAGGED)):
        k0 = (it * SPLIT_K + pid_k) * 2 * BK
        kk = k0 + tl.arange(0, 2 * BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None],
                    other=0.0)  # (BM, 2 BK), each BK columns permuted by the caller
        jw = k0 // 8 + tl.arange(0, BK // 8)
        q0 = tl.load(_word_ptrs(q_ptr, rn, jw, k0 // 8, stride_qn, RB))
        q1 = tl.load(_word_ptrs(q_ptr, rn, jw + BK // 8, (k0 + BK) // 8, stride_qn, RB))
        if PF:
            s0, z0, s01, z01, s1, z1, s11, z11 = sa, za, sa1, za1, sb, zb, sb1, zb1
            k1 = k0 + SPLIT_K * 2 * BK
            ok = n_ok & ((rn * 0 + k1) < K)
            sa, za, sa1, za1 = _tile_groups(s_ptr, z_ptr, rn, k1, ok, stride_sn, stride_zn,
                                            GROUP, BITS, ZMODE, BN, RB, GW)
            sb, zb, sb1, zb1 = _tile_groups(s_ptr, z_ptr, rn, k1 + BK, ok, stride_sn,
                                            stride_zn, GROUP, BITS, ZMODE, BN, RB, GW)
        else:
            s0, z0, s01, z01 = _tile_groups(s_ptr, z_ptr, rn, k0, n_ok, stride_sn, stride_zn,
                                            GROUP, BITS, ZMODE, BN, RB, GW)
            s1, z1, s11, z11 = _tile_groups(s_ptr, z_ptr, rn, k0 + BK, n_ok, stride_sn,
                                            stride_zn, GROUP, BITS, ZMODE, BN, RB, GW)
        w0 = _perm_tile(q0, z0, s0, x.dtype, BN, BK, DQ % 2 == 1, True, z01, s01, GW)
        w1 = _perm_tile(q1, z1, s1, x.dtype, BN, BK, DQ % 2 == 1, True, z11, s11, GW)
        w = tl.reshape(tl.permute(tl.join(w0, w1), (0, 2, 1)), (BN, 2 * BK))
        acc = tl.dot(w, tl.trans(x), acc)
    return acc


@triton.jit
def _out_rows(pid_n, BN: tl.constexpr, DQ: tl.constexpr):
    """The weight rows of the accumulator's rows: DQ >= 4 reordered the tile's rows with its
    codes (row r of acc is row 32 b5 + 16 b4 + 8 b3 + low of the weight for
    r = 32 b4 + 16 b3 + 8 b5 + low), else in order."""
    rr = tl.arange(0, BN)
    if DQ >= 4 and BN == 64:
        return (pid_n * BN + ((rr >> 3) & 1) * 32 + ((rr >> 5) & 1) * 16 + ((rr >> 4) & 1) * 8
                + (rr & 7))
    elif DQ >= 4:  # BN 128: row r is 64 b3 + 32 b6 + 16 b5 + 8 b4 + low of r
        return (pid_n * BN + ((rr >> 3) & 1) * 64 + ((rr >> 6) & 1) * 32 + ((rr >> 5) & 1) * 16
                + ((rr >> 4) & 1) * 8 + (rr & 7))
    else:
        return pid_n * BN + rr


@triton.jit
def _store_tile(acc, rm, rn, m_ok, n_ok, y_ptr, b_ptr, stride_ym, HAS_BIAS: tl.constexpr,
                WA: tl.constexpr):
    """acc (+ bias) to y[rm, rn] (acc (BN, BM) if WA else (BM, BN))."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if WA:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if WA:
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None],
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])
    else:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int_mm(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, NB, ITERS, stride_xm, stride_qn,
            stride_sn, stride_zn, stride_ym, p_ptr, c_ptr, stride_ps, GROUP: tl.constexpr,
            BITS: tl.constexpr,
            ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
            IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            SPLIT_K: tl.constexpr, MAGIC: tl.constexpr = 0, BASE: tl.constexpr = 0,
            WA: tl.constexpr = 0, RB: tl.constexpr = 0, PF: tl.constexpr = 0,
            DQ: tl.constexpr = 0, EVEN: tl.constexpr = 0, FIX: tl.constexpr = 0,
            PAIR: tl.constexpr = 0, PDL: tl.constexpr = False, RAGGED: tl.constexpr = 0,
            W3: tl.constexpr = 0):
    """y[M, N] (+)= x[M, K] @ dequant(q)[N, K]^T on tensor cores: each weight tile is unpacked
    and dequantized in registers to the activation dtype, then one dot per tile.

    RB > 0: the tiled layout of memfit.kernels.weights.tile (4 bits, BK <= 128).
    W3 = 1: 3-bit rows read as 32-bit words (memfit.kernels.triton_dequant.words3).
    WA = 1: the weight tile is the dot's A operand (acc = w @ x^T, (BN, BM), stored transposed).
    On sm_90 Triton 3.6 then loads the packed bytes straight into the wgmma A-operand layout
    (unpacked and dequantized in registers, no shared-memory round trip) and feeds x to the
    wgmma from shared memory as it was copied there; with x as A (WA = 0) the dequantized tile
    is written to shared memory every step (compiled PTX, benchmarks/RESULTS.md session 13).

    FIX = 1 (SPLIT_K > 1): float32 partials in p, the last program of an output tile to arrive
    (counter c) sums them in a fixed order and writes y (memfit.kernels.triton_words._finish):
    deterministic, no zeroed float32 output, no atomics on y, no conversion pass.

    EVEN = 1: BN divides N and BK divides K, so the weight's loads need no masks (their
    predicates were a tenth of the loop's instructions); EVEN = 2: BM divides M too. Program
    pid_k reads K tiles pid_k, pid_k + SPLIT_K, ... (all inside K), so SPLIT_K need not divide
    the row's tiles (RAGGED = 1: the last programs then run one step fewer): Llama-2-7B's 86
    tiles of 128 codes split 4 ways, for one.

    DQ = 2 (4-bit, EVEN, BK a multiple of 32): the codes read as 32-bit words and unpacked straight
    into the dot's A-operand fragments (`_perm_tile`), the activations permuted to match by the
    caller (`perm_x`); DQ = 3 the same in PTX (GPU); DQ = 1 a byte-doubling PTX unpack (probe).
    DQ = 4 / 5 (BK 128, BN 64 at 4 warps or BN 128 at 8; 5 = PTX): the codes ordered over the
    whole 128-code tile and the tile's rows reordered (undone at the store, `_out_rows`) so
    that the layout Triton loads the words in (4 consecutive words a thread, 8 x 4 threads a
    warp) already is the wgmma's A-operand layout up to a renaming of registers: no conversion
    through shared memory (`perm_x(x, 128)`). PAIR = 1: two such tiles a step (`_pair_tiles`).

    PF = 1: each tile's scales and zero points are loaded one tile ahead, in registers (Triton's
    pipeliner streams x and the codes through shared memory but leaves these narrow loads in the
    loop, so every step waited a global-memory latency for them).

    MAGIC != 0 (16-bit activations, codes < 2**7): dequantize in 16-bit lanes without an
    int-to-float conversion: the bits MAGIC | c read as the activation dtype are BASE + c
    (bfloat16 0x4300 = 128, float16 0x6400 = 1024), so (BASE + c) - (BASE + z) = c - z exactly."""
    pdl.wait(PDL)  # launched with memfit.kernels.pdl: its launch overlaps the previous kernel
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    if EVEN:  # constant masks: folded away
        n_ok = tl.full((BN,), 1, tl.int1)
    if EVEN == 2:
        m_ok = tl.full((BM,), 1, tl.int1)
    acc = _tiles(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, m_ok, n_ok, ITERS, pid_k, K, NB,
                 stride_xm, stride_qn, stride_sn, stride_zn, GROUP, BITS, ZMODE, IEEE, BM, BN,
                 BK, SPLIT_K, MAGIC, BASE, WA, RB, PF, DQ, EVEN, PAIR, RAGGED, W3)
    rn = _out_rows(pid_n, BN, DQ)
    if FIX:
        if WA:
            off = rm[None, :] * stride_ym + rn[:, None]
            boff = rn[:, None] + rm[None, :] * 0
            ok = m_ok[None, :] & n_ok[:, None]
        else:
            off = rm[:, None] * stride_ym + rn[None, :]
            boff = rn[None, :] + rm[:, None] * 0
            ok = m_ok[:, None] & n_ok[None, :]
        _finish(acc, off, ok, boff, y_ptr, p_ptr, c_ptr, b_ptr, pid_m * tl.num_programs(1) + pid_n,
                pid_k, stride_ps, HAS_BIAS, SPLIT_K)
    elif ATOMIC:
        if WA:
            tl.atomic_add(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc,
                          mask=m_ok[None, :] & n_ok[:, None])
        else:
            tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc,
                          mask=m_ok[:, None] & n_ok[None, :])
    else:
        _store_tile(acc, rm, rn, m_ok, n_ok, y_ptr, b_ptr, stride_ym, HAS_BIAS, WA)


@triton.jit
def _int_gemv(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, NB, ITERS, stride_xm,
              stride_qn, stride_sn, stride_zn, stride_ym, GROUP: tl.constexpr,
              BITS: tl.constexpr, ZMODE: tl.constexpr, HAS_BIAS: tl.constexpr,
              ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              SPLIT_K: tl.constexpr, W3: tl.constexpr = 0):
    """Few rows (decode): dequantize each weight tile in registers and multiply-add on the CUDA
    cores into a (BM, BN, BK/PER) float32 accumulator, reduced once at the end; no tensor-core
    padding of M to 16 and no per-tile reduction. Weight bytes are read once for all BM rows.
    3 bits: the tile read as 24-bit words of 8 codes (`_blocks3`), split 8 ways like bytes."""
    PER: tl.constexpr = 8 if BITS == 3 else 8 // BITS  # codes a byte (3 bits: a 3-byte block)
    BKP: tl.constexpr = BK // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    jj = tl.arange(0, BKP)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN, BKP), dtype=tl.float32)
    for it in range(0, ITERS):
        k0 = (it * SPLIT_K + pid_k) * BK
        s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, n_ok & ((rn * 0 + k0) < K),
                             stride_sn, stride_zn, BITS, ZMODE, BN)
        if BITS == 3:  # (BN, BKP) 24-bit words, 8 codes each
            qb = _blocks3(q_ptr, rn, k0, n_ok, stride_qn, NB, BK, W3)
        else:
            jb = k0 // PER + jj
            qb = tl.load(q_ptr + rn[:, None] * stride_qn + jb[None, :],
                         mask=n_ok[:, None] & (jb[None, :] < NB), other=0)  # (BN, BKP) uint8
        part = tl.zeros((BM, BN, BKP), dtype=tl.float32)  # sum of codes x activations
        xs = tl.zeros((BM, BKP), dtype=tl.float32)  # sum of activations
        for i in tl.static_range(PER):
            kk = k0 + jj * PER + i
            xi = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                         mask=m_ok[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
            part += xi[:, None, :] * ((qb >> (i * BITS)) & MASK).to(tl.float32)[None, :, :]
            xs += xi
        # sum (c - z) s x = s (sum c x - z sum x): per code a conversion and a multiply-add
        acc += (part - z[None, :, None] * xs[:, None, :]) * s[None, :, None]
    y = tl.sum(acc, axis=2)  # (BM, BN)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, y, mask=ok)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok)
