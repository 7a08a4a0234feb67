"""What one tile of the tensor-core decode kernel (memfit.kernels.triton_mma) reads, in the
layout its asm fragments assume, and what the asm computes from it in plain Triton (the CPU
interpreter's path, `ASM = False`): the words, scales and zero points of a tile (`_params`, or
`_epi_params` loaded by the asm epilogue's own PTX), the activation pointers of the B operand at
M = 1 (`_xptr`), the mma column each word slot holds (`_col`), `_tile_ref`, and a tile's step of
the kernel's loop through the asm or `_tile_ref` (`_tile`, `_fold`)."""

from __future__ import annotations

import triton
import triton.language as tl

from memfit.kernels.triton_dequant import _at


@triton.jit
def _tile_ref(wd, zi, x_ptr, wi, rn, M, stride_xm, MT: tl.constexpr, NSUB: tl.constexpr,
              HALVES: tl.constexpr, T0: tl.constexpr = 0):
    """What the asm computes, in plain Triton: (BN, 16) float32, element (r, w) = mma column
    `_col(w)` of row r: sum over the tile's codes of (c - z) * x (token T0 + column, or the
    column's group)."""
    out = tl.zeros(wd.shape, tl.float32)
    col = _col(tl.arange(0, 16), HALVES)  # (16,)
    lane = tl.arange(0, 16) // 4  # j of each word
    NT: tl.constexpr = 8 * HALVES if MT > 1 else NSUB
    for t in tl.static_range(NT):
        e = tl.zeros(wd.shape, tl.float32)
        for i in tl.static_range(8):
            c = ((wd >> (4 * i)) & 15).to(tl.float32) - zi
            if MT > 1:
                xv = tl.load(x_ptr + (T0 + t) * stride_xm + wi * 8 + i, mask=(wi * 0 + T0 + t) < M,
                             other=0.0)
            else:  # group t of the tile: only its lanes
                xv = tl.load(x_ptr + wi * 8 + i)
                xv = tl.where((lane * NSUB) // 4 == t, xv, 0.0)
            e += c * xv.to(tl.float32)[None, :]
        tot = tl.sum(e, axis=1)  # (BN,)
        hit = (col == t) if MT > 1 else ((col % NSUB) == t)
        out = tl.where(hit[None, :], tot[:, None], out)
    return out


@triton.jit
def _col(w, HALVES: tl.constexpr):
    """mma column held by word slot w of a 16-word tile (lane j = w // 4, slot e = w % 4):
    2j + e for e < 2, 8 + 2j + e - 2 for e >= 2 with two halves, else 99 (nothing)."""
    j = w // 4
    e = w % 4
    if HALVES == 2:
        return tl.where(e < 2, 2 * j + e, 8 + 2 * j + e - 2)
    else:
        return tl.where(e < 2, 2 * j + e, 99)


@triton.jit
def _zero(z_ptr, rn, g, ok, stride_zn, ZMODE: tl.constexpr, RB: tl.constexpr):
    """Integer zero points of rows rn and groups g (broadcast together); symmetric: 8."""
    if ZMODE == 0:
        return rn * 0 + g * 0 + 8
    else:
        zb = tl.load(z_ptr + _at(rn, g // 2, stride_zn, RB), mask=ok, other=0).to(tl.int32)
        return (zb >> ((g % 2) * 4)) & 15


@triton.jit
def _params(qp, s_ptr, z_ptr, rn, ok, w0, rw, col, stride_sn, stride_zn, GROUP: tl.constexpr,
            ZMODE: tl.constexpr, NSUB: tl.constexpr, RB: tl.constexpr):
    """One tile's words (BN, 16), scales and zero points (float32) per mma column (zc) and per
    word (zw, the plain path's); w0 is the tile's first word."""
    wd = tl.load(qp, mask=ok[:, None], other=0)
    g0 = (w0 * 8) // GROUP
    if NSUB == 1:
        s = tl.load(s_ptr + _at(rn, g0, stride_sn, RB), mask=ok, other=0.0).to(tl.float32)[:, None]
        zc = _zero(z_ptr, rn, g0, ok, stride_zn, ZMODE, RB).to(tl.float32)[:, None]
        zw = zc
    else:  # column n is group g0 + n % NSUB; word w is group g0 + w // (GROUP / 8)
        # one (BN,) load per group, spread over its columns (a (BN, 16) gather was 4 loads a
        # thread for each of scale and zero point)
        cg = col % NSUB
        wg = rw * 8 // GROUP
        s = tl.zeros(wd.shape, tl.float32)
        zc = s
        zw = s
        for t in tl.static_range(NSUB):
            st = tl.load(s_ptr + _at(rn, g0 + t, stride_sn, RB), mask=ok, other=0.0)
            zt = _zero(z_ptr, rn, g0 + t, ok, stride_zn, ZMODE, RB).to(tl.float32)
            hit = ((cg == t) & (col < NSUB))[None, :]
            s = tl.where(hit, st.to(tl.float32)[:, None], s)
            zc = tl.where(hit, zt[:, None], zc)
            zw = tl.where((wg == t)[None, :], zt[:, None], zw)
    return wd, s, zc, zw


@triton.jit
def _xptr(x32, zx32, wi, rg, rw, NSUB: tl.constexpr):
    """M = 1: each element's pointer to its word's activations (16 bytes of x at x32 + 4 wi),
    which the asm loads (memfit.kernels.mma_ptx.xload reads the lane's first word's); with NSUB
    groups a tile, B column n keeps only the lanes of group n % NSUB: the others point at zeros
    (zx32), one choice a tile, not a select per register."""
    p = (x32 + wi * 4)[None, :] + rg[:, None] * 0
    if NSUB > 1:
        keep = (rg[:, None] % NSUB) == ((rw // 4) * NSUB // 4)[None, :]
        p = tl.where(keep, p, zx32 + rw[None, :] * 0)
    return p


@triton.jit
def _epi_params(s_ptr, z_ptr, s_row, z_row, g0, cg, ok, GS: tl.constexpr, ZMODE: tl.constexpr,
                PARAM_TEXT: tl.constexpr, NSUB: tl.constexpr = 1):
    """(BN, 16) float32 scales and -(BASE + z) of each element's group g0 + cg (EPI), loaded
    in the asm (see memfit.kernels.mma_ptx.param_asm). NSUB = 2: one call a row (every element
    of a row passes the same operands, so the compiler keeps one) loads both groups of the tile
    and each element takes its own (a compile-time choice: element e holds group e); otherwise
    one call a (row, group). s_row / z_row: each row's offset of group 0."""
    g = g0 + cg[None, :] * (NSUB != 2)
    sp = s_ptr + s_row[:, None] + g * GS
    if ZMODE == 0:
        zp = sp  # not read
    else:  # the asm reads a byte there; one pointer type for all operands (Triton 3.6 checks)
        zp = (z_ptr + z_row[:, None] + (g // 2) * GS).to(s_ptr.dtype)
    flag = ok[:, None].to(tl.int32) + g * 0
    args = [sp, zp, (g % 2) * 4, flag]
    if NSUB == 2:
        s0, s1, n0, n1 = tl.inline_asm_elementwise(PARAM_TEXT, "=r,=r,=r,=r,l,l,r,r", args,
                                                   dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        s = tl.where(cg[None, :] == 1, s1, s0)
        nz = tl.where(cg[None, :] == 1, n1, n0)
    else:
        s, nz = tl.inline_asm_elementwise(PARAM_TEXT, "=r,=r,l,l,r,r", args,
                                          dtype=(tl.float32,) * 2, is_pure=True, pack=1)
    return s, nz


@triton.jit
def _tile(acc, acc1, wd, s, zc, zw, wi, x32, zx32, x_ptr, rn, rg, rw, M, stride_xm,
          F16: tl.constexpr, MT: tl.constexpr, NSUB: tl.constexpr, HALVES: tl.constexpr,
          ASM: tl.constexpr, ASM_TEXT: tl.constexpr, CONSTRAINTS: tl.constexpr,
          PACK: tl.constexpr, FOLD: tl.constexpr, EPI_TEXT: tl.constexpr,
          EPI_CONS: tl.constexpr):
    """The accumulators + one tile's s * (D - (BASE + z) * XS) (plain path: s * sum (c - z) x);
    acc holds tokens 0..15 (M = 1: the row), acc1 tokens 16..31 (MT = 32). FOLD (M = 1): the
    scales and zero points loaded here (one row a thread) and the sum folded into acc in the asm
    (`mma_ptx.epi_asm`)."""
    BASE: tl.constexpr = 1024.0 if F16 else 128.0
    if ASM:
        if FOLD:
            acc = _fold(acc, wd, tl.broadcast_to(s, wd.shape),
                        tl.broadcast_to(-(zc + BASE), wd.shape), x32, zx32, wi, rg, rw, NSUB,
                        EPI_TEXT, EPI_CONS, PACK)
        elif MT == 1:
            px = _xptr(x32, zx32, wi, rg, rw, NSUB)
            d, xs = tl.inline_asm_elementwise(ASM_TEXT, CONSTRAINTS, [wd, px],
                                              dtype=(tl.float32, tl.float32), is_pure=True,
                                              pack=PACK)
            acc += s * (d - (zc + BASE) * xs)
        else:  # lane g supplies token 8h + g of each set h, loaded in the asm (mma_ptx.shared_asm)
            # element e: token set e's pointer (tokens past M read M - 1's, masked at the store)
            tok = tl.minimum(8 * (rw % 4)[None, :] + rg[:, None], M - 1)
            px = x32 + tok * (stride_xm // 2) + ((wi - rw % 4) * 4)[None, :]
            args = [wd, px]
            nz = zc + BASE
            if MT <= 16:
                d, xs = tl.inline_asm_elementwise(ASM_TEXT, CONSTRAINTS, args,
                                                  dtype=(tl.float32,) * 2, is_pure=True, pack=PACK)
                acc += s * (d - nz * xs)
            else:
                d, xs, d1, xs1 = tl.inline_asm_elementwise(
                    ASM_TEXT, CONSTRAINTS, args, dtype=(tl.float32,) * 4,
                    is_pure=True, pack=PACK)
                acc += s * (d - nz * xs)
                acc1 += s * (d1 - nz * xs1)
    else:
        acc += s * _tile_ref(wd, zw, x_ptr, wi, rn, M, stride_xm, MT, NSUB, HALVES)
        if MT == 32:
            acc1 += s * _tile_ref(wd, zw, x_ptr, wi, rn, M, stride_xm, MT, NSUB, HALVES, 16)
    return acc, acc1


@triton.jit
def _fold(acc, wd, s, nz, x32, zx32, wi, rg, rw, NSUB: tl.constexpr, EPI_TEXT: tl.constexpr,
          EPI_CONS: tl.constexpr, PACK: tl.constexpr):
    """M = 1 (EPI, FOLD): the tile of words wd (word indices wi) folded into acc by the asm
    (mma_ptx.epi_asm) with its scales s and nz = -(BASE + z), (BN, 16) each."""
    return tl.inline_asm_elementwise(EPI_TEXT, EPI_CONS,
                                     [wd, _xptr(x32, zx32, wi, rg, rw, NSUB), acc, s, nz],
                                     dtype=tl.float32, is_pure=True, pack=PACK)
