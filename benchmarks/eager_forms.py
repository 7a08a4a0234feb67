"""What each dequantize + cuBLAS form of a prefill-sized packed linear costs when called eagerly
(one call after another, as transformers' eager prefill calls it) against the same form
replayed in a CUDA graph (how memfit's chooser times its candidates): the whole weight
dequantized once (`Config(0, 0, 0)`), 4096-row blocks through one reused buffer (`Config(0, 4096,
0)`), and those blocks dequantized two ahead on a second stream (`Config(0, 4096, 0, pf=2)`).

Eager: `--calls` calls back to back over weight copies past the L2, synchronized before and
after, wall µs a call (best of `--rounds`); graph: `kernel_speed.graph_time_us` over the same
copies. A form whose eager time is well above its graph time costs the host more than the GPU.

    python benchmarks/eager_forms.py [--shapes 14336x4096 4096x14336] [--m 256 1024 2048]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.kernel_speed import copies, graph_time_us, int_weight
from memfit.kernels import triton_int
from memfit.kernels.launch_shapes import Config

FORMS = {"whole": Config(0, 0, 0), "blocks 4096": Config(0, 4096, 0),
         "blocks 4096, 2 ahead": Config(0, 4096, 0, pf=2)}


def eager_us(fns, calls: int, rounds: int) -> float:
    """Wall µs a call of `fns` called in turn, synchronized around each round (best round)."""
    for f in fns:
        f()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["14336x4096", "4096x14336"])
    ap.add_argument("--m", nargs="+", type=int, default=[256, 1024, 2048])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for s in a.shapes:
        n, k = map(int, s.split("x"))
        ws = [int_weight(n, k, 4, 128, gen) for _ in range(copies(n * k // 2))]
        for m in a.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            bf16 = [lambda x=x, d=dense: torch.nn.functional.linear(x, d)]
            row = {"shape": s, "M": m, "bf16 eager": round(eager_us(bf16, a.calls, a.rounds), 2),
                   "bf16 graph": round(graph_time_us(bf16), 2)}
            for name, cfg in FORMS.items():
                fns = [lambda v=v, c=cfg, x=x: triton_int.run(x, v, None, c) for v in ws]
                row[f"{name} eager"] = round(eager_us(fns, a.calls, a.rounds), 2)
                row[f"{name} graph"] = round(graph_time_us(fns), 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
