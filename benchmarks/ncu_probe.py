"""The int4 kernels' hardware counters under Nsight Compute (issue 10): what bounds the M = 1 and
M = 16 decode kernels that the chooser picks, against a plain read of the same codes and bf16
cuBLAS, on 14336x4096.

Each case chooses its launch shape first (the chooser's own timing, outside the profiled range),
then runs twice on two weight copies inside cudaProfilerStart/Stop; run under

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats --csv --page details \
        python benchmarks/ncu_probe.py [--cases ...] > ncu.csv

ncu flushes the caches before each profiled kernel (its default cache control), so every kernel
reads its weight from HBM, as the chooser's timing over copies past the L2 does. The printed
lines name each case's launch shape in launch order.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton

from benchmarks.gemv_limits import _read
from benchmarks.kernel_speed import int_weight
from memfit.kernels import triton_int
from memfit.kernels.weights import tile

os.environ.setdefault("MEMFIT_KERNEL_CHOICES", "0")
CASES = ["g128-m1-tiled", "g64-m1-tiled", "g128-m1-stored", "g64-m1-stored", "g128-m16-stored",
         "g64-m16-stored", "read", "bf16-m1", "bf16-m16"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=CASES)
    p.add_argument("--shape", default="14336x4096")
    a = p.parse_args()
    n, k = map(int, a.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    runs = []
    for case in a.cases:
        if case == "read":
            q = [int_weight(n, k, 4, 128, gen).qdata.view(torch.int32).reshape(-1)
                 for _ in range(2)]
            out = torch.empty(132 * 64, dtype=torch.int32, device="cuda")
            nw = q[0].numel()
            for block, warps, per_sm in ((2048, 8, 4), (4096, 8, 2), (1024, 4, 8)):
                grid = 132 * per_sm
                iters = triton.cdiv(triton.cdiv(nw, block), grid)
                fs = [lambda q=qq, b=block, w=warps, g=grid, i=iters, o=out, nw=nw: _read[(g,)](
                    q, o, nw, i, BLOCK=b, CHUNK=1, STAGES=1, num_warps=w) for qq in q]
                runs.append((f"read block {block} warps {warps} grid {grid}", fs))
            continue
        if case.startswith("bf16"):
            m = int(case.split("-m")[1])
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
            d = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda() for _ in range(2)]
            runs.append((case, [lambda d=dd, x=x: F.linear(x, d) for dd in d]))
            continue
        g, m, lay = case.split("-")
        g, m = int(g[1:]), int(m[1:])
        ws = [int_weight(n, k, 4, g, gen) for _ in range(2)]
        if lay == "tiled":
            ws = [tile(w, 64) for w in ws]
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        cfg = triton_int.choose(x, ws[0], None)
        runs.append((f"{case} {cfg}", [lambda w=w, c=cfg, x=x: triton_int.run(x, w, None, c)
                                       for w in ws]))
    for _, fs in runs:  # compile and warm outside the profiled range
        for f in fs:
            f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fs in runs:
        print("CASE", name, flush=True)
        for f in fs:
            f()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
