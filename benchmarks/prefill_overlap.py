"""Probe (issue 10, M = 2048 >= 0.9x bf16): dequantize + cuBLAS with the next row block's
dequantization running on a second stream while cuBLAS multiplies the current one.

Dequantize + cuBLAS pays a whole write of the dense weight before its GEMM (45 µs of 14336x4096
on an H200, benchmarks/RESULTS.md session 21) and session 10's row blocks only made that write
land in the L2. Here the weight is dequantized `rows` rows at a time into `bufs` reused buffers,
block i+1's dequantization on a side stream, block i's GEMM on the caller's: the dequantize
kernel (memory-bound) fills the SMs the GEMM's last wave leaves idle, and the GEMM's output
columns of each block are written in place (cuBLAS with ldc = out features). The two-stream
form timed is memfit's own (`triton_dequant.dequant_blocks` with `bufs` - 1 blocks ahead).

Every candidate is timed as memfit's chooser times them (a CUDA graph over weight copies past
the L2, the graphs replayed in turns, median of 6) and checked against whole dequantize +
cuBLAS.

    python benchmarks/prefill_overlap.py [--m 2048 1024 512] [--shapes 14336x4096 4096x14336]
                                         [--rows 1024 2048 4096] [--bufs 2 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.kernel_speed import copies, int_weight
from memfit.kernels import gpu_timing
from memfit.kernels.triton_dequant import dequant_blocks, dequantize_triton


def setup(n, k, m, gen):
    """(weight copies past the L2, x, dense copies for bf16 cuBLAS, the reference output) of an
    int4 g128 n x k layer at m tokens."""
    w0 = int_weight(n, k, 4, 128, gen)
    ws = gpu_timing.weight_copies(w0)[: copies(w0.qdata.numel() + 2 * w0.scale.numel())]
    wd = [dequantize_triton(w, torch.bfloat16) for w in ws[:2]]  # bf16 cuBLAS on 2 copies
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return ws, x, wd, F.linear(x, wd[0])


def time_cands(n, k, m, cands: dict, ref, alive: int = 0) -> list[dict]:
    """Each candidate (name -> list of calls, one a weight copy) checked against `ref`, then timed
    as the chooser times (graphs replayed in turns, median of 6), against the first (bf16)."""
    errs = {}
    for name, fns in cands.items():
        y = fns[0]()
        torch.cuda.synchronize()
        errs[name] = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    # every candidate in one batch of graphs replayed in turns unless `alive`: a graph in a
    # later, smaller batch ran on a cooler device and read 4-9% faster (session 43, call 6)
    us = gpu_timing.graph_us_each(list(cands.values()), lambda fns: 2 * len(fns), 6,
                                  statistics.median, alive=alive or len(cands))
    out = []
    for (name, _), t in zip(cands.items(), us):
        out.append({"shape": f"{n}x{k}", "M": m, "cand": name, "us": round(t, 2),
                    "x_bf16": round(us[0] / t, 3), "rel_err": float(f"{errs[name]:.2e}")})
        print(f"{n}x{k} M={m:5d} {name:52s} {t:8.2f} µs  {us[0] / t:5.3f}x bf16  "
              f"err {errs[name]:.1e}", flush=True)
    return out


def run_cells(args, cell, repeat: int = 1) -> None:
    """cell(n, k, m, args, gen) for every --shapes x --m (`repeat` times), rows printed and
    written to --json with the device, date and command."""
    gen = torch.Generator().manual_seed(0)
    rows, t0 = [], time.time()
    for _ in range(repeat):
        for shape, m in itertools.product(args.shapes, args.m):
            n, k = map(int, shape.split("x"))
            rows += cell(n, k, m, args, gen)
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python " + " ".join(sys.argv), "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def cell(n, k, m, args, gen) -> list[dict]:
    ws, x, wd, ref = setup(n, k, m, gen)
    cands = {"bf16 cuBLAS": [lambda d=d: F.linear(x, d) for d in wd],
             "dequantize + cuBLAS": [lambda w=w: F.linear(x, dequantize_triton(w, x.dtype))
                                     for w in ws]}
    for r in [r for r in args.rows if r < n]:
        cands[f"blocks {r}, one stream"] = [lambda w=w, r=r: dequant_blocks(x, w, None, r)
                                            for w in ws]
        for j, nb in enumerate(args.bufs):  # nb buffers: nb - 1 blocks ahead (0: a buffer a
            ahead = (nb or -(-n // r)) - 1  # block, none reused); a count given twice: #j
            cands[f"blocks {r}, {nb or 'all'} buffers, two streams #{j}"] = [
                lambda w=w, r=r, a=ahead: dequant_blocks(x, w, None, r, a) for w in ws]
    return time_cands(n, k, m, cands, ref, args.alive)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[2048])
    ap.add_argument("--shapes", nargs="*", default=["14336x4096", "4096x14336"])
    ap.add_argument("--rows", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--bufs", type=int, nargs="*", default=[2, 3],
                    help="buffers a cell (0: one a block, the whole weight's bytes)")
    ap.add_argument("--repeat", type=int, default=1, help="run every cell this many times")
    ap.add_argument("--alive", type=int, default=0,
                    help="graphs a batch (gpu_timing.graph_us_each; default: all in one)")
    ap.add_argument("--json")
    args = ap.parse_args()
    run_cells(args, cell, args.repeat)


if __name__ == "__main__":
    main()
