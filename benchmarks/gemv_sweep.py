"""Every decode launch shape of memfit's int4 kernels, timed one by one (tuning aid for issue 10).

For each Llama-3-8B linear shape and M in {1, 16}: bf16 cuBLAS, torch's int4 kernel, and each
candidate (memfit.kernels.triton_int.candidates, plus a wider grid with --wide), each checked
against dequantize + cuBLAS on fresh random data first (a shape whose output is off by more than
2e-2 relative is reported as WRONG and not timed). Timing as benchmarks/kernel_speed.py: CUDA-graph
replays over weight copies that overflow the L2, median of 5, µs per call.

    python benchmarks/gemv_sweep.py [--wide] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.kernel_speed import copies, graph_time_us, int_weight, torch_int4
from memfit.kernels import triton_int, triton_words
from memfit.kernels.triton_int import Config

SHAPES = [(14336, 4096), (4096, 14336), (1024, 4096), (4096, 4096)]


def wide(m: int) -> list[Config]:
    out = []
    if m == 1:
        for bn, bk, sk, warps in itertools.product((64, 128, 256), (128, 256), (1, 2, 4, 8), (4, 8)):
            out.append(Config(16, bn, bk, sk, warps, 2, words="fma", shift=False))
            if warps == 4:
                out.append(Config(16, bn, bk, sk, warps, 2, words="fma", shift=True))
    for bn, bk, sk, stages in itertools.product((64, 128), (128, 256), (1, 2, 4, 8), (2, 4)):
        out.append(Config(16, bn, bk, sk, 4, stages, words="dot", shift=False))
        if stages == 2:
            out.append(Config(16, bn, bk, sk, 4, stages, words="dot", shift=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wide", action="store_true", help="a wider grid on 14336x4096")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in SHAPES:
        ws = [int_weight(n, k, 4, 128, gen) for _ in range(copies(n * k // 2))]
        dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
                 for _ in range(copies(n * k * 2))]
        t4 = [torch_int4(n, k, 128, gen) for _ in range(copies(n * k // 2))]
        for m in (1, 16):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
            want = triton_int.run(x, ws[0], None, Config(0, 0, 0)).float()
            base = {"shape": f"{n}x{k}", "M": m,
                    "bf16": graph_time_us([lambda w=w: F.linear(x, w) for w in dense]),
                    "torch_int4": graph_time_us(
                        [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], 128, p[1])
                         for p in t4])}
            cands = triton_int.candidates(m, ws[0])
            if args.wide and (n, k) == SHAPES[0]:
                cands = list(dict.fromkeys(cands + wide(m)))
            res = []
            for c in cands:
                try:
                    got = triton_int.run(x, ws[0], None, c).float()
                    err = ((got - want).norm() / want.norm()).item()
                    if not err < 2e-2:
                        res.append((float("inf"), str(c), f"WRONG {err:.2e}"))
                        continue
                    t = graph_time_us([lambda w=w, c=c: triton_int.run(x, w, None, c) for w in ws])
                    k = triton_words.LAST[0] if c.words else None
                    regs = f" regs {k.n_regs} spills {k.n_spills}" if k is not None else ""
                    triton_words.LAST[0] = None
                    res.append((t, str(c), f"{err:.1e}{regs}"))
                except Exception as e:  # noqa: BLE001 (report and go on: a tuning sweep)
                    res.append((float("inf"), str(c), f"FAILED {type(e).__name__}: {e}"[:200]))
            res.sort()
            row = {**base, "best_us": res[0][0], "best": res[0][1], "all": res}
            rows.append(row)
            print(f"{n}x{k} M={m}: bf16 {base['bf16']:.1f} torch_int4 {base['torch_int4']:.1f} "
                  f"best {res[0][0]:.1f} ({base['bf16'] / res[0][0]:.2f}x bf16) {res[0][1]}",
                  flush=True)
            for t, c, e in res[:6]:
                print(f"    {t:8.1f}  {e}  {c}", flush=True)
            bad = [r for r in res if r[0] == float("inf")]
            for t, c, e in bad[:3]:
                print(f"    !! {e}  {c}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
