"""Probe (issue 10, M = 2048 >= 0.9x bf16): dequantize + cuBLAS in row blocks, each block's GEMM
on a high-priority stream and the next block's dequantization on a low-priority one, cuBLASLt
told to leave `carve` SMs free (torch's SM carveout).

Session 45's first probe (benchmarks/prefill_overlap.py at commit 330a4aa) found that cuBLASLt
leaving 4 SMs free costs the 2048-token GEMM nothing on an H100 (309.9 against 309.3 µs), but
that the next block's dequantization, launched beside the GEMM on a second stream, took SMs the
GEMM wanted (every pipelined row 1.5-8x slower). CUDA graphs in PyTorch are instantiated with
per-node priorities, so kernels captured on a high-priority stream are dispatched first when
both streams have blocks waiting: here the GEMM's, leaving the dequantization the free SMs.
Session 46 (`--tile`, `--progs -1`, `--rate`): one program a free SM, each streaming a
contiguous run with a tile prefetched, reaches ~30 GB/s a program on an H100 (2.4x the plain
loop) and no tile shape or warp count moves it, so 4-8 free SMs still cannot hide the next
block and 16 cost the GEMM more than they save (benchmarks/RESULTS.md, session 46).

Each candidate is timed as memfit's chooser times (a CUDA graph over weight copies past the L2,
graphs replayed in turns, median of 6) and checked against whole dequantize + cuBLAS.

    python benchmarks/prefill_priority.py [--shapes 14336x4096 4096x14336] [--m 2048]
        [--rows 2048 3584 4096] [--carve 0 4 8] [--bufs 2 3] [--progs 0 64 -1]
        [--tile 64x128x16 ...] [--rate] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.prefill_overlap import run_cells, setup, time_cands
from memfit.kernels.triton_dequant import (
    _byte_ptrs,
    _group_params,
    _unpack_tile,
    dequantize_triton,
    zmode,
)
from memfit.kernels.weights import row_slice


@triton.jit
def _dequant_loop(q_ptr, s_ptr, z_ptr, w_ptr, N, K, NB, stride_qn, stride_sn, stride_zn,
                  PROGS, GROUP: tl.constexpr, ZMODE: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    """4-bit stored layout: program p dequantizes tiles p, p + PROGS, ... (row-major order)."""
    tiles_k = tl.cdiv(K, BK)
    for t in range(tl.program_id(0), tl.cdiv(N, BN) * tiles_k, PROGS):
        rn = (t // tiles_k) * BN + tl.arange(0, BN)
        k0 = (t % tiles_k) * BK
        kk = k0 + tl.arange(0, BK)
        n_ok = rn < N
        s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, n_ok, stride_sn, stride_zn, 4,
                             ZMODE, BN, 0)
        jb = k0 // 2 + tl.arange(0, BK // 2)
        qb = tl.load(_byte_ptrs(q_ptr, rn, jb, k0 // 2, stride_qn, 0),
                     mask=n_ok[:, None] & (jb[None, :] < NB), other=0)
        c = _unpack_tile(qb, 4, BN, BK).to(tl.float32)
        w = (c - z[:, None]) * s[:, None]
        tl.store(w_ptr + rn[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (kk[None, :] < K))


@triton.jit
def _few_tile(q_ptr, s_ptr, z_ptr, t, t1, tiles_k, N, stride_qn, stride_sn, stride_zn,
              GROUP: tl.constexpr, ZMODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Tile t's (BN, BK / 2) bytes, scales and zero points (nothing loaded past tile t1)."""
    rn = (t // tiles_k) * BN + tl.arange(0, BN)
    k0 = (t % tiles_k) * BK
    ok = (rn < N) & ((rn * 0 + t) < t1)
    s, z = _group_params(s_ptr, z_ptr, rn, k0 // GROUP, ok, stride_sn, stride_zn, 4, ZMODE,
                         BN, 0)
    jb = k0 // 2 + tl.arange(0, BK // 2)
    qb = tl.load(_byte_ptrs(q_ptr, rn, jb, k0 // 2, stride_qn, 0), mask=ok[:, None], other=0)
    return qb, s, z


@triton.jit
def _dequant_few(q_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_zn, PROGS,
                 GROUP: tl.constexpr, ZMODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """4-bit stored layout (BK divides K and the group): program p dequantizes a contiguous run
    of the (BN, BK) tiles in row-major order, each tile's bytes and parameters loaded before
    the one before it is unpacked and stored (a register prefetch: bytes in flight on each of
    few programs)."""
    tiles_k = K // BK
    total = tl.cdiv(N, BN) * tiles_k
    p = tl.program_id(0)
    t0 = (p * total) // PROGS
    t1 = ((p + 1) * total) // PROGS
    qb, s, z = _few_tile(q_ptr, s_ptr, z_ptr, t0, t1, tiles_k, N, stride_qn, stride_sn,
                         stride_zn, GROUP, ZMODE, BN, BK)
    for t in range(t0, t1):
        nqb, ns, nz = _few_tile(q_ptr, s_ptr, z_ptr, t + 1, t1, tiles_k, N, stride_qn,
                                stride_sn, stride_zn, GROUP, ZMODE, BN, BK)
        rn = (t // tiles_k) * BN + tl.arange(0, BN)
        kk = (t % tiles_k) * BK + tl.arange(0, BK)
        w = (_unpack_tile(qb, 4, BN, BK).to(tl.float32) - z[:, None]) * s[:, None]
        tl.store(w_ptr + rn[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=(rn < N)[:, None])
        qb, s, z = nqb, ns, nz


def dequant(w, dtype, out, progs: int, tile: tuple | None = None):
    """memfit's one-pass dequantize (progs 0), or the same tiles on `progs` looping programs
    (tile (BN, BK, warps): `_dequant_few`'s contiguous runs, a tile prefetched)."""
    if not progs:
        return dequantize_triton(w, dtype, out)
    n, k = w.shape
    if tile:
        bn, bk, warps = tile
        _dequant_few[(progs,)](w.qdata, w.scale, w.zero, out, n, k, w.qdata.stride(0),
                               w.scale.stride(0), w.zero.stride(0), progs,
                               GROUP=w.group_size, ZMODE=zmode(w), BN=bn,
                               BK=min(bk, w.group_size), num_warps=warps)
        return out
    _dequant_loop[(progs,)](w.qdata, w.scale, w.zero, out, n, k, w.qdata.shape[1],
                            w.qdata.stride(0), w.scale.stride(0), w.zero.stride(0), progs,
                            GROUP=w.group_size, ZMODE=zmode(w), BN=32, BK=128)
    return out


@contextlib.contextmanager
def carveout(sms: int):
    """cuBLAS(Lt) GEMMs inside leave `sms` SMs free (0: the Lt backend alone)."""
    had, lib = torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    if sms:
        torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(had)
        torch.backends.cuda.preferred_blas_library(lib)


HI = LO = None


def blocks(x2, w, rows: int, ahead: int, carve: int, progs: int, prio: bool,
           tile: tuple | None = None):
    """y = x2 @ dequant(w)^T, `rows` output rows a block: block i's GEMM on a high-priority
    stream (prio) and blocks up to i + ahead dequantized on a low-priority one, into ahead + 1
    reused buffers; the first block on memfit's whole grid, the later ones on `progs` looping
    programs (0: the whole grid too; tile: `_dequant_few`'s, see `dequant`)."""
    global HI, LO
    if HI is None:
        lo, hi = torch.cuda.Stream.priority_range()
        HI, LO = torch.cuda.Stream(priority=hi), torch.cuda.Stream(priority=lo)
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    starts = range(0, n, rows)
    bufs = [torch.empty(min(rows, n - a), k, dtype=x2.dtype, device=x2.device)
            for a in starts[: ahead + 1]]
    main = torch.cuda.current_stream()
    gemm = HI if prio else main
    side = LO
    ready = [torch.cuda.Event() for _ in starts]
    read = [torch.cuda.Event() for _ in starts]
    side.wait_stream(main)
    gemm.wait_stream(main)
    done = 0
    for i, a in enumerate(starts):
        while done < min(i + len(bufs), len(starts)):
            with torch.cuda.stream(side):
                if done >= len(bufs):
                    side.wait_event(read[done - len(bufs)])
                b = starts[done]
                dequant(row_slice(w, b, min(b + rows, n)), x2.dtype,
                        bufs[done % len(bufs)][: min(rows, n - b)], progs if done else 0,
                        tile)
                ready[done].record(side)
            done += 1
        with torch.cuda.stream(gemm), carveout(carve):
            gemm.wait_event(ready[i])
            torch.mm(x2, bufs[i % len(bufs)][: min(rows, n - a)].t(), out=y[:, a:a + rows])
            read[i].record(gemm)
    main.wait_stream(side)
    main.wait_stream(gemm)
    return y


def tiles(args) -> list:
    """--tile BNxBKxWARPS strings as tuples (none: the plain looping kernel)."""
    return [tuple(map(int, t.split("x"))) for t in args.tile] or [None]


def cell(n, k, m, args, gen) -> list[dict]:
    ws, x, wd, ref = setup(n, k, m, gen)
    cands = {"bf16 cuBLAS": [lambda d=d: F.linear(x, d) for d in wd],
             "dequantize + cuBLAS": [lambda w=w: F.linear(x, dequantize_triton(w, x.dtype))
                                     for w in ws]}
    for c in args.carve:
        def lt(d, c=c):
            with carveout(c):
                return F.linear(x, d)
        cands[f"bf16 cuBLASLt, {c} SMs left"] = [lambda d=d, f=lt: f(d) for d in wd]
    for r, c, nb, p, prio, t in itertools.product(args.rows, args.carve, args.bufs, args.progs,
                                                  (True, False), tiles(args)):
        p = c if p < 0 else p  # -1: a program for each SM left free
        if r >= n or (not prio and (c or p)):
            continue  # no priority: the plain two-stream form only
        tag = f", tile {'x'.join(map(str, t))}" if t and p else ""
        cands[f"blocks {r}, {nb} bufs, {c} SMs left, progs {p}, prio {int(prio)}{tag}"] = [
            lambda w=w, r=r, a=nb - 1, c=c, p=p, pr=prio, t=t: blocks(x, w, r, a, c, p, pr, t)
            for w in ws]
    return time_cands(n, k, m, cands, ref)


def rate(n, k, m, args, gen) -> list[dict]:
    """The dequantization alone on --progs programs (0: memfit's whole grid) with each --tile,
    against memfit's one-pass kernel: read + write GB/s in all and a program."""
    ws, _, _, _ = setup(n, k, 16, gen)
    out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
    ref = dequantize_triton(ws[0], torch.bfloat16)
    cands = {"memfit dequantize": [lambda w=w: dequantize_triton(w, torch.bfloat16, out)
                                   for w in ws]}
    for p, t in itertools.product([p for p in args.progs if p > 0], tiles(args)):
        name = f"{p} programs, tile {'x'.join(map(str, t)) if t else 'loop 32x128x4'}"
        cands[name] = [lambda w=w, p=p, t=t: dequant(w, torch.bfloat16, out, p, t) for w in ws]
    rows = time_cands(n, k, m, cands, ref)
    nbytes = ws[0].qdata.numel() + 2 * ws[0].scale.numel() + ws[0].zero.numel() + 2 * n * k
    for r, name in zip(rows, cands):
        p = int(name.split()[0]) if name[0].isdigit() else 0
        r["GB_s"] = round(nbytes / r["us"] / 1e3, 1)
        r["GB_s_program"] = round(r["GB_s"] / p, 1) if p else None
        print(f"{name:40s} {r['GB_s']:8.1f} GB/s" + (f"  {r['GB_s_program']:6.1f} a program"
                                                       if p else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[2048])
    ap.add_argument("--shapes", nargs="*", default=["14336x4096", "4096x14336"])
    ap.add_argument("--rows", type=int, nargs="*", default=[2048, 3584, 4096])
    ap.add_argument("--carve", type=int, nargs="*", default=[0, 4, 8])
    ap.add_argument("--bufs", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--progs", type=int, nargs="*", default=[0, 64],
                    help="looping programs for the later blocks (-1: one a free SM)")
    ap.add_argument("--tile", nargs="*", default=[],
                    help="BNxBKxWARPS of the prefetching looping kernel (none: the plain one)")
    ap.add_argument("--rate", action="store_true",
                    help="time the dequantization alone on --progs programs")
    ap.add_argument("--json")
    args = ap.parse_args()
    run_cells(args, rate if args.rate else cell)


if __name__ == "__main__":
    main()
