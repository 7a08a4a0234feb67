"""The launch shapes memfit.kernels.triton_int's chooser times for a (M, weight) pair: one
`Config` per shape, the candidate lists of each kernel family in the order the chooser tries
them (the first is the default where nothing is timed: the CPU interpreter, MEMFIT_TRITON_CHOICE
=first), and the checks of which shapes a weight layout can take."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from memfit.kernels.sizes import cdiv
from memfit.kernels.triton_dequant import block_k
from memfit.kernels.triton_mma import EPI, mma_ineligibility
from memfit.kernels.triton_prefill import tma_ineligibility
from memfit.kernels.triton_widen import widen_ineligibility
from memfit.kernels.triton_words import slice_words, word_ineligibility
from memfit.kernels.weights import IntWeight

MMA = os.environ.get("MEMFIT_TRITON_MMA", "1") != "0"  # 0: leave the mma decode kernel out (A/B)
UNEVEN = os.environ.get("MEMFIT_MMA_UNEVEN", "1") != "0"  # 0: even K splits only (A/B; the
# mma decode kernel's and the weight-as-A tile kernel's)


@dataclass(frozen=True)
class Config:
    """One launch shape; BM = 0 means dequantize once, then cuBLAS; gemv picks `_int_gemv`."""

    BM: int
    BN: int
    BK: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3  # mma: 1 or 2 tiles in flight (the register prefetch's depth)
    gemv: bool = False
    magic: bool = False  # 16-bit magic-number dequantization (see _int_mm)
    words: str = ""      # "fma" / "dot": memfit.kernels.triton_words (BK = k columns per tile);
    #                      "mma": memfit.kernels.triton_mma (BN rows, BK = 128 x unroll)
    shift: bool = True   # words: shift each field down (else mask in place, pre-scale x)
    epi: bool = False    # mma, M = 1: the asm epilogue (memfit.kernels.mma_ptx.epi_asm)
    reps: int = 1        # mma, M > 1: a lane's rows per asm call (memfit.kernels.mma_ptx.shared_asm)
    wa: bool = False     # `_int_mm`: the weight tile as the dot's A operand (see its WA)
    pf: int = 0          # `_int_mm`: 1 = scales and zero points a tile ahead (see its PF);
    #                      BM = 0 < BN: row blocks dequantized ahead on a second stream
    dq: int = 0          # `_int_mm`: PTX unpack: 1 bytes, 2 / 4 words into the A fragments (DQ)
    regs: int = 0        # `_int_mm`, mma: cap on registers a thread (ptxas maxnreg; 0 = its choice)
    pair: bool = False   # `_int_mm`, dq 4: two BK tiles (two groups) into one dot a step (PAIR)
    widen: bool = False  # 3 bits: widened to 4-bit codes first (memfit.kernels.triton_widen),
    #                      then this 4-bit launch shape
    tma: int = 0         # prefill: memfit.kernels.triton_prefill's kernel (loads through
    #                      tensor descriptors), 1 one program a tile, 2 one an SM (persistent)
    nfast: bool = False  # tma: a token tile's weight tiles consecutive (else the reverse)


def mma_candidates(m: int, w: IntWeight) -> list[Config]:
    """Launch shapes of the mma decode kernel (M <= 32): BN rows x SPLIT_K programs along K (a
    divisor of the row's 128-code tiles) for 1 to ~16 waves of 132 programs."""
    n, k = w.shape
    tiles = k // 128
    out = []
    for bn, warps, ch in ((128, 4, 1), (64, 4, 1), (256, 8, 1), (256, 4, 1), (64, 4, 4),
                          (128, 4, 2), (64, 4, 2)):
        if tiles % ch:
            continue
        for sk in mma_splits(tiles // ch):
            progs = -(-n // bn) * sk
            if 100 <= progs <= 2400 or (sk == 1 and progs < 100):
                out.append(Config(16, bn, 128 * ch, sk, warps, 1, words="mma"))
    if m == 1:  # two tiles in flight (num_stages 2: the register prefetch two tiles deep),
        # the wider shapes; first with groups >= 128 codes (14336x4096 g128 on an H200: 14.6
        # against 15.4 µs; slower with groups of 64 and at M = 16: benchmarks/RESULTS.md)
        two = [replace(c, num_stages=2) for c in out if c.BK == 128 and c.BN >= 128]
        out = out + two if w.group_size < 128 else two + out
    # the asm epilogue: one tile a step; first with groups < 128 codes (measured faster there);
    # not for the tiled layout with groups >= 128, where it lost every timing (sessions 10, 12)
    if m == 1 and EPI and (w.group_size < 128 or not w.tile_rows):
        epi = [replace(c, epi=True) for c in out if c.BK == 128 and c.num_stages == 1]
        out = epi + out if w.group_size < 128 else out + epi
    def shared(c):  # up to 4 of a lane's rows (BN / (8 warps)) per asm call
        return replace(c, reps=min(4, c.BN // (8 * c.num_warps)))
    if m == 1:  # two rows per mma (memfit.kernels.mma_ptx.mma_asm / epi_asm)
        out = [shared(c) for c in out]
    elif m > 16:  # 17..32 tokens: one tile a step, rows sharing their activation loads
        out = [shared(c) for c in out if c.BK == 128]
    elif m > 1:  # rows sharing their activation loads first (measured 1.4-2x faster at M = 4
        # and 16 than one row per asm call, benchmarks/RESULTS.md, session 11)
        out = [shared(c) for c in out if shared(c).reps >= 2] + out
    return out


def mma_splits(steps: int) -> list[int]:
    """Programs along K for a row of `steps` steps: the divisors up to 32, and where none lies
    in 8..32 (few programs in flight on a narrow layer: 148 tiles of Qwen2.5-7B's down_proj
    offered only 1, 2 and 4) also uneven splits of 4-12 steps a program, the last program
    taking the rest. At M = 1 on an H200, tiled layout: 3584x18944 37.5 -> 15.8 µs, Llama-2-7B's
    4096x11008 41.5 -> 12.1 µs (benchmarks/RESULTS.md, session 24)."""
    even = [s for s in range(1, min(steps, 32) + 1) if steps % s == 0]
    if any(8 <= s for s in even) or not UNEVEN:
        return even
    uneven = {-(-steps // it) for it in (4, 6, 8, 10, 12)}
    return even + sorted(s for s in uneven if 1 < s <= 32 and s not in even
                         and (s - 1) * -(-steps // s) < steps)


def small_m_tiles(m: int, w: IntWeight) -> bool:
    """Whether the tile kernel with the weight as A (16-token tiles) is a candidate for 4-bit
    codes at M <= 16: at 2..16 tokens with groups under 128 codes (memfit's default int4 is
    groups of 64), which the mma decode kernel takes at M = 1 only (the byte and word kernels
    left ran 1.7-3.2x slower than groups of 128 at M = 16 on an H200; now 1.5-2.4x faster),
    and at 9..16 tokens for every group size (14336x4096 g128 at M = 16: 18.9 µs against the mma
    kernel's 23.0; benchmarks/RESULTS.md, session 24), and at 2..8 tokens on narrow layers
    (fewer 64-row blocks than 132), where its K split 6 ways beat the mma kernel's best on an
    H100 (4096x14336 g128 at M = 8: 19.7 µs against 22.3, M = 4 19.6 against 20.6; 3584x18944
    M = 8 23.9 against 25.4; RESULTS.md, session 45)."""
    if w.bits != 4:  # measured for 4-bit codes only
        return False
    return (1 < m <= 16 and (w.n_groups > 1 and w.group_size < 128 or narrow(w.shape[0]))
            or 8 < m <= 16)


def narrow(rows: int) -> bool:
    """Fewer 64-row blocks than an H100 / H200 has SMs (132): the tile kernel splits K."""
    return rows < 64 * 132


def weight_a_candidates(m: int, w: IntWeight, dtype: torch.dtype = torch.bfloat16
                        ) -> list[Config]:
    """The tile kernel with the weight tile as the dot's A operand, 16 < M <= 128 (and where
    `small_m_tiles` says, at M <= 16 in 16-token tiles): the scales a tile ahead (PF), the codes
    unpacked in PTX: words straight into the wgmma A fragments in the order the words are
    loaded in (dq 4: 64 rows / 4 warps or 128 rows / 8 warps, the activations permuted to
    match; up to M = 64 also two tiles a step), else bytes doubled (dq 1); K split 2 or 4 ways
    (float32 partials summed by the last arrival) where the rows give few programs, also where
    the split does not divide the row's tiles (4096x11008 g64 at M = 16: 33.9 -> 18.4 µs on an
    H200, RESULTS.md session 25). Groups of 64 codes take dq 4 too (a 128-code tile across two
    groups). 14336x4096 on an H200 (benchmarks/RESULTS.md, session 19,
    benchmarks/kernel_speed.py): g128 M = 32 22.3 µs, M = 64 25.8, M = 128 34.0 against 37.9 /
    42.8 / 51.4 for the plain form kept last (session 18); g64 M = 32 23.9, M = 64 28.3
    (44.9-46.2 before, dq 1 at BK 64). M = 256 and above ran slower than dequantize + cuBLAS
    (session 13): not offered."""
    bm = max(16 if m <= 16 else 32, _bucket(m))
    bk = block_k(w)
    n, k = w.shape
    out = []
    # groups of 64 codes: dq 4 takes a 128-code tile across two groups (each word its own)
    wide = Config(bm, 128, 128 if w.group_size == 64 and w.n_groups > 1 else bk, 1, 8, 4,
                  magic=True, wa=True, pf=1, dq=4)
    tk = wide.BK
    for cfg in (wide, replace(wide, num_stages=3),
                replace(wide, BN=64, num_warps=4), replace(wide, BN=64, num_warps=4, num_stages=3)):
        if perm_ineligibility(w, dtype, cfg, n % cfg.BN == 0 and k % tk == 0) is None:
            out.append(cfg)
    if out and bm <= 64 and k % (2 * tk) == 0:  # two tiles a step, 3 stages (won at M = 32
        # and 64, lost at 128: RESULTS.md session 18)
        out = [replace(c, num_stages=3, pair=True) for c in out if c.num_stages == 4] + out
    if out and narrow(n):  # fewer 64-row blocks than an H100 / H200 has SMs: split K (a
        # split need not divide the row's tiles: 4096x11008, 86 tiles, had split 2 only); in
        # 16- and 32-token tiles also 6 and 8 ways (on an H100, split 6 against 4: 4096x14336 M
        # = 16 20.1 against 21.4 µs, 3584x18944 M = 32 30.8 against 34.9; at M = 64 they lost
        # on all four narrow shapes timed: benchmarks/RESULTS.md, session 45)
        split = [replace(c, SPLIT_K=sk) for c in out
                 for sk in ((2, 4, 6, 8) if bm <= 32 else (2, 4))
                 if (c.BN, c.num_stages, c.pair) == (64, 4, False) and k // tk >= sk
                 and (UNEVEN or k % (sk * tk) == 0)]
        out += split + [replace(c, num_stages=3, pair=True) for c in split
                        if bm <= 64 and k % (2 * tk) == 0 and k // (2 * tk) >= c.SPLIT_K
                        and (UNEVEN or k % (2 * c.SPLIT_K * tk) == 0)]
    out += [Config(bm, 64, bk, 1, 4, st, magic=True, wa=True, pf=1, dq=1) for st in (4, 3)]
    return out + [Config(bm, 64, bk, 1, 4, 3, magic=True, wa=True)]


# The dq 4 tile kernel for prefill (128 < M <= 1024) only with MEMFIT_PREFILL_TILE=1: faster per
# call on an H200 (M = 256 on 14336x4096: 53.6 µs against dequantize + cuBLAS's 87.7), but an
# eager prefill of an 8B-shaped model is bound by the host, and its two launches a call (the
# activations' gather, the kernel) cost more there than they save (37.7-38.0 ms against
# 34.9-37.6 at 256-512 tokens, equal at 1024; benchmarks/RESULTS.md session 20). Past 1024 tokens dequantize
# + cuBLAS wins on the GPU too (M = 2048: 346 µs against 368).
WA_MAX_M = 1024 if os.environ.get("MEMFIT_PREFILL_TILE") == "1" else 128


# The descriptor tile kernel (memfit.kernels.triton_prefill) past 1024 tokens by default: there
# a call's GPU time (192-345 µs for a Llama-3-8B MLP linear at 1000-2048 tokens on an H100,
# benchmarks/RESULTS.md session 39) dwarfs the host work of its two launches (the activations'
# gather, the kernel: as many as dequantize + cuBLAS's); from 129 with MEMFIT_PREFILL_TILE=1.
# The decode loop's 64-row tiled layout (a 4-d descriptor) also only with MEMFIT_PREFILL_TILE=1:
# right on an H100 (tests/kernels/test_triton_prefill.py) but slower there than the stored
# layout at 2048 tokens (14336x4096: 389-404 µs against 344-354, session 40).
TMA_MIN_M = 129 if os.environ.get("MEMFIT_PREFILL_TILE") == "1" else 1025
TMA_TILED = os.environ.get("MEMFIT_PREFILL_TILE") == "1"


def tma_candidates(m: int, w: IntWeight, dtype: torch.dtype) -> list[Config]:
    """The descriptor tile kernel's shapes for M >= TMA_MIN_M: 256 tokens by 128 weight rows on
    8 warps, 3 stages, persistent (tma 2) or a program a tile (1), a weight tile's token tiles
    consecutive or (`nfast`) a token tile's weight tiles. Each won somewhere on an H100
    (benchmarks/RESULTS.md, session 40, µs): 14336x4096 M = 2048 persistent 343.8 (a program a
    tile 351.0, nfast 349.3); 4096x14336 M = 1000 nfast 186.9 against 190.5-191.4; the
    chooser's own timing of 14336x4096 picked a program a tile. 128-token tiles (persistent,
    3-4 stages: 422-671 µs; two programs an SM at 2 stages: 694-904) and the scales a tile
    ahead (wrong outputs) are not offered."""
    if m < TMA_MIN_M or (w.tile_rows and not TMA_TILED):
        return []
    return [Config(256, 128, 128, 1, 8, 3, magic=True, wa=True, dq=4, tma=tma, nfast=nf)
            for tma, nf in ((2, False), (1, False), (2, True), (1, True))
            if tma_ineligibility(w, dtype, 128) is None]


def prefill_candidates(m: int, w: IntWeight, dtype: torch.dtype) -> list[Config]:
    """The dq 4 tile kernel for 128 < M <= 1024 (offered up to WA_MAX_M): tiles of 128-256
    tokens (the wgmma's N) by 64 or 128 weight rows, K split where the tiles give fewer programs
    than an H200 has SMs. 14336x4096 on an H200 (RESULTS.md, session 20): M = 256 53.1 µs, M = 512 104.1,
    against dequantize + cuBLAS's 87.9 / 130.0 (bf16 44.5 / 86.0)."""
    n, k = w.shape
    out = []
    for bm, bn, warps, st in ((256, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                              (256, 64, 4, 3)):
        cfg = Config(bm, bn, 128, 1, warps, st, magic=True, wa=True, pf=1, dq=4)
        if perm_ineligibility(w, dtype, cfg, n % bn == 0 and k % 128 == 0) is None:
            out.append(cfg)
    progs = {c: cdiv(m, c.BM) * (n // c.BN) for c in out}
    return out + [replace(c, SPLIT_K=sk) for c in out for sk in (2, 4) if progs[c] < 132
                  and (c.BM, c.BN) in ((256, 128), (128, 64)) and k // 128 >= sk]


def triton_bug(c: Config, w: IntWeight, dtype: torch.dtype) -> str | None:
    """Why Triton 3.6 builds launch shape `c` wrong for 16-bit activations on sm_90 (None when
    it does not), each found on an H100 (benchmarks/RESULTS.md, session 44;
    benchmarks/k16_dot.py is the smallest kernel that shows the first):
    - a tl.dot on mma.sync (fewer than 64 rows in A) over K tiles of 16 whose B operand is
      codes split out of bytes (tl.join + tl.reshape: 2 and 4 bits; 3-bit blocks) gives wrong
      sums (relative error 0.8-1.5), float16 and bfloat16 alike: the byte tile kernel with
      BK 16 at 16 or 32 tokens a tile. 8-bit codes (one a byte), 16-bit weights as loaded,
      K tiles of 32 and wgmma's 64-row tiles are right.
    - the word dot kernel with fewer than 8 words of a group in a slice (2-bit groups of 32 or
      48, 4-bit groups of 16 to 48, 8-bit groups of 16 or 48) fails in Triton's
      OptimizeDotOperands pass; 8 or more (4-bit groups of 64 or 128) build and are right."""
    if dtype not in (torch.bfloat16, torch.float16) or not c.BM:
        return None
    if (not (c.gemv or c.words or c.wa or c.widen) and c.BK == 16 and c.BM < 64
            and w.bits < 8):
        return "mma.sync over K tiles of 16 of codes split out of bytes: wrong sums"
    if c.words == "dot" and slice_words(w) < 8:
        return "the word dot kernel with under 8 words of a group in a slice: does not compile"
    return None


def candidates(m: int, w: IntWeight, dtype: torch.dtype = torch.float32) -> list[Config]:
    """Launch shapes worth timing for M rows; the first is the default (interpreter, ties).
    Shapes this Triton builds wrong (`triton_bug`) are left out."""
    out = [c for c in _candidates(m, w, dtype) if triton_bug(c, w, dtype) is None]
    return out or [Config(0, 0, 0)]


def _candidates(m: int, w: IntWeight, dtype: torch.dtype) -> list[Config]:
    if w.bits == 3:  # 8 codes to 3 bytes: the kernels read whole blocks (`_blocks3`);
        out = [Config(0, 0, 0)]  # dequantize + cuBLAS first, then the byte GEMV (M <= 8) and
        bk = block_k(w)  # the tile kernel (M <= 128), which unpack the blocks in registers,
        # then the codes widened to 4 bits for the call and the 4-bit tensor-core kernels
        if m <= 8:  # few rows a program read the codes fastest (H100, bits3_loads.py: 16 rows
            bm = _bucket(m)  # 50 µs, 64 rows 80 at 14336x4096)
            out += [Config(bm, bn, b, sk, 4, 2, gemv=True) for b in sorted({min(bk, 64), bk})
                    for bn in ((8, 16, 32, 64) if bm <= 2 else (8, 16, 32))
                    for sk in (4, 8, 16, 1)]
        if m <= 128 and bk >= 16:  # (BK 16 at 16-32 tokens: `triton_bug`)
            bm = 16 if m <= 16 else (32 if m <= 32 else 64)
            out += [Config(bm, bn, bk, sk, 4, 3, magic=True) for bn in (16, 32, 64, 128)
                    for sk in ((1, 2, 4, 8) if m <= 32 else (1, 2))]
        return out + widen_candidates(m, w, dtype)
    if w.tile_rows:  # the decode loop's tiled layout: the mma kernel, the tile kernel with the
        # weight as A (prefill), else dequantize + cuBLAS
        tiles = block_k(w) >= 16
        if m > 128:  # dequantize + cuBLAS first (the interpreter's pick: fast on a CPU)
            return [Config(0, 0, 0)] + (prefill_candidates(m, w, dtype)
                                        if m <= WA_MAX_M and tiles else []) + tma_candidates(
                                            m, w, dtype)
        ok = m <= 32 and mma_ineligibility(w, m, dtype) is None
        wa = weight_a_candidates(m, w, dtype) if (16 < m or small_m_tiles(m, w)) and tiles else []
        return (mma_candidates(m, w) if ok else []) + wa + [Config(0, 0, 0)]
    bk_max = block_k(w)
    bks = [b for b in (bk_max, bk_max // 2) if b >= 16]  # tl.dot needs >= 16 along K
    out = []
    if m <= 16 and MMA and mma_ineligibility(w, m, dtype) is None:
        out += mma_candidates(m, w)
    if small_m_tiles(m, w) and bks[0] >= 16:
        out += weight_a_candidates(m, w, dtype)
    if m <= 16 and word_ineligibility(w) is None:  # shapes that led a sweep (gemv_sweep.py)
        if m == 1:
            for bn in (64, 128):
                for bk in (128, 256):
                    for sk in (4, 8, 16):
                        out.append(Config(16, bn, bk, sk, 4, 2, words="fma", shift=False))
            out.append(Config(16, 128, 128, 8, 8, 2, words="fma", shift=False))
        for sk in (4, 8):
            for st in (2, 3):
                out.append(Config(16, 128, 128, sk, 4, st, words="dot", shift=False))
        out.append(Config(16, 64, bks[0], 4, 4, 4, magic=True))  # the byte tile kernel
        out.append(Config(16, 128, bks[0], 4, 4, 4, magic=True))
        return out
    if m <= 8:
        bm = _bucket(m)
        bk = block_k(w)
        for bn in ((32, 64) if bm <= 2 else (16, 32)):
            for sk in (4, 8, 16, 32, 1):
                out.append(Config(bm, bn, bk, sk, 4, 2, gemv=True))
    if m <= 16:
        for bn in (64, 128):
            for sk in (1, 4, 8, 16):
                out.append(Config(16, bn, bks[0], sk, 4, 4))
                if w.bits <= 4:
                    out.append(Config(16, bn, bks[0], sk, 4, 4, magic=True))
    elif m <= 128:
        if m <= 32 and MMA and mma_ineligibility(w, m, dtype) is None:
            out += mma_candidates(m, w)
        out += weight_a_candidates(m, w, dtype)
        for bm in (32, 64):
            for bn in (64, 128):
                for sk in (1, 2, 4):
                    out.append(Config(bm, bn, bks[0], sk, 4, 3))
                    if w.bits <= 4:
                        out.append(Config(bm, bn, bks[0], sk, 4, 3, magic=True))
        if w.bits <= 4:  # narrower tiles: 2x the programs of BN 64 (224 on 14336 rows is 1.7
            for sk in (1, 2):  # waves of 132); not yet timed on a GPU
                out.append(Config(32 if m <= 32 else 64, 32, bks[0], sk, 4, 3, magic=True))
        out.append(Config(0, 0, 0))  # dequantize + cuBLAS
    else:
        if dtype not in (torch.bfloat16, torch.float16):  # the plain tile kernel past M = 128
            # lost to dequantize + cuBLAS in every 16-bit timing (int4 and int8, M = 256-2048,
            # 1.1-2.4x slower: benchmarks/RESULTS.md, session 20): float32 only
            for bm, bn, warps in ((128, 128, 8), (64, 128, 4), (128, 256, 8)):
                for st in (3, 4):
                    out.append(Config(bm, bn, bks[0], 1, warps, st))
        out.append(Config(0, 0, 0))  # dequantize + cuBLAS
        if m <= WA_MAX_M and block_k(w) >= 16:
            out += prefill_candidates(m, w, dtype)
        out += tma_candidates(m, w, dtype)
    return out


# Dequantize + cuBLAS a few thousand rows at a time (`Config(0, rows, 0)`, with `pf` blocks ahead
# on a second stream: triton_dequant.dequant_blocks) is not offered: the chooser times candidates
# in CUDA graphs, where a block form's extra launches, events and stream switches cost nothing,
# but a prefill runs eagerly (memfit captures only decode steps) and pays them. On an H100,
# 14336x4096 int4 g128 (benchmarks/eager_forms.py, RESULTS.md session 48), µs a call eager / in
# a graph:
# whole dequantize 112 / 109 at 256 tokens, 226 / 225 at 1024, 410 / 409 at 2048; 4096-row
# blocks through one buffer 399 / 122, 250 / 217, 420 / 382; the same two ahead 758 / 126,
# 392 / 205, 402 / 379. The forms stay runnable by their Config (benchmarks, tests).


def widen_candidates(m: int, w: IntWeight, dtype: torch.dtype) -> list[Config]:
    """3-bit codes widened to 4-bit ones on each call (memfit.kernels.triton_widen), then the
    4-bit tensor-core kernels: the mma decode kernel (M <= 32) and the tile kernel with the
    weight as A (where it takes 4-bit codes: 16 < M <= 128, `small_m_tiles`)."""
    if widen_ineligibility(w) or dtype not in (torch.bfloat16, torch.float16) or m > 128:
        return []
    # the widened weight's layout (fresh buffers: contiguous, aligned; no bytes needed here)
    w4 = w._replace(qdata=torch.empty(0, dtype=torch.uint8), bits=4)
    out = mma_candidates(m, w4) if MMA and mma_ineligibility(w4, m, dtype) is None else []
    if (16 < m or small_m_tiles(m, w4)) and block_k(w4) >= 16:
        out += weight_a_candidates(m, w4, dtype)
    return [replace(c, widen=True) for c in out]


def perm_ineligibility(w: IntWeight, dtype: torch.dtype, cfg: Config, even: int = 1
                       ) -> str | None:
    """Why the tile kernel cannot unpack `w` into the dot's fragments (`Config.dq` 2 or 4)."""
    if w.bits != 4 or w.zero_point == "float":
        return "the fragment unpack takes 4-bit codes with integer or no zero points"
    if dtype not in (torch.bfloat16, torch.float16):
        return "the fragment unpack takes 16-bit activations"
    if not even or cfg.BK % 32:
        return "the fragment unpack needs tiles that divide the weight and BK a multiple of 32"
    if w.n_groups > 1 and w.group_size < cfg.BK and cfg.BK != 2 * w.group_size:
        return "the fragment unpack takes a tile inside one group or across two whole groups"
    if cfg.dq == 4 and (cfg.BN, cfg.BK) not in ((64, 128), (128, 128)):
        return "the 128-code fragment order takes BN 64 or 128 and BK 128"
    if cfg.pair and (cfg.dq != 4 or not cfg.wa or w.shape[1] % (2 * cfg.BK)
                     or w.shape[1] // (2 * cfg.BK) < cfg.SPLIT_K):
        return "two tiles a step take dq 4, the weight as A and K a multiple of 2 BK, split"
    return None


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())
