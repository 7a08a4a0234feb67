"""Triton fused dequantize-matmul for group-wise integer weights (`IntWeight`), 8/4/2 bits.

It reads memfit's stored layout as it is (no repacking, no extra memory): each row of `qdata` is a
little-endian bit stream along `in`, so byte j of a row holds codes PER*j .. PER*j + PER-1
(PER = 8 // bits). A K tile never crosses a group (BLOCK_K divides the group size, or the row is
one group), so a tile needs one scale and zero per row; zero points are read from their packed
bits in the kernel; symmetric weights use z = 2**(bits-1).

M <= 32 with 16-bit activations and 4-bit codes goes first to the tensor-core kernel of
memfit.kernels.triton_mma (MEMFIT_TRITON_MMA=0 leaves it out); at M <= 16 then the word-wise kernels of
memfit.kernels.triton_words (the same stored bytes read as 32-bit words, no int-to-float
conversion) where the layout fills whole words; the byte kernels below remain candidates there
and take everything else. Every candidate is checked against dequantize + cuBLAS before timing.

Two byte kernels (memfit.kernels.triton_bytes): `_int_mm` (tensor cores, M >= 9; for
16 < M <= 128 also with the weight tile as the dot's A operand, `Config.wa`, and on the tiled
layout) and `_int_gemv` (decode, M <= 8, CUDA cores).

Small M (decode) splits K over programs (SPLIT_K, fp32 atomics into a zeroed buffer) so that a
4096-wide layer still fills 132 multiprocessors; large M uses big tiles without a split, or
dequantizes once into a 16-bit weight and calls cuBLAS when that measures faster (`choose`).
The choice is made per (M bucket, shape, format) by timing the candidates once on the device and
cached for the process: each candidate runs in a CUDA graph over copies of the weight that
together overflow the L2, as in a decode step (timing single calls after an L2 flush, as
`triton.testing.do_bench` does, picked the word kernel for every Llama-3-8B layer shape at M = 1
in the decode loop, with or without the mma kernel; benchmarks/RESULTS.md, issue 10 session 6); under TRITON_INTERPRET=1 (CPU tests) the
first candidate is used (also with MEMFIT_TRITON_CHOICE=first, e.g. for quick GPU test runs).

Numerics: products are accumulated in float32 (tl.dot); float32 activations use IEEE float32
dots (no TF32), 16-bit activations stay 16-bit into the dot, as every GPU int4 kernel does.
"""

from __future__ import annotations

import os
import statistics
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import PTXASError

from memfit.kernels import choices, pdl
from memfit.kernels.fragments import perm_x, perm_x_reference  # noqa: F401 (tests)
from memfit.kernels.gpu_timing import graph_us, weight_copies
from memfit.kernels.triton_bytes import _int_gemv, _int_mm
from memfit.kernels.triton_dequant import block_k, dequantize_triton, zmode
from memfit.kernels.triton_mma import EPI, MmaLayoutError, mma_ineligibility, run_mma
from memfit.kernels.triton_words import _counters, run_words, word_ineligibility
from memfit.kernels.weights import IntWeight, row_slice

BITS = (2, 4, 8)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MMA = os.environ.get("MEMFIT_TRITON_MMA", "1") != "0"  # 0: leave the mma decode kernel out (A/B)


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
    pf: int = 0          # `_int_mm`: 1 = scales and zero points a tile ahead (see its PF)
    dq: int = 0          # `_int_mm`: PTX unpack: 1 bytes, 2 / 4 words into the A fragments (DQ)
    regs: int = 0        # `_int_mm`: cap on registers a thread (ptxas maxnreg; 0 = its choice)
    pair: bool = False   # `_int_mm`, dq 4: two BK tiles (two groups) into one dot a step (PAIR)


