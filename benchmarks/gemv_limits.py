"""Probes for the int4 kernels' remaining gaps (issue 10), one GPU run:

- stream: what a plain read of the 14336x4096 int4 codes reaches (a Triton kernel summing int32
  words, best of its launch shapes): the floor under any M = 1 kernel of this size.
- epi: the M = 1 mma decode kernel (memfit.kernels.triton_mma) with its epilogue in the asm
  (`epi=True`: scales loaded in the mma layout, the tile folded in) against the Triton epilogue,
  every one-tile-a-step launch shape, tiled and stored layouts; outputs checked against
  dequantize + cuBLAS.
- cands: the chooser's candidates for M = 16 / 32 / 64 (the mma kernel up to M = 32 with a lane's rows sharing
  their activation loads, `reps`; the tile kernels; dequantize + cuBLAS), each timed and checked
  against dequantize + cuBLAS, stored and tiled layouts.
- wa: the tile kernel with the weight tile as the dot's A operand (`Config.wa`), a grid of launch
  shapes, against the chooser's candidates, M = 32..2048.
- blocks: dequantize + cuBLAS a block of rows at a time through one reused buffer
  (memfit.kernels.triton_dequant.dequant_blocks) against one whole dequantize, M = 64..2048.
- waves / wide / pair: the dq 4 tile kernel's grid, 8-warp and two-tiles-a-step shapes.
- permx: what the activations' permutation into the fragment order costs (session 19).
- spread: a tile shape's time over 20 replays, PDL on and off.
- big: the dq 4 tile kernel past M = 128 (token tiles of 64-256) against dequantize + cuBLAS.
- dequant: the dequantize kernel alone at 3 and 4 bits (session 36: 3-bit blocks as words).
- writes: what bounds the dequantize of dequantize + cuBLAS: a plain write (fill) and a copy of
  the bf16 weight against the shipped dequantize and a row-looping form of it (session 21).

Timed as the chooser times (CUDA graph over weight copies past the L2, memfit.kernels.gpu_timing).
Session 10 ran this file as benchmarks/gemv_pipe.py (commit 0840732), which also timed load
pipelining through shared memory and the dequantize kernel's launch shapes; session 12 also
timed the next block's dequantize on a second stream (`--streams`, commit b6e5d77), and
benchmarks/gemv_tma.py (commit 62edff2) a TMA pipeline; session 25 an L2 prefetch a few tiles
ahead in the mma decode kernel (`--parts l2`, commit 54bf5e5): all measured no better
(benchmarks/RESULTS.md) and removed.

    python benchmarks/gemv_limits.py [--parts stream epi cands blocks] [--json OUT]
    python benchmarks/gemv_limits.py --parts cands --only mma --pf --rb 64 --group 128 --m 1 16
    python benchmarks/gemv_limits.py --parts blocks --bm 2048 --rows 0 2048 4096
    python benchmarks/gemv_limits.py --parts wa --m 64 256 2048 --rb 0 --shapes 14336x4096
    python benchmarks/gemv_limits.py --parts dequant cands --bits 3 --m 1 4 16 64
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.kernel_speed import copies, graph_time_us, int_weight
from memfit.kernels import gpu_timing, mma_ptx, triton_dequant, triton_int, triton_mma
from memfit.kernels.weights import tile

ROWS: list = []


def note(row: dict, path: str | None) -> None:
    print(json.dumps(row), flush=True)
    ROWS.append(row)
    if path:  # after every row: a run stopped at its time limit keeps what it measured
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": ROWS}, f, indent=1)


def t_us(fns) -> float:
    return gpu_timing.graph_us(fns, 2 * len(fns), 3, min)


def setup(n, k, g, m, gen, bits=4):
    ws = [int_weight(n, k, bits, g, gen) for _ in range(max(2, copies(n * k * bits // 8)))]
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
             for _ in range(max(2, copies(2 * n * k)))]
    bf16 = graph_time_us([lambda d=d: F.linear(x, d) for d in dense])
    del dense
    want = triton_int.run(x, ws[0], None, triton_int.Config(0, 0, 0)).float()
    return ws, x, bf16, want


@triton.jit
def _read(q_ptr, o_ptr, NW, ITERS, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
          STAGES: tl.constexpr):
    """Sum of int32 words: program p reads blocks p, p + P, ... (CHUNK = 0) or its own
    contiguous run of ITERS blocks (CHUNK = 1)."""
    pid = tl.program_id(0)
    npg = tl.num_programs(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for it in tl.range(ITERS, num_stages=STAGES):
        blk = pid * ITERS + it if CHUNK else it * npg + pid
        off = blk * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(q_ptr + off, mask=off < NW, other=0)
    tl.store(o_ptr + pid, tl.sum(acc, 0))


def stream(args, gen) -> None:
    n, k = 14336, 4096
    ws = [int_weight(n, k, 4, 128, gen) for _ in range(copies(n * k // 2))]
    qs = [w.qdata.view(torch.int32).reshape(-1) for w in ws]
    nw = qs[0].numel()
    out = torch.empty(132 * 64, dtype=torch.int32, device="cuda")
    res = []
    for block in (1024, 2048, 4096):
        for warps in (4, 8):
            for per_sm in (1, 2, 4, 8):
                for chunk in (0, 1):
                    for st in (1, 3):
                        grid = 132 * per_sm
                        iters = triton.cdiv(triton.cdiv(nw, block), grid)
                        f = [lambda q=q: _read[(grid,)](q, out, nw, iters, BLOCK=block,
                                                        CHUNK=chunk, STAGES=st,
                                                        num_warps=warps) for q in qs]
                        try:
                            t = t_us(f)
                        except Exception as e:  # noqa: BLE001
                            print(f"  read {block} {warps} {per_sm} {chunk} {st}: {e}"[:200])
                            continue
                        res.append((t, block, warps, per_sm, chunk, st))
    res.sort()
    copy = t_us([lambda q=q: q.clone() for q in qs])  # read + write the same bytes
    note({"part": "stream", "bytes": nw * 4, "best_us": round(res[0][0], 2),
          "TBps": round(nw * 4 / res[0][0] / 1e6, 2), "clone_us": round(copy, 2),
          "top8": [(round(r[0], 2),) + r[1:] for r in res[:8]]}, args.json)


def blocks(args, gen) -> None:
    for n, k in ((14336, 4096), (4096, 14336)):
        for m in args.bm:
            ws, x, bf16, want = setup(n, k, 128, m, gen)
            row = {"part": "blocks", "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2)}
            for rows in args.rows:
                if rows >= n:
                    continue
                c = triton_int.Config(0, rows, 0)
                err = ((triton_int.run(x, ws[0], None, c).float() - want).norm()
                       / want.norm()).item()
                t = t_us([lambda w=w: triton_int.run(x, w, None, c) for w in ws])
                row[f"rows{rows}"] = {"us": round(t, 2), "x_bf16": round(bf16 / t, 3),
                                      "err": err}
            note(row, args.json)
            del ws
            torch.cuda.empty_cache()


def epi(args, gen) -> None:
    """The M = 1 mma kernel with the scales loaded and the tile folded in the asm (EPI) against
    the Triton epilogue, every register-prefetch launch shape (U = 1), tiled and stored."""
    for n, k, g in ((14336, 4096, 128), (4096, 14336, 128), (14336, 4096, 64),
                    (14336, 4096, 32)):
        ws, x, bf16, want = setup(n, k, g, 1, gen)
        row = {"part": "epi", "n": n, "k": k, "group": g, "bf16_us": round(bf16, 2)}
        for rb in (64, 0):
            wl = [tile(w, rb) for w in ws] if rb else ws
            for on in (True, False):
                res = []
                for c in triton_int.mma_candidates(1, ws[0]):
                    if c.BK != 128 or c.epi or c.num_stages != 1:
                        continue
                    f = [lambda w=w, c=c, on=on: triton_mma.run_mma(
                        x, w, None, c.BN, c.SPLIT_K, c.num_warps, epi=on) for w in wl]
                    try:
                        err = ((f[0]().float() - want).norm() / want.norm()).item()
                        res.append((t_us(f), c.BN, c.num_warps, c.SPLIT_K, err))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {c}: {type(e).__name__} {str(e)[:160]}", flush=True)
                res.sort()
                row[f"rb{rb}_epi{int(on)}"] = {
                    "us": round(res[0][0], 2), "x_bf16": round(bf16 / res[0][0], 3),
                    "cfg": res[0][1:4], "max_err": max(r[4] for r in res),
                    "top4": [(round(r[0], 2),) + r[1:4] for r in res[:4]]}
        note(row, args.json)
        del ws
        torch.cuda.empty_cache()


def _keep(m: int, c) -> bool:
    """The candidates worth a compile in one short GPU call."""
    if c.words == "mma":
        return c.BK == 128 and (m == 1 or not c.epi)
    if c.gemv:
        return True
    if m <= 16:
        return c.magic or c.BM == 0
    return c.BM == 0 or (c.magic and c.SPLIT_K <= 2)


def cands(args, gen) -> None:
    for shape in args.shapes or ["14336x4096"]:
        n, k = map(int, shape.split("x"))
        _cands(args, gen, n, k, args.group)


def _cands(args, gen, n, k, g) -> None:
    for m in args.m:
        ws, x, bf16, want = setup(n, k, g, m, gen, args.bits)
        for rb in args.rb if args.bits == 4 else [0]:
            wl = [tile(w, rb) for w in ws] if rb else ws
            res = []
            cs = triton_int.candidates(m, wl[0], x.dtype)
            if args.pf:  # the mma kernel's one-tile launch shapes with two tiles in flight
                cs += [replace(c, num_stages=2) for c in cs if c.words == "mma" and c.BK == 128]
            if args.stages:  # the tile kernel's shapes again with deeper software pipelines
                cs += [replace(c, num_stages=st) for st in args.stages for c in cs
                       if c.dq == 4 and c.num_stages == (3 if c.pair else 4)]
            if args.regs:  # the mma kernel's shapes again under each ptxas register cap
                cs += [replace(c, regs=r) for r in args.regs for c in cs
                       if c.words == "mma" and r and not c.regs]
            for c in cs:
                if not _keep(m, c) or (args.only and (c.words or "tile") != args.only):
                    continue
                if args.splits and c.SPLIT_K not in args.splits:
                    continue
                for paired in ((True, False) if args.ab and c.reps > 1 else (True,)):
                    mma_ptx.PAIRED = paired
                    f = [lambda w=w, c=c: triton_int.run(x, w, None, c) for w in wl]
                    try:
                        err = ((f[0]().float() - want).norm() / want.norm()).item()
                        res.append((t_us(f), err, c, paired))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {c}: {type(e).__name__} {str(e)[:160]}", flush=True)
                mma_ptx.PAIRED = True
            res.sort(key=lambda r: r[0])
            best = {}
            for t, err, c, paired in res:  # the best of each kernel family
                fam = (c.words or ("dequant" if c.BM == 0 else "gemv" if c.gemv else "tile")
                       + f"_reps{c.reps}")
                fam += (f"_pf{c.num_stages}_epi{int(c.epi)}_regs{c.regs}" if c.words == "mma"
                        else "")
                fam += "_paired" if c.words == "mma" and c.reps > 1 and paired else ""
                fam += (f"_pair{int(c.pair)}_st{c.num_stages}" if fam.startswith("tile")
                        and c.dq == 4 else "")
                best.setdefault(fam, (round(t, 2), round(bf16 / t, 3), err, str(c)))
            note({"part": "cands", "n": n, "k": k, "bits": args.bits, "group": g, "m": m, "rb": rb,
                  "bf16_us": round(bf16, 2), "n_timed": len(res),
                  "max_err": max(r[1] for r in res), "best": best,
                  "top6": [(round(t, 2), str(c), p) for t, _, c, p in res[:6]]}, args.json)
        del ws
        torch.cuda.empty_cache()


def wa(args, gen) -> None:
    """The tile kernel with the weight as the dot's A operand (`Config.wa`) against the chooser's
    candidates (x as A, the mma kernel, dequantize + cuBLAS), M = 32..2048, a grid of launch
    shapes; stored and tiled layouts."""
    for n, k in ((14336, 4096), (4096, 14336)):
        if args.shapes and f"{n}x{k}" not in args.shapes:
            continue
        for m in args.m:
            ws, x, bf16, want = setup(n, k, args.group, m, gen)
            bk = min(128, args.group)
            grid = []
            bms = ([32 if m <= 32 else 64] if m <= 64 else [64, 128] if m <= 256
                   else [128, 256])
            for bm in bms:
                shapes = ((64, 4), (128, 8)) if args.small else ((64, 4), (128, 4), (128, 8),
                                                                   (256, 8))
                for bn, warps in shapes:
                    for st in ((4,) if args.small else (3, 4) if m <= 256 else (3,)):
                        for sk in ((1, 2, 4) if m <= 128 else (1,)):
                            for pf, dq in (((1, 1), (1, 2), (1, 4)) if args.dq and m <= 256
                                           else ((1, 2),) if args.dq
                                           else ((int(args.pf), 0),)):
                                if (bm >= 256 and bn >= 256) or (dq == 4 and bn != 64):
                                    continue
                                grid.append(triton_int.Config(bm, bn, bk, sk, warps, st,
                                                              magic=True, wa=True, pf=pf,
                                                              dq=dq))
            for rb in args.rb:
                wl = [tile(w, rb) for w in ws] if rb else ws
                cs = [c for c in triton_int.candidates(m, wl[0], x.dtype)
                      if (rb or c.BM == 0 or c.words == "mma" or c.magic)
                      and not (args.small and c.BM and c.words != "mma")] + grid
                res = []
                for c in cs:
                    f = [lambda w=w, c=c, x=x: triton_int.run(x, w, None, c) for w in wl]
                    try:
                        err = ((f[0]().float() - want).norm() / want.norm()).item()
                        if err > 1e-2:
                            print(f"  {c}: error {err:.3g}", flush=True)
                            continue
                        res.append((t_us(f), err, c))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {c}: {type(e).__name__} {str(e)[:160]}", flush=True)
                res.sort(key=lambda r: r[0])
                best = {}
                for t, err, c in res:
                    fam = (c.words or ("dequant" if c.BM == 0 else "tile"))
                    fam += ("_wa" if c.wa else "") + (f"_pf{c.pf}" if c.pf else "")
                    fam += f"_dq{c.dq}" if c.dq else ""
                    best.setdefault(fam, (round(t, 2), round(bf16 / t, 3), str(c)))
                note({"part": "wa", "n": n, "k": k, "group": args.group, "m": m, "rb": rb,
                      "bf16_us": round(bf16, 2), "n_timed": len(res),
                      "max_err": max(r[1] for r in res), "best": best,
                      "top8": [(round(t, 2), c.BM, c.BN, c.BK, c.SPLIT_K, c.num_warps,
                                c.num_stages, int(c.wa), int(c.pf)) for t, _, c in res[:8]],
                      "all": [(round(t, 2), c.BM, c.BN, c.SPLIT_K, c.num_warps, c.num_stages,
                               int(c.pf), int(c.dq)) for t, _, c in res if c.wa]},
                     args.json)
            del ws
            torch.cuda.empty_cache()


@triton.jit
def _bf16_wa(x_ptr, w_ptr, y_ptr, M, N, K, ITERS, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """Ceiling probe: the tile kernel's loop (weight as A, split K) on a dense 16-bit weight."""
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for it in range(0, ITERS):
        kk = (it * SPLIT_K + tl.program_id(2)) * BK + tl.arange(0, BK)
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :])
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    ptrs = y_ptr + rm[None, :] * N + rn[:, None]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=rm[None, :] < M)
    else:
        tl.store(ptrs, acc.to(tl.bfloat16), mask=rm[None, :] < M)


