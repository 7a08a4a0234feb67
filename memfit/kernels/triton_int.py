"""Triton fused dequantize-matmul for group-wise integer weights (`IntWeight`), 8/4/3/2 bits;
3 bits (8 codes to 3 bytes) through the byte kernels below and the dequantize kernel, which
read each tile's 3-byte blocks as 24-bit words, or widened to 4-bit codes for the call
(memfit.kernels.triton_widen, `Config.widen`) and then the 4-bit kernels (memfit's decode loop
widens 3-bit codes once, for the whole loop: memfit.fastdecode.Tiling).

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
16 < M <= 128, to 1024 with MEMFIT_PREFILL_TILE=1, also with the weight tile as the dot's A
operand, `Config.wa`, and on the tiled layout) and `_int_gemv` (decode, M <= 8, CUDA cores).

Small M (decode) splits K over programs (SPLIT_K, fp32 atomics into a zeroed buffer) so that a
4096-wide layer still fills 132 multiprocessors; large M uses big tiles without a split, or
dequantizes once into a 16-bit weight and calls cuBLAS when that measures faster (`choose`).
The candidates are memfit.kernels.launch_shapes's lists. The choice is made per (M bucket,
shape, format) by timing the candidates once on the device and
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import PTXASError

from memfit.errors import UserError
from memfit.kernels import choices, pdl, replay
from memfit.kernels.fragments import perm_x, perm_x_reference  # noqa: F401 (tests)
from memfit.kernels.gpu_timing import graph_us_each, weight_copies
from memfit.kernels.launch_shapes import (  # noqa: F401 (re-exported)
    MMA,
    Config,
    _bucket,
    candidates,
    mma_candidates,
    perm_ineligibility,
    prefill_candidates,
    tma_candidates,
    weight_a_candidates,
)
from memfit.kernels.replay import Launch
from memfit.kernels.sizes import cdiv
from memfit.kernels.triton_bytes import _int_gemv, _int_mm
from memfit.kernels.triton_dequant import block_k, dequant_blocks, dequantize_triton, words3, zmode
from memfit.kernels.triton_mma import MmaLayoutError, run_mma
from memfit.kernels.triton_prefill import run_tma
from memfit.kernels.triton_widen import widen_triton
from memfit.kernels.triton_words import run_words, split_buffers, word_ineligibility  # noqa: F401
from memfit.kernels.weights import IntWeight

BITS = (2, 3, 4, 8)  # 3 bits: the byte kernels and dequantize + cuBLAS (launch_shapes)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def ineligibility(w: IntWeight) -> str | None:
    """Why the Triton path cannot take `w` (None when it can)."""
    if w.bits not in BITS:
        return f"{w.bits}-bit codes cross byte boundaries; the Triton kernel takes {BITS} bits"
    if w.n_groups > 1 and block_k(w) < 16:
        return f"group size {w.group_size} is too small for a tile (needs a multiple of 16)"
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


def choice_key(x2: torch.Tensor, w: IntWeight) -> tuple:
    """What a choice holds for: (M bucket, shape, bits, group, zero point, dtype, tile rows)."""
    return (_bucket(x2.shape[0]), w.shape, w.bits, w.group_size, w.zero_point, x2.dtype,
            w.tile_rows)


def choose(x2: torch.Tensor, w: IntWeight, bias) -> Config:
    """The fastest candidate for this (M bucket, shape, format), timed once on the device."""
    key = choice_key(x2, w)
    if key not in _CHOICE:
        cands = candidates(x2.shape[0], w, x2.dtype)
        first = os.environ.get("MEMFIT_TRITON_CHOICE") == "first"
        if x2.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return cands[0]  # no timing inside a capture (nor a cached untimed choice)
        if INTERPRET or x2.device.type != "cuda" or first:
            _CHOICE[key] = cands[0]
        else:
            _CHOICE[key] = _search(x2, w, bias, key, cands, choices.arch(x2.device))
    return _CHOICE[key]


def _search(x2, w, bias, key, cands, arch: str) -> Config:
    """The kept choice if it still agrees, else the fastest of the shipped shortlist for `arch`
    that agrees, else the fastest of every candidate (timed on the device)."""
    want = run(x2, w, bias, Config(0, 0, 0)).float()  # dequantize + cuBLAS
    hit = stored_choice(x2, w, bias, key, cands, want)
    if hit is None:
        short = choices.shortlisted(arch, key, cands)
        hit = _timed_choice(x2, w, bias, key, short, want) if short else None
    return hit or _timed_choice(x2, w, bias, key, cands, want)


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
    except RuntimeError as e:  # built, but this device or driver refuses the launch (say, a
        # tensor descriptor it cannot take): dequantize + cuBLAS and the others still run
        if c == Config(0, 0, 0):
            raise
        _warn_once(f"launch shape {c} failed on this device ({type(e).__name__}: "
                   f"{(str(e).splitlines() or [''])[0][:120]}); left out")
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


def compile_threads() -> int:
    """Threads that check (and so compile) the candidates of a shape at once:
    MEMFIT_COMPILE_THREADS, else the CPU cores this process may use, at most 16."""
    n = os.environ.get("MEMFIT_COMPILE_THREADS", "")
    if n:
        if not n.isdigit():
            raise UserError(f"MEMFIT_COMPILE_THREADS={n!r}: use a whole number (1 = no threads)")
        return max(1, int(n))
    if hasattr(os, "sched_getaffinity"):
        return min(16, len(os.sched_getaffinity(0)))
    return min(16, os.cpu_count() or 1)


def checked(x2, w, bias, cands, want) -> list[bool]:
    """`_agrees` for each candidate, in order. On a GPU the first use of a shape is mostly
    Triton compiling its 50-110 launch shapes, which runs largely outside the GIL, so the checks
    run on `compile_threads()` threads (an 8B-shaped int4 model's first generate on a 16-CPU
    H200 machine: 244 s on one thread, 65 s on 16; benchmarks/RESULTS.md, session 23); each
    launches on the caller's device and stream, so the GPU still runs them one after another."""
    workers = min(len(cands), compile_threads())
    if workers <= 1 or INTERPRET:  # the interpreter patches triton.language: not threadsafe
        return [_agrees(x2, w, bias, c, want) for c in cands]
    stream = torch.cuda.current_stream(x2.device) if x2.device.type == "cuda" else None

    def one(c: Config) -> bool:
        if stream is None:
            return _agrees(x2, w, bias, c, want)
        with torch.cuda.device(x2.device), torch.cuda.stream(stream):
            return _agrees(x2, w, bias, c, want)

    with ThreadPoolExecutor(workers, thread_name_prefix="memfit-compile") as pool:
        return list(pool.map(one, cands))


