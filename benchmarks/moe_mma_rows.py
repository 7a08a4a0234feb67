"""Routed 4-bit experts at decode through the dense path's M = 1 tensor-core kernel
(memfit.kernels.triton_moe.moe_mma, a program per routed row) against the routed GEMV
(`_moe_gemv`, a program per expert serving all its rows) on one GPU: a random-weight
Mixtral-8x7B-shaped model (benchmarks/moe_decode.py's `build`, int4 g128 random codes).

Rows: the gate and down projections alone for R = 1-64 routed rows (ids r mod 8: distinct
experts up to 8 rows), each form (moe_mma with the pairs as the grid's first axis or its
last; MMA_PAIRS_FIRST picks the shipped one), µs a call in a CUDA graph that calls every
layer's in turn (so no expert's weights are still in the L2 from the call before), the bytes
of the experts read per µs; one expert's gate projection through memfit's dense int4 path at
M = 1 (the same kernel, its own launch, one weight: L2-flattered) and bf16 cuBLAS; decode
tokens/s at batch 1, 4 and 16 in memfit's CUDA-graph decode loop, bf16 routed experts, then
int4 with each form (and moe_mma for every step). Every moe_mma output is checked against
the routed GEMV's (relative error printed). `--splits`: only moe_mma's K splits, 1-8 rows.

    python benchmarks/moe_mma_rows.py [--layers 16] [--splits] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loop_tps_batch(m, new: int, batch: int, prompt: int = 32) -> float:
    """Decode tokens/s (all rows) of memfit's CUDA-graph loop, best of 2."""
    from memfit.decode import greedy_static

    ids = torch.randint(0, m.config.vocab_size, (batch, prompt), device="cuda")
    best = None
    for _ in range(2):
        t: dict = {}
        greedy_static(m, ids, 1 + new, timings=t)
        best = t["decode_s"] if best is None else min(best, t["decode_s"])
    return batch * new / best


def split_sweep(ex, gate, down, out: dict, path: str | None) -> None:
    """µs a call of moe_mma's kernel at each K split, 1-8 routed rows, the launch shape the
    dense chooser took for the expert's shape otherwise."""
    from benchmarks.moe_decode import graph_us
    from memfit.kernels import triton_int
    from memfit.kernels.triton_mma import run_mma
    from memfit.kernels.triton_moe import mma_offsets

    for name, t in (("gate", gate), ("down", down)):
        x = torch.randn(8, t.shape[1], device="cuda", dtype=torch.bfloat16)
        cfg = triton_int.choose(x[:1], t.first, None)
        out[f"{name}_cfg"] = str(cfg)
        for r in (1, 2, 4, 8):
            ids = torch.arange(r, device="cuda", dtype=torch.int32) % ex.num_experts
            for split in sorted({1, 2, 3, 4, 6, 8, cfg.SPLIT_K}):
                try:
                    us = graph_us(lambda s=split, ids=ids, xr=x[:r], t=t, c=cfg: run_mma(
                        xr, t.first, None, c.BN, s, c.num_warps, c.BK // 128, epi=c.epi,
                        reps=c.reps, prefetch=c.num_stages, route=(ids, mma_offsets(t), 1, 2)))
                except ValueError:
                    continue
                out[f"{name}_r{r}_split{split}_us"] = us
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in out.items() if k.startswith(name)}), flush=True)
    if path:
        Path(path).write_text(json.dumps(out, indent=1))


def main() -> None:
    import memfit.kernels.triton_moe as tm
    from benchmarks.moe_decode import build, graph_us, to_int4
    from memfit.kernels import linear
    from memfit.moe import unfuse_experts_

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--splits", action="store_true", help="only time moe_mma's K splits")
    a = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers}
    m = build(a.layers)
    unfuse_experts_(m)
    os.environ["MEMFIT_MOE_ROUTED"] = "1"
    for b in (1, 4, 16):
        out[f"bf16_routed_b{b}_tps"] = loop_tps_batch(m, a.new, b)
    to_int4(m)
    print(json.dumps(out), flush=True)
    ex = m.model.layers[0].mlp.experts
    with torch.no_grad():  # one routed call builds the int4 experts' tables
        m(torch.zeros(1, 1, dtype=torch.long, device="cuda"))
    gate, _, down = ex._tables
    per = gate.shape[0] * gate.shape[1] // 2 * (1 + 2.5 / 128)  # an expert's codes, scales, zeros
    if a.splits:
        return split_sweep(ex, gate, down, out, a.json)
    x1 = torch.randn(1, gate.shape[1], device="cuda", dtype=torch.bfloat16)
    out["dense_path_one_expert_gate_us"] = graph_us(lambda: linear(x1, gate.first))
    w = torch.randn(gate.shape, device="cuda", dtype=torch.bfloat16)
    out["bf16_one_expert_gate_us"] = graph_us(lambda w=w: x1 @ w.T)
    del w
    for r in (1, 2, 4, 8, 16, 32, 64):
        ids = torch.arange(r, device="cuda", dtype=torch.int32) % ex.num_experts
        x = torch.randn(r, gate.shape[1], device="cuda", dtype=torch.bfloat16)
        h = torch.randn(r, down.shape[1], device="cuda", dtype=torch.bfloat16)
        ref = tm.moe_gemv(x, ids, gate).float()
        got = tm.moe_mma(x, ids, gate).float()
        out[f"r{r}_rel_err"] = ((got - ref).norm() / ref.norm()).item()
        first = tm.MMA_PAIRS_FIRST
        for form in ("gemv", "mma_pairs_first", "mma_pairs_last"):
            tm.MMA_PAIRS_FIRST = form == "mma_pairs_first"
            for name, j, v in (("gate", 0, x), ("down", 2, h)):
                tabs = [layer.mlp.experts._tables[j] for layer in m.model.layers]
                f = tm.moe_gemv if form == "gemv" else tm.moe_mma

                def every(f=f, v=v, ids=ids, tabs=tabs):
                    for t in tabs:
                        f(v, ids, t)
                us = graph_us(every, calls=4) / len(tabs)
                out[f"{name}_r{r}_{form}_us"] = us
                out[f"{name}_r{r}_{form}_TBps"] = min(r, ex.num_experts) * per / us / 1e6
        tm.MMA_PAIRS_FIRST = first
        print(json.dumps({k: v for k, v in out.items() if f"_r{r}_" in k}), flush=True)
    dup = tm.MMA_DUP
    for b in (1, 4, 16):  # the routed GEMV, moe_mma where the rows name mostly distinct
        for form, flag, tm.MMA_DUP in (("gemv", False, dup), ("mma", True, dup),  # experts, and
                                       ("mma_all", True, 1e9)):  # moe_mma for every step
            if b == 1 and form == "mma_all":
                continue
            tm.MMA_ROWS = flag
            out[f"int4_routed_b{b}_{form}_tps"] = loop_tps_batch(m, a.new, b)
    tm.MMA_DUP = dup
    tm.MMA_ROWS = True
    print(json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
