"""Probes for the int4 kernels' remaining gaps (issue 10), one GPU run:

- pipe: the mma decode kernel (memfit.kernels.triton_mma) with its loads in the loop body and
  Triton's pipeliner keeping num_stages - 1 tiles in flight through cp.async and shared memory
  (PIPE), against its register prefetch (stages 1), tiled layout, M = 1 and 16; each launch
  shape's output checked against dequantize + cuBLAS; the best one again with the arithmetic
  removed (load-only).
- stream: what a plain read of the same bytes reaches (a Triton kernel summing int32 words),
  the ceiling any M = 1 kernel of this size works under.
- epi: the M = 1 kernel's epilogue in its asm (EPI) or in Triton, same run.
- dequant: the one-pass dequantize kernel's launch shapes (its speed sets large M's).
- blocks: dequantize + cuBLAS a block of rows at a time through one reused buffer
  (memfit.kernels.triton_int._dequant_blocks) against one whole dequantize, M = 64..2048.

Timed as the chooser times (CUDA graph over weight copies past the L2, memfit.kernels.gpu_timing).

    python benchmarks/gemv_pipe.py [--parts pipe stream blocks] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.gemv_probe import load_only
from benchmarks.kernels import copies, graph_time_us, int_weight
from memfit.kernels import gpu_timing, mma_ptx, triton_int, triton_mma
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


def setup(n, k, g, m, gen):
    ws = [int_weight(n, k, 4, g, gen) for _ in range(max(2, copies(n * k // 2)))]
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
             for _ in range(max(2, copies(2 * n * k)))]
    bf16 = graph_time_us([lambda d=d: F.linear(x, d) for d in dense])
    del dense
    want = triton_int.run(x, ws[0], None, triton_int.Config(0, 0, 0)).float()
    return ws, x, bf16, want


def pipe(args, gen) -> None:
    for n, k, g, m in ((14336, 4096, 128, 1), (4096, 14336, 128, 1), (14336, 4096, 64, 1),
                       (14336, 4096, 128, 16)):
        ws, x, bf16, want = setup(n, k, g, m, gen)
        wl = [tile(w, 64) for w in ws]
        shapes = []
        for bn, warps in ((64, 4), (128, 4), (256, 8)):
            for sk in ((1, 2, 4) if m > 1 else (2, 4, 8)):
                for st in (1, 3, 4, 6):
                    if m > 1 and (bn > 128 or st == 6):
                        continue
                    shapes.append((bn, warps, sk, st))
        res = []
        for bn, warps, sk, st in shapes:
            f = [lambda w=w: triton_mma.run_mma(x, w, None, bn, sk, warps, 1, st) for w in wl]
            try:
                err = ((f[0]().float() - want).norm() / want.norm()).item()
                res.append((t_us(f), bn, warps, sk, st, err))
            except Exception as e:  # noqa: BLE001 (a probe: note and go on)
                print(f"  {bn} {warps} {sk} {st}: {type(e).__name__} {str(e)[:120]}", flush=True)
        res.sort()
        best = {}
        for r in res:
            best.setdefault(r[4], r)
        lo = {}
        for st, r in best.items():
            mma_ptx.mma_asm, full = load_only, mma_ptx.mma_asm
            try:
                _, bn, warps, sk, _, _ = r
                lo[st] = t_us([lambda w=w: triton_mma.run_mma(x, w, None, bn, sk, warps, 1, st)
                               for w in wl])
            finally:
                mma_ptx.mma_asm = full
        note({"part": "pipe", "n": n, "k": k, "group": g, "m": m, "bf16_us": round(bf16, 2),
              "best_per_stages": {st: {"us": round(r[0], 2), "x_bf16": round(bf16 / r[0], 3),
                                       "cfg": r[1:5], "err": r[5],
                                       "load_only_us": round(lo[st], 2)}
                                  for st, r in sorted(best.items())},
              "top8": [(round(r[0], 2),) + r[1:5] for r in res[:8]],
              "max_err": max(r[5] for r in res)}, args.json)
        del ws, wl
        torch.cuda.empty_cache()


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
        for m in (64, 256, 2048):
            ws, x, bf16, want = setup(n, k, 128, m, gen)
            row = {"part": "blocks", "n": n, "k": k, "m": m, "bf16_us": round(bf16, 2)}
            for rows in (0, 512, 1024, 2048, 4096):
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
                    if c.BK != 128 or c.epi:
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


def dequant(args, gen) -> None:
    """dequantize_triton's launch shapes (rows, K tiles, warps per program), then the
    blocks of M = 256 and 2048 with the best one."""
    from memfit.kernels import triton_dequant
    for n, k in ((14336, 4096), (4096, 14336)):
        ws, x, bf16, want = setup(n, k, 128, 2048, gen)
        res = []
        for bn in (32, 64, 128):
            for nkt in (1, 2, 4):
                for warps in (4, 8):
                    triton_dequant.LAUNCH = (bn, nkt, warps)
                    ok = torch.equal(triton_dequant.dequantize_triton(ws[0], torch.bfloat16),
                                     _ref_dequant(ws[0]))
                    t = t_us([lambda w=w: triton_dequant.dequantize_triton(w, torch.bfloat16)
                              for w in ws])
                    res.append((t, bn, nkt, warps, ok))
        res.sort()
        nbytes = n * k * 2 + n * k // 2
        triton_dequant.LAUNCH = res[0][1:4]
        row = {"part": "dequant", "n": n, "k": k, "best": res[0][1:4],
               "best_us": round(res[0][0], 2), "TBps": round(nbytes / res[0][0] / 1e6, 2),
               "all_exact": all(r[4] for r in res),
               "top6": [(round(r[0], 2),) + r[1:4] for r in res[:6]],
               "was_32_1_4": [round(r[0], 2) for r in res if r[1:4] == (32, 1, 4)]}
        for m in (256, 2048):
            xm = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
            dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda() for _ in range(2)]
            b16 = graph_time_us([lambda d=d: F.linear(xm, d) for d in dense])
            del dense
            for rows in (0, 2048, 4096):
                c = triton_int.Config(0, rows, 0)
                t = t_us([lambda w=w: triton_int.run(xm, w, None, c) for w in ws])
                row[f"m{m}_rows{rows}"] = {"us": round(t, 2), "x_bf16": round(b16 / t, 3)}
            row[f"m{m}_bf16_us"] = round(b16, 2)
        triton_dequant.LAUNCH = (32, 1, 4)
        note(row, args.json)
        del ws
        torch.cuda.empty_cache()


def _ref_dequant(w):
    from memfit.kernels.weights import dequantize
    return dequantize(w).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="*", default=["stream", "blocks", "pipe"])
    ap.add_argument("--json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for part in args.parts:
        {"pipe": pipe, "stream": stream, "blocks": blocks, "dequant": dequant,
         "epi": epi}[part](args, gen)


if __name__ == "__main__":
    main()