def _timed_choice(x2, w, bias, key, cands, want) -> Config | None:
    """Time every candidate that agrees with `want`; keep the fastest (also on disk). None when
    none agrees (a shortlist; the full list has dequantize + cuBLAS, which always does)."""
    ok = checked(x2, w, bias, cands, want)  # a shape that computes something else never runs
    if not any(ok):
        return None
    ws = weight_copies(w)
    live = [i for i in range(len(cands)) if ok[i]]
    us = _graph_us_each([[lambda c=cands[i], v=v: run(x2, v, bias, c) for v in ws] for i in live])
    del ws
    times = sorted(zip(us, live))
    TIMES[key] = [(round(t, 2), cands[i]) for t, i in times]
    best = cands[times[0][1]]
    choices.store(x2.device, key, asdict(best))
    return best


TIMES: dict = {}  # (M bucket, shape, ...) -> [(µs per call, Config)], fastest first (benchmarks)


def _graph_us_each(fn_lists, rounds: int = 2) -> list[float]:
    """µs per call of each list of calls (a launch shape over the weight's copies), the median
    of 6 replays of a graph of `rounds` rounds: a launch shape whose time varies between replays
    loses to one that holds it (on an H200 with PDL launches, BN 128 / 8-warp / 4-stage tile
    shapes measured up to 26% above their best replay in benchmarks/kernel_speed.py's median;
    the best of 3 had picked them). The candidates' graphs are replayed in turns
    (`gpu_timing.graph_us_each`), so clocks that sink during a compute-bound search slow them
    alike (timed one after another, dequantize + cuBLAS, timed first, had the coolest device)."""
    return graph_us_each(fn_lists, lambda fns: rounds * len(fns), 6, statistics.median)


