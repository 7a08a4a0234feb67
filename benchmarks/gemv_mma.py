"""The tensor-core decode kernel (memfit.kernels.triton_mma) against bf16 cuBLAS, torch's int4
kernel and the previous word kernel, every launch shape of it, one run (issue 10 tuning aid).

For each Llama-3-8B linear shape and M in {1, 4, 16} (and group 64 at M = 1 on 14336x4096):
each candidate is checked against dequantize + cuBLAS on random data first (WRONG if off by more
than 2e-2 relative, or any NaN) and timed as benchmarks/kernel_speed.py times (CUDA-graph
replays over weight copies that overflow the L2, median of 5, µs per call). Effective bandwidth
counts the packed weight, scales and zero points once per call.

    python benchmarks/gemv_mma.py [--shapes 0,1,2,3] [--ms 1,4,16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.kernel_speed import ceilings, copies, graph_time_us, int_weight, torch_int4
from memfit.kernels import triton_int, triton_mma
from memfit.kernels.triton_int import Config

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]
OLD = {1: Config(16, 64, 128, 8, 4, 2, words="fma", shift=True),  # last session's M=1 best
       16: Config(16, 128, 128, 4, 4, 2, words="dot", shift=True)}


def time_cfg(x, ws, c, want):
    got = triton_int.run(x, ws[0], None, c).float()
    err = ((got - want).norm() / want.norm()).item()
    if not err < 2e-2 or got.isnan().any():
        return float("inf"), f"WRONG {err:.2e}"
    kern = triton_mma.LAST[0] if c.words == "mma" else None
    regs = f" regs {kern.n_regs} spills {kern.n_spills}" if kern is not None else ""
    t = graph_time_us([lambda w=w: triton_int.run(x, w, None, c) for w in ws])
    return t, f"{err:.1e}{regs}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import triton
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "command": "python " + " ".join(sys.argv), **ceilings()}
    print(json.dumps(head), flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for si in map(int, args.shapes.split(",")):
        n, k = SHAPES[si]
        dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
                 for _ in range(copies(n * k * 2))]
        t4 = [torch_int4(n, k, 128, gen) for _ in range(copies(n * k // 2))]
        groups = (128, 64) if si == 0 else (128,)
        wsets = {g: [int_weight(n, k, 4, g, gen) for _ in range(copies(n * k // 2))]
                 for g in groups}
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
            bf16 = graph_time_us([lambda w=w: F.linear(x, w) for w in dense])
            ti4 = graph_time_us([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], 128, p[1])
                                 for p in t4])
            for g, ws in wsets.items():
                if m > 1 and g < 128:
                    continue
                want = triton_int.run(x, ws[0], None, Config(0, 0, 0)).float()
                res = []
                cands = triton_int.mma_candidates(m, ws[0])
                old = OLD.get(1 if m == 1 else 16)
                for c in cands + [old]:
                    try:
                        t, note = time_cfg(x, ws, c, want)
                    except Exception as e:  # noqa: BLE001 (report and go on: a tuning sweep)
                        t, note = float("inf"), f"FAILED {type(e).__name__}: {e}"[:160]
                    res.append((t, note, str(c) if c is old else f"mma BN={c.BN} SK={c.SPLIT_K} "
                                f"warps={c.num_warps} unroll={c.BK // 128}", c is old))
                best = min(r for r in res if not r[3])
                oldt = [r for r in res if r[3]][0]
                wbytes = n * k // 2 + n * (k // g) * 2.5
                row = {"shape": f"{n}x{k}", "M": m, "group": g, "bf16_us": bf16,
                       "torch_int4_us": ti4, "old_words_us": oldt[0], "mma_us": best[0],
                       "mma_cfg": best[2], "mma_TBps": wbytes / best[0] / 1e6,
                       "x_bf16": bf16 / best[0], "x_torch_int4": ti4 / best[0],
                       "all": [(r[0], r[1], r[2]) for r in sorted(res)]}
                rows.append(row)
                print(f"{n}x{k} M={m} g{g}: bf16 {bf16:.1f} torch_int4 {ti4:.1f} "
                      f"old {oldt[0]:.1f} mma {best[0]:.1f} ({bf16 / best[0]:.2f}x bf16, "
                      f"{ti4 / best[0]:.2f}x torch int4, {row['mma_TBps']:.2f} TB/s) {best[2]}",
                      flush=True)
                for r in sorted(res)[:4]:
                    print(f"    {r[0]:7.1f} {r[1]} {r[2]}", flush=True)
                for r in [r for r in res if r[0] == float("inf")][:2]:
                    print(f"    !! {r[1]} {r[2]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