def ineligibility(w: IntWeight) -> str | None:
    """Why the Triton path cannot take `w` (None when it can)."""
    if w.bits not in BITS:
        return f"{w.bits}-bit codes cross byte boundaries; the Triton kernel takes {BITS} bits"
    if w.n_groups > 1 and block_k(w) < 16:
        return f"group size {w.group_size} is too small for a tile (needs a multiple of 16)"
    return None


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
        for sk in (s for s in range(1, min(tiles // ch, 32) + 1) if tiles // ch % s == 0):
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


def weight_a_candidates(m: int, w: IntWeight, dtype: torch.dtype = torch.bfloat16
                        ) -> list[Config]:
    """The tile kernel with the weight tile as the dot's A operand, 16 < M <= 128: the scales a
    tile ahead (PF), the codes unpacked in PTX: words straight into the wgmma A fragments in
    the order the words are loaded in (dq 4: 64 rows / 4 warps or 128 rows / 8 warps, the
    activations permuted to match; up to M = 64 also two tiles a step), else bytes doubled
    (dq 1); K split (float32 partials summed by the last arrival) where the rows give few
    programs. Groups of 64 codes take dq 4 too (a 128-code tile across two groups). 14336x4096
    on an H200 (benchmarks/RESULTS.md, session 19, benchmarks/kernels.py): g128 M = 32 22.3 µs,
    M = 64 25.8, M = 128 34.0 against 37.9 / 42.8 / 51.4 for the plain form kept last (session
    18); g64 M = 32 23.9, M = 64 28.3 (44.9-46.2 before, dq 1 at BK 64). M = 256 and above ran
    slower than dequantize + cuBLAS (session 13): not offered."""
    bm = max(32, _bucket(m))
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
    if out and n < 64 * 132:  # fewer 64-row blocks than an H100 / H200 has SMs: split K
        split = [replace(c, SPLIT_K=sk) for c in out for sk in (2, 4)
                 if (c.BN, c.num_stages, c.pair) == (64, 4, False) and k % (sk * tk) == 0]
        out += split + [replace(c, num_stages=3, pair=True) for c in split
                        if bm <= 64 and k % (2 * c.SPLIT_K * tk) == 0]
    out += [Config(bm, 64, bk, 1, 4, st, magic=True, wa=True, pf=1, dq=1) for st in (4, 3)]
    return out + [Config(bm, 64, bk, 1, 4, 3, magic=True, wa=True)]


def candidates(m: int, w: IntWeight, dtype: torch.dtype = torch.float32) -> list[Config]:
    """Launch shapes worth timing for M rows; the first is the default (interpreter, ties)."""
    if w.tile_rows:  # the decode loop's tiled layout: the mma kernel, the tile kernel with the
        # weight as A (prefill), else dequantize + cuBLAS
        ok = m <= 32 and mma_ineligibility(w, m, dtype) is None
        wa = weight_a_candidates(m, w, dtype) if 16 < m <= 128 and block_k(w) >= 16 else []
        return (mma_candidates(m, w) if ok else []) + wa + [Config(0, 0, 0)]
    bk_max = block_k(w)
    bks = [b for b in (bk_max, bk_max // 2) if b >= 16]  # tl.dot needs >= 16 along K
    out = []
    if m <= 16 and MMA and mma_ineligibility(w, m, dtype) is None:
        out += mma_candidates(m, w)
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
        for bm, bn, warps in ((128, 128, 8), (64, 128, 4), (128, 256, 8)):
            for st in (3, 4):
                out.append(Config(bm, bn, bks[0], 1, warps, st))
        out.append(Config(0, 0, 0))  # dequantize + cuBLAS
        if w.shape[0] > 4096:  # the same, 4096 rows at a time through a buffer the L2 holds
            out.append(Config(0, 4096, 0))
    return out


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
    if cfg.pair and (cfg.dq != 4 or not cfg.wa or w.shape[1] % (2 * cfg.BK * cfg.SPLIT_K)):
        return "two tiles a step take dq 4, the weight as A and K a multiple of 2 BK x split"
    return None


def _magic(cfg: Config, w: IntWeight, dtype: torch.dtype) -> dict:
    """MAGIC/BASE for a magic-number candidate (16-bit activations, 2- or 4-bit codes)."""
    if not cfg.magic or w.bits > 4 or dtype not in (torch.bfloat16, torch.float16):
        return {}
    if w.zero_point == "float":  # BASE + z would be rounded to the 16-bit grid (error ~1e-2)
        return {}
    if INTERPRET and dtype == torch.bfloat16:
        return {}  # the interpreter holds bfloat16 in float32: a bitcast would read garbage
    return ({"MAGIC": 0x4300, "BASE": 128} if dtype == torch.bfloat16
            else {"MAGIC": 0x6400, "BASE": 1024})


_CHOICE: dict = {}


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def choose(x2: torch.Tensor, w: IntWeight, bias) -> Config:
    """The fastest candidate for this (M bucket, shape, format), timed once on the device."""
    key = (_bucket(x2.shape[0]), w.shape, w.bits, w.group_size, w.zero_point, x2.dtype,
           w.tile_rows)
    if key not in _CHOICE:
        cands = candidates(x2.shape[0], w, x2.dtype)
        first = os.environ.get("MEMFIT_TRITON_CHOICE") == "first"
        if x2.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return cands[0]  # no timing inside a capture (nor a cached untimed choice)
        if INTERPRET or x2.device.type != "cuda" or first:
            _CHOICE[key] = cands[0]
        else:
            want = run(x2, w, bias, Config(0, 0, 0)).float()  # dequantize + cuBLAS
            hit = stored_choice(x2, w, bias, key, cands, want)
            _CHOICE[key] = hit if hit is not None else _timed_choice(x2, w, bias, key, cands,
                                                                      want)
    return _CHOICE[key]


def _agrees(x2, w, bias, c: Config, want: torch.Tensor) -> bool:
    """Whether launch shape `c` computes what dequantize + cuBLAS does (and launches at all)."""
    tol = 1e-4 if x2.dtype == torch.float32 else 2e-2
    try:
        got = run(x2, w, bias, c).float()
    except (triton.runtime.errors.OutOfResources, MmaLayoutError):
        return False  # too many registers/shared memory for this shape: not a candidate
    except (CompilationError, PTXASError) as e:  # this Triton or GPU cannot build it: the
        # others still can
        _warn_once(f"launch shape {c} does not compile with Triton {triton.__version__} "
                   f"({str(e).splitlines()[0][:120]}); left out")
        return False
    ok = bool((got - want).norm() <= tol * want.norm())
    if not ok:
        _warn_once(f"launch shape {c} disagrees with dequantize + cuBLAS on this device; left out")
    return ok


def stored_choice(x2, w, bias, key, cands, want) -> Config | None:
    """The on-disk choice (memfit.kernels.choices) if it is a candidate and agrees, else None."""
    fields = choices.load(x2.device, key)
    try:
        c = Config(**fields) if fields else None
    except TypeError:  # written by another version of Config
        return None
    return c if c in cands and _agrees(x2, w, bias, c, want) else None


def _timed_choice(x2, w, bias, key, cands, want) -> Config:
    """Time every candidate that agrees with `want`; keep the fastest (also on disk)."""
    ws = weight_copies(w)
    times = []
    for i, c in enumerate(cands):
        if _agrees(x2, w, bias, c, want):  # a shape that computes something else never runs
            times.append((_graph_us([lambda c=c, v=v: run(x2, v, bias, c) for v in ws]), i))
    del ws
    times.sort()
    TIMES[key] = [(round(t, 2), cands[i]) for t, i in times]
    best = cands[times[0][1]]
    choices.store(x2.device, key, asdict(best))
    return best


TIMES: dict = {}  # (M bucket, shape, ...) -> [(µs per call, Config)], fastest first (benchmarks)


def _graph_us(fns, rounds: int = 2) -> float:
    """µs per call of `fns` called in turn, the median of 5 replays of a graph of `rounds`
    rounds: a launch shape whose time varies between replays loses to one that holds it (on
    an H200 with PDL launches, BN 128 / 8-warp / 4-stage tile shapes measured up to 26% above
    their best replay in benchmarks/kernels.py's median; the best of 3 had picked them)."""
    return graph_us(fns, rounds * len(fns), 5, statistics.median)


def run(x2: torch.Tensor, w: IntWeight, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """(M, in) -> (M, out) in x2's dtype with launch shape `cfg`."""
    m, k = x2.shape
    n = w.shape[0]
    if cfg.BM == 0:
        if 0 < cfg.BN < n:
            return _dequant_blocks(x2, w, bias, cfg.BN)
        wd = dequantize_triton(w, x2.dtype)
        return torch.nn.functional.linear(x2, wd, None if bias is None else bias.to(x2.dtype))
    if cfg.words == "mma":
        try:
            return run_mma(x2, w, bias, cfg.BN, cfg.SPLIT_K, cfg.num_warps, cfg.BK // 128,
                           epi=cfg.epi, reps=cfg.reps, prefetch=cfg.num_stages)
        except MmaLayoutError as e:
            _warn_once(f"{e}; dequantizing instead")
            return run(x2, w, bias, Config(0, 0, 0))
    if w.tile_rows and (cfg.words or cfg.gemv or cfg.BK > 128 or w.bits != 4):
        raise ValueError("memfit.kernels.triton_int: a tiled weight runs on the mma kernel, the "
                         "tile kernel (BK <= 128) or dequantize + cuBLAS only")
    if cfg.words:
        return run_words(x2, w, bias, cfg, cfg.words == "dot", zmode(w))
    x2 = x2.contiguous()
    fix = cfg.SPLIT_K > 1 and cfg.wa and not cfg.gemv  # partials + the last arrival's sum
    atomic = cfg.SPLIT_K > 1 and not fix
    y = (torch.zeros(m, n, dtype=torch.float32, device=x2.device) if atomic
         else torch.empty(m, n, dtype=x2.dtype, device=x2.device))
    z = w.zero if w.zero is not None else w.scale
    b = bias if bias is not None else w.scale
    iters = triton.cdiv(triton.cdiv(k, cfg.BK * (1 + cfg.pair)), cfg.SPLIT_K)
    if cfg.gemv:
        _int_gemv[(triton.cdiv(n, cfg.BN), cfg.SPLIT_K)](
            x2, w.qdata, w.scale, z, b, y, m, n, k, w.qdata.shape[1], iters, x2.stride(0),
            w.qdata.stride(0), w.scale.stride(0), z.stride(0), y.stride(0), GROUP=w.group_size,
            BITS=w.bits, ZMODE=zmode(w), HAS_BIAS=bias is not None, ATOMIC=atomic, BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return y.to(x2.dtype) if atomic else y
    grid = (triton.cdiv(m, cfg.BM), triton.cdiv(n, cfg.BN), cfg.SPLIT_K)
    even = (n % cfg.BN == 0 and k % (cfg.BK * cfg.SPLIT_K) == 0) * (1 + (m % cfg.BM == 0))
    dq = 0
    if cfg.dq == 1 and w.bits == 4 and not INTERPRET and _magic(cfg, w, x2.dtype):
        dq = 1
    elif cfg.dq in (2, 4) or cfg.pair:
        why = perm_ineligibility(w, x2.dtype, cfg, even)
        if why:
            raise ValueError(f"memfit.kernels.triton_int: {why}")
        dq = cfg.dq + (not INTERPRET)
        x2 = perm_x(x2, 128 if cfg.dq == 4 else 32)
    part = (torch.empty(cfg.SPLIT_K, m, n, dtype=torch.float32, device=x2.device) if fix
            else y)
    cnt = _counters(x2.device, grid[0] * grid[1]) if fix else w.scale
    _int_mm[grid](x2, w.qdata, w.scale, z, b, y, m, n, k, w.qdata.shape[1],
                  iters, x2.stride(0),
                  w.qdata.stride(0), w.scale.stride(0), z.stride(0), y.stride(0), part, cnt, m * n,
                  GROUP=w.group_size, BITS=w.bits, ZMODE=zmode(w), HAS_BIAS=bias is not None,
                  ATOMIC=atomic, IEEE=x2.dtype == torch.float32, BM=cfg.BM, BN=cfg.BN,
                  **_magic(cfg, w, x2.dtype), WA=int(cfg.wa), RB=w.tile_rows, PF=int(cfg.pf),
                  DQ=dq, EVEN=even, FIX=int(fix), PAIR=int(cfg.pair),
                  BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, **pdl.launch_kw(),
                  **({"maxnreg": cfg.regs} if cfg.regs and not INTERPRET else {}))
    if atomic:
        if bias is not None:
            y += bias.float()
        y = y.to(x2.dtype)
    return y


def _dequant_blocks(x2: torch.Tensor, w: IntWeight, bias, rows: int) -> torch.Tensor:
    """Dequantize + cuBLAS `rows` output rows at a time through one reused 16-bit buffer, small
    enough to stay in the L2 between its write and the GEMM's read (the whole dense weight
    goes to the HBM and back)."""
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    buf = torch.empty(rows, k, dtype=x2.dtype, device=x2.device)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        wd = dequantize_triton(row_slice(w, a, b), x2.dtype, buf[: b - a])
        torch.mm(x2, wd.t(), out=y[:, a:b])  # a column block of y: cuBLAS writes it in place
    if bias is not None:
        y += bias.to(x2.dtype)
    return y


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"memfit: {msg}", stacklevel=3)


def triton_linear(x: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None):
    """(..., in) -> (..., out), or None when the layout cannot take this kernel (warned once)."""
    why = ineligibility(w)
    if why is not None:
        if why not in _WARNED:
            _WARNED.add(why)
            warnings.warn(f"memfit: {why}; using the reference kernel for such layers",
                          stacklevel=3)
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, w.shape[0])
    y = run(x2, w, bias, choose(x2, w, bias))
    return y.reshape(*lead, w.shape[0])