def run(x2: torch.Tensor, w: IntWeight, bias: torch.Tensor | None, cfg: Config,
        plan: bool = False):
    """(M, in) -> (M, out) in x2's dtype with launch shape `cfg`; plan (the tile kernel only):
    (y, a callable doing the same for activations like x2 with its launches fixed)."""
    if cfg.widen:  # 3 bits: as 4-bit codes in this call's buffers, then the 4-bit shape
        return run(x2, widen_triton(w), bias, replace(cfg, widen=False), plan)
    m, k = x2.shape
    n = w.shape[0]
    if cfg.BM == 0:
        if 0 < cfg.BN < n:
            return dequant_blocks(x2, w, bias, cfg.BN, cfg.pf)
        wd = dequantize_triton(w, x2.dtype)
        return torch.nn.functional.linear(x2, wd, None if bias is None else bias.to(x2.dtype))
    if cfg.words == "mma":
        try:
            return run_mma(x2, w, bias, cfg.BN, cfg.SPLIT_K, cfg.num_warps, cfg.BK // 128,
                           epi=cfg.epi, reps=cfg.reps, prefetch=cfg.num_stages,
                           maxnreg=cfg.regs)
        except MmaLayoutError as e:
            _warn_once(f"{e}; dequantizing instead")
            return run(x2, w, bias, Config(0, 0, 0))
    if cfg.tma:  # prefill: the tile kernel with descriptor loads (its own gather of x)
        return run_tma(x2, w, bias, cfg.BM, cfg.BN, cfg.num_warps, cfg.num_stages,
                       cfg.tma == 2, cfg.nfast)
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
    iters = cdiv(cdiv(k, cfg.BK * (1 + cfg.pair)), cfg.SPLIT_K)
    if cfg.gemv:
        _int_gemv[(cdiv(n, cfg.BN), cfg.SPLIT_K)](
            x2, w.qdata, w.scale, z, b, y, m, n, k, w.qdata.shape[1], iters, x2.stride(0),
            w.qdata.stride(0), w.scale.stride(0), z.stride(0), y.stride(0), GROUP=w.group_size,
            BITS=w.bits, ZMODE=zmode(w), HAS_BIAS=bias is not None, ATOMIC=atomic, BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, W3=words3(w), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return y.to(x2.dtype) if atomic else y
    grid = (cdiv(m, cfg.BM), cdiv(n, cfg.BN), cfg.SPLIT_K)
    even = (n % cfg.BN == 0 and k % cfg.BK == 0) * (1 + (m % cfg.BM == 0))
    dq, perm = 0, None
    if cfg.dq == 1 and w.bits == 4 and not INTERPRET and _magic(cfg, w, x2.dtype):
        dq = 1
    elif cfg.dq in (2, 4) or cfg.pair:
        why = perm_ineligibility(w, x2.dtype, cfg, even)
        if why:
            raise ValueError(f"memfit.kernels.triton_int: {why}")
        dq = cfg.dq + (not INTERPRET)
        out = perm_x(x2, 128 if cfg.dq == 4 else 32, plan)
        x2, perm = out if plan else (out, None)  # the permuted activations, the plan's gather
    part, cnt = split_buffers(y, cfg.SPLIT_K if fix else 1, grid[0] * grid[1], w.scale)
    ragged = int(cdiv(k, cfg.BK * (1 + cfg.pair)) % cfg.SPLIT_K != 0)  # a split of uneven runs
    args = (x2, w.qdata, w.scale, z, b, y, m, n, k, w.qdata.shape[1], iters, x2.stride(0),
            w.qdata.stride(0), w.scale.stride(0), z.stride(0), y.stride(0), part, cnt, m * n)
    kw = dict(GROUP=w.group_size, BITS=w.bits, ZMODE=zmode(w), HAS_BIAS=bias is not None,
              ATOMIC=atomic, IEEE=x2.dtype == torch.float32, BM=cfg.BM, BN=cfg.BN,
              **_magic(cfg, w, x2.dtype), WA=int(cfg.wa), RB=w.tile_rows, PF=int(cfg.pf), DQ=dq,
              EVEN=even, FIX=int(fix), PAIR=int(cfg.pair), RAGGED=ragged, W3=words3(w), BK=cfg.BK,
              SPLIT_K=cfg.SPLIT_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
              **pdl.launch_kw(), **({"maxnreg": cfg.regs} if cfg.regs and not INTERPRET else {}))
    kernel = _int_mm[grid](*args, **kw)
    dt, dev = x2.dtype, x2.device

    def finish(y: torch.Tensor) -> torch.Tensor:  # split-K by atomics: a float32 sum, then this
        if bias is not None:
            y += bias.float()
        return y.to(dt)
    if not plan:
        return finish(y) if atomic else y
    launch = Launch(_int_mm, kernel, grid, args, kw, ("x_ptr", "y_ptr", "p_ptr", "c_ptr"))

    def call(x2: torch.Tensor) -> torch.Tensor:
        if perm is not None:
            x2 = perm(x2)
        if atomic:
            y = torch.zeros(m, n, dtype=torch.float32, device=dev)
            launch(x2, y, y, w.scale)
            return finish(y)
        y = torch.empty(m, n, dtype=dt, device=dev)
        launch(x2, y, *split_buffers(y, cfg.SPLIT_K if fix else 1, grid[0] * grid[1], w.scale))
        return y
    return (finish(y) if atomic else y), call


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"memfit: {msg}", stacklevel=3)