def wa_bf16(args, gen) -> None:
    """How fast Triton streams a dense 16-bit weight through the tile kernel's loop (the weight
    as the dot's A operand) at M = 16..128: the ceiling the int4 tile kernel works under."""
    n, k = 14336, 4096
    for m in args.m:
        dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
                 for _ in range(max(2, copies(2 * n * k)))]
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        bf16 = graph_time_us([lambda d=d: F.linear(x, d) for d in dense])
        want = F.linear(x, dense[0]).float()
        bm = max(16, 1 << (m - 1).bit_length())
        res = []
        for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8)):
            for st in (3, 4):
                for sk in (1, 2, 4):
                    iters = k // 128 // sk

                    def f(d, bn=bn, warps=warps, st=st, sk=sk, iters=iters):
                        y = (torch.zeros if sk > 1 else torch.empty)(
                            m, n, dtype=torch.float32 if sk > 1 else torch.bfloat16,
                            device="cuda")
                        _bf16_wa[(1, n // bn, sk)](x, d, y, m, n, k, iters, BM=bm, BN=bn, BK=128,
                                                   SPLIT_K=sk, num_warps=warps, num_stages=st)
                        return y.to(torch.bfloat16)
                    try:
                        err = ((f(dense[0]).float() - want).norm() / want.norm()).item()
                        res.append((round(t_us([lambda d=d: f(d) for d in dense]), 2), bn, warps,
                                    st, sk, round(err, 4)))
                    except Exception as e:  # noqa: BLE001
                        print(f"  bf16 wa {bn} {warps} {st} {sk}: {type(e).__name__}", flush=True)
        res.sort()
        note({"part": "wa_bf16", "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2),
              "top8": res[:8]}, args.json)
        del dense
        torch.cuda.empty_cache()


def _dq4_grid(args, gen, part: str, shapes, default=("14336x4096", "4096x14336"),
              tiles16: bool = False) -> None:
    """Time the dq 4 tile-kernel launch shapes `shapes(n, bm)` yields as (name, Config) for each
    NxK shape (--shapes, else `default`) and M, beside bf16 cuBLAS; each output checked against
    dequantize + cuBLAS. Token tiles of 32 up to M = 32 (tiles16: of 16 up to M = 16, as the
    chooser's), 64 up to 64, else 128."""
    for shape in args.shapes or default:
        n, k = map(int, shape.split("x"))
        for m in args.m:
            ws, x, bf16, want = setup(n, k, args.group, m, gen)
            row = {"part": part, "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2)}
            bm = 16 if tiles16 and m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
            for name, c in shapes(n, bm):
                f = [lambda w=w, c=c: triton_int.run(x, w, None, c) for w in ws]
                try:
                    err = ((f[0]().float() - want).norm() / want.norm()).item()
                    row[name] = (round(t_us(f), 2), round(err, 5))
                except Exception as e:  # noqa: BLE001 (too much shared memory, ...)
                    row[name] = type(e).__name__
            note(row, args.json)
            del ws
            torch.cuda.empty_cache()


def waves(args, gen) -> None:
    """Wave probe: the dq 4 tile kernel (BN 64, 4 warps) at N = 64 x 132 x (1, 1.7, 2, 3, 4)
    rows and K = 4096: time per 64-row block against the programs per SM the stages allow."""
    def shapes(n, bm):
        for st in (2, 3, 4):
            yield f"st{st}", triton_int.Config(bm, 64, 128, 1, 4, st, magic=True, wa=True,
                                               pf=1, dq=4)
    _dq4_grid(args, gen, "waves", shapes,
              [f"{n}x4096" for n in (8448, 14336, 16896, 25344, 33792)])


def wide(args, gen) -> None:
    """The dq 4 tile kernel at BN 64 / 4 warps and BN 128 / 8 warps, 3-4 stages, K split 1-4
    (float32 partials summed by the last arrival), with and without a cap of 128 registers a
    thread (two 8-warp programs a multiprocessor)."""
    def shapes(n, bm):
        for bn, warps, regs in ((64, 4, 0), (128, 8, 0), (128, 8, 128)):
            for st in (3, 4):
                for sk in (1, 2, 4):
                    yield (f"bn{bn}_r{regs}_st{st}_sk{sk}",
                           triton_int.Config(bm, bn, 128, sk, warps, st, magic=True, wa=True,
                                             pf=1, dq=4, regs=regs))
    _dq4_grid(args, gen, "wide", shapes)


def pair(args, gen) -> None:
    """dq 4 with two 128-code tiles a step (`Config.pair`: one dot of K = 256, 10% fewer loop
    instructions a tile in the offline sm_90 build) against one tile a step."""
    def shapes(n, bm):
        for bn, warps in ((128, 8), (64, 4)):
            for sk in ((1,) if n > 8192 else (2, 4)):
                for st, two in ((4, False), (3, False), (2, True), (3, True)):
                    yield (f"bn{bn}_sk{sk}_st{st}_pair{int(two)}",
                           triton_int.Config(bm, bn, 128, sk, warps, st, magic=True, wa=True,
                                             pf=1, dq=4, pair=two))
    _dq4_grid(args, gen, "pair", shapes)


def splitk(args, gen) -> None:
    """dq 4 (BN 64 / 4 warps, pairs at 3 stages or one tile at 4) with K split 1-8 also where
    the rows alone give more 64-row blocks than SMs (14336 rows: 224 programs on 132 SMs, 92
    running two and 40 one): does a finer grid even the SMs' work at M <= 32?"""
    def shapes(n, bm):
        for sk in args.splits or (1, 2, 3, 4, 6, 8):
            for st, two in ((3, True), (4, False)):
                yield (f"bn64_sk{sk}_st{st}_pair{int(two)}",
                       triton_int.Config(bm, 64, 128, sk, 4, st, magic=True, wa=True,
                                         pf=1, dq=4, pair=two))
        yield ("bn128_sk1_st3_pair1",
               triton_int.Config(bm, 128, 128, 1, 8, 3, magic=True, wa=True, pf=1, dq=4,
                                 pair=True))
    _dq4_grid(args, gen, "splitk", shapes, tiles16=True)


def big(args, gen) -> None:
    """The dq 4 tile kernel past M = 128 (prefill; not offered there since session 13, when the
    tile kernel still converted its tile through shared memory): token tiles of 64-256 (the
    wgmma's N), BN 64 / 4 warps and 128 / 8, 2-4 stages, against dequantize + cuBLAS."""
    def shapes(n, bm):
        yield "dequant", triton_int.Config(0, 0, 0)
        for tm in (64, 128, 256):
            for bn, warps in ((128, 8), (64, 4)):
                for st in ((2, 3) if tm == 256 else (3, 4)):
                    yield (f"bm{tm}_bn{bn}_st{st}",
                           triton_int.Config(tm, bn, 128, 1, warps, st, magic=True, wa=True,
                                             pf=1, dq=4))
    _dq4_grid(args, gen, "big", shapes)


@contextlib.contextmanager
def _launch(pdl_on: bool, perm=None):
    """Kernels launched with PDL or not (if this GPU has it), perm_x swapped for `perm`."""
    from memfit.kernels import pdl
    had, keep = pdl.enabled(), triton_int.perm_x
    pdl.ENABLED = pdl_on and had
    triton_int.perm_x = perm or keep
    try:
        yield
    finally:
        pdl.ENABLED, triton_int.perm_x = had, keep


def permx(args, gen) -> None:
    """What the activations' copy into the fragment order (`triton_int.perm_x`, one launch a
    call) costs the dq 4 tile kernel: the gather kernel and torch's copy of the permuted view
    alone, the tile kernel after each (the gather and the tile kernel with PDL on and off), and
    the tile kernel with the copy skipped (perm_x swapped for the identity while timing: the sums
    are then wrong, the time is not)."""
    def timed(f, perm, pdl_on):
        with _launch(pdl_on, perm):
            return round(t_us(f), 2)

    for shape in args.shapes or ["14336x4096"]:
        n, k = map(int, shape.split("x"))
        for m in args.m:
            ws, x, bf16, want = setup(n, k, args.group, m, gen)
            bm = 32 if m <= 32 else 64 if m <= 64 else 128
            row = {"part": "permx", "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2),
                   "perm_x_us": timed([lambda: triton_int.perm_x(x, 128)] * 2, None, True),
                   "perm_view_us": timed([lambda: triton_int.perm_x_reference(x, 128)] * 2,
                                         None, True)}
            for bn, warps, st, two, sk in ((128, 8, 3, True, 1), (128, 8, 4, False, 1),
                                           (64, 4, 4, False, 1), (64, 4, 3, True, 4)):
                if (sk > 1) != (n < 8192):
                    continue
                c = triton_int.Config(bm, bn, 128, sk, warps, st, magic=True, wa=True, pf=1,
                                      dq=4, pair=two)
                f = [lambda w=w, c=c: triton_int.run(x, w, None, c) for w in ws]
                name = f"bn{bn}_st{st}_pair{int(two)}_sk{sk}"
                err = ((f[0]().float() - want).norm() / want.norm()).item()
                row[name] = (timed(f, None, True), round(err, 5))
                row[name + "_no_pdl"] = timed(f, None, False)
                row[name + "_view"] = timed(f, triton_int.perm_x_reference, False)
                row[name + "_no_perm"] = timed(f, lambda x2, span=32: x2, True)
            note(row, args.json)
            del ws
            torch.cuda.empty_cache()


def spread(args, gen) -> None:
    """How a tile-kernel launch shape's time spreads over 20 graph replays, PDL on and off
    (session 19: benchmarks/kernel_speed.py's median of 5 read 18-26% above the best of 3 for the
    BN 128 / 8-warp / 4-stage shape, which two programs can share a multiprocessor with, and
    not for the pair forms, which cannot): min / median / max µs."""
    for shape in args.shapes or ["14336x4096"]:
        n, k = map(int, shape.split("x"))
        for m in args.m:
            ws, x, bf16, _ = setup(n, k, args.group, m, gen)
            row = {"part": "spread", "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2)}
            for bn, warps, st, two in ((128, 8, 4, False), (128, 8, 3, True), (64, 4, 3, True)):
                c = triton_int.Config(64 if m > 32 else 32, bn, 128, 1, warps, st, magic=True,
                                      wa=True, pf=1, dq=4, pair=two)
                f = [lambda w=w, c=c: triton_int.run(x, w, None, c) for w in ws]
                for on in (True, False):
                    with _launch(on):
                        t = sorted(gpu_timing.graph_us(f, 2 * len(f), 20, list))
                    row[f"bn{bn}_st{st}_pair{int(two)}_pdl{int(on)}"] = [
                        round(t[0], 2), round(t[len(t) // 2], 2), round(t[-1], 2)]
            note(row, args.json)
            del ws
            torch.cuda.empty_cache()


@triton.jit
def _dq_rows(q_ptr, s_ptr, z_ptr, w_ptr, K, NB, stride_qn, stride_sn, stride_zn,
             BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, CS: tl.constexpr):
    """The stored layout's dequantize (4-bit, integer zero points, groups of BK codes) with a
    program looping over a BN-row block's K tiles (loads pipelined), streaming stores (CS)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    for t in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        jb = t * (BK // 2) + tl.arange(0, BK // 2)
        qb = tl.load(q_ptr + rn[:, None] * stride_qn + jb[None, :]).to(tl.int32)
        s, z = triton_dequant._group_params(s_ptr, z_ptr, rn, t, rn >= 0, stride_sn, stride_zn,
                                            4, 1, BN)
        c = tl.reshape(tl.join(qb & 15, qb >> 4), (BN, BK)).to(tl.float32)
        w = ((c - z[:, None]) * s[:, None]).to(w_ptr.dtype.element_ty)
        ptrs = w_ptr + rn[:, None] * K + t * BK + tl.arange(0, BK)[None, :]
        if CS:
            tl.store(ptrs, w, cache_modifier=".cs")
        else:
            tl.store(ptrs, w)


def writes(args, gen) -> None:
    for n, k in ((14336, 4096), (4096, 14336)):
        ws = [int_weight(n, k, 4, 128, gen) for _ in range(max(2, copies(n * k // 2)))]
        out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        src = torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
        mb = n * k * 2 / 1e6  # the bf16 weight, MB
        row = {"part": "writes", "n": n, "k": k, "bf16_MB": round(mb, 1)}
        fill = t_us([lambda o=out: o.fill_(1.0)])
        copy = t_us([lambda o=out, x=src: o.copy_(x)])
        want = triton_dequant.dequantize_triton(ws[0], torch.bfloat16)
        ship = t_us([lambda w=w, o=out: triton_dequant.dequantize_triton(w, torch.bfloat16, o)
                     for w in ws])
        rd = (n * k // 2 + ws[0].scale.numel() * 2 + ws[0].zero.numel()) / 1e6
        row |= {"fill_us": round(fill, 2), "fill_TBps": round(mb / fill, 2),
                "copy_us": round(copy, 2), "copy_TBps": round(2 * mb / copy, 2),
                "dequant_us": round(ship, 2), "dequant_TBps": round((mb + rd) / ship, 2)}
        looped = []
        for bn, warps, st, cs in itertools.product((16, 32, 64), (4, 8), (2, 3), (0, 1)):
            def f(w, bn=bn, warps=warps, st=st, cs=cs, out=out, n=n, k=k):
                return _dq_rows[(n // bn,)](w.qdata, w.scale, w.zero, out, k, k // 2,
                                            w.qdata.stride(0), w.scale.stride(0),
                                            w.zero.stride(0), BN=bn, BK=128, STAGES=st, CS=cs,
                                            num_warps=warps)
            f(ws[0])
            ok = torch.equal(out, want)
            looped.append((round(t_us([lambda w=w: f(w) for w in ws]), 2), bn, warps, st, cs, ok))
        looped.sort()
        row["looped_top4"] = looped[:4]
        row["looped_all_equal"] = all(x[-1] for x in looped)
        note(row, args.json)
        del ws, out, src
        torch.cuda.empty_cache()


def dequant(args, gen) -> None:
    """The one-pass dequantize kernel alone, 3 and 4 bits (g128), both Llama-3-8B MLP shapes:
    time and TB/s of codes + scales + zero points read and the bf16 weight written."""
    for shape in args.shapes or ["14336x4096", "4096x14336"]:
        n, k = map(int, shape.split("x"))
        out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        row = {"part": "dequant", "n": n, "k": k}
        for bits in (4, 3):
            ws = [int_weight(n, k, bits, 128, gen) for _ in range(max(2, copies(n * k // 2)))]
            t = t_us([lambda w=w, o=out: triton_dequant.dequantize_triton(w, torch.bfloat16, o)
                      for w in ws])
            rd = sum(a.numel() * a.element_size() for a in (ws[0].qdata, ws[0].scale, ws[0].zero))
            row |= {f"int{bits}_us": round(t, 2),
                    f"int{bits}_TBps": round((rd + out.numel() * 2) / t / 1e6, 2)}
            del ws
        note(row, args.json)
        del out
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="*", default=["stream", "epi", "blocks"])
    ap.add_argument("--json")
    ap.add_argument("--m", type=int, nargs="*", default=[64, 32, 16], help="cands: batch sizes")
    ap.add_argument("--rb", type=int, nargs="*", default=[0, 64], help="cands: layouts")
    ap.add_argument("--group", type=int, default=128, help="cands: group size")
    ap.add_argument("--bits", type=int, default=4, help="cands: code width (3: stored layout)")
    ap.add_argument("--pf", action="store_true",
                    help="cands: also two tiles in flight (mma); wa: scales a tile ahead")
    ap.add_argument("--dq", action="store_true",
                    help="wa: also the codes unpacked into the dot's fragments (Config.dq = 2)")
    ap.add_argument("--small", action="store_true",
                    help="wa: a short grid (BN 64 / 4 warps, 128 / 8; 4 stages), no tile cands")
    ap.add_argument("--ab", action="store_true",
                    help="cands: mma shapes with reps > 1 also with unpaired rows (mma_ptx.PAIRED)")
    ap.add_argument("--only", help="cands: one kernel family (mma, tile...)")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="cands: only these K splits (a short GPU call)")
    ap.add_argument("--stages", type=int, nargs="*", default=[],
                    help="cands: the tile kernel's dq 4 shapes also with these pipeline depths")
    ap.add_argument("--regs", type=int, nargs="*", default=[],
                    help="cands: the mma shapes also under these ptxas register caps (maxnreg)")
    ap.add_argument("--shapes", nargs="*",
                    help="wa: NxK shapes (default both); cands: NxK shapes (default 14336x4096)")
    ap.add_argument("--bm", type=int, nargs="*", default=[64, 256, 2048], help="blocks: batch sizes")
    ap.add_argument("--rows", type=int, nargs="*", default=[0, 512, 1024, 2048, 4096],
                    help="blocks: rows a block (0: one whole dequantize)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for part in args.parts:
        {"stream": stream, "blocks": blocks, "epi": epi, "cands": cands, "wa": wa,
         "wa_bf16": wa_bf16, "waves": waves, "splitk": splitk, "wide": wide, "pair": pair,
         "permx": permx, "spread": spread, "big": big, "writes": writes,
         "dequant": dequant}[part](args, gen)


if __name__ == "__main__":
    main()