def plan(x2: torch.Tensor, w: IntWeight, bias: torch.Tensor | None):
    """(y, plan): `triton_linear`'s output for x2 (M, K), and a callable x2 -> y that does the
    same for activations like x2 (same M, dtype, device; contiguous, 16-byte aligned) with the
    kernel choice and, on the mma kernel, the launch arguments fixed (memfit.kernels.replay).
    (None, None) where the layout cannot take these kernels."""
    if INTERPRET or ineligibility(w) is not None:
        return None, None
    cfg = choose(x2, w, bias)
    if x2.shape[0] > replay.MAX_M:  # a prefill: one plan a bucket
        return _bucket_plan(x2, w, bias, cfg)
    # widen (3 bits): a fresh 4-bit weight each call, so only the choice is fixed (below)
    if cfg.words == "mma" and not cfg.widen:
        try:
            return run_mma(x2, w, bias, cfg.BN, cfg.SPLIT_K, cfg.num_warps, cfg.BK // 128,
                           epi=cfg.epi, reps=cfg.reps, prefetch=cfg.num_stages,
                           maxnreg=cfg.regs, plan=True)
        except MmaLayoutError:
            pass  # run() warns and dequantizes, once

    if cfg.BM and not cfg.words and not cfg.gemv and not cfg.widen and not cfg.tma:  # tile
        return run(x2, w, bias, cfg, plan=True)

    def call(x2: torch.Tensor) -> torch.Tensor:
        return run(x2, w, bias, cfg)
    return call(x2), call


def _bucket_plan(x2: torch.Tensor, w: IntWeight, bias: torch.Tensor | None, cfg: Config):
    """`plan` past replay.MAX_M rows (a prefill): a callable for activations of any M in x2's
    bucket (a prompt's length varies, its bucket seldom), the choice fixed; dequantize + cuBLAS,
    the usual pick there, with the dequantize kernel's launch fixed too (an H100 host: 44-47 µs
    a call against 67-74 on the ordinary path, F.linear's 15-18; RESULTS.md session 48)."""
    if cfg == Config(0, 0, 0):
        b = None if bias is None else bias.to(x2.dtype)
        wd, dequant = dequantize_triton(w, x2.dtype, plan=True)

        def call(x2: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x2, dequant(), b)
        return torch.nn.functional.linear(x2, wd, b), call

    def run_cfg(x2: torch.Tensor) -> torch.Tensor:
        return run(x2, w, bias, cfg)
    return run_cfg(x2), run_cfg


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
