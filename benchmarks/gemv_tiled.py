"""Does the tiled layout (memfit.kernels.weights.tile) make the int4 decode kernel faster?

For each Llama-3-8B decode shape, group size and M, every launch shape of the mma decode kernel
(memfit.kernels.triton_int.mma_candidates) is timed on the stored row-by-row layout and on the
tiled one (RB rows per block), as the chooser times them (CUDA graph over weight copies past the
L2, memfit.kernels.gpu_timing). Prints the best of each layout beside bf16 cuBLAS, and the same
best launch shape with the asm's arithmetic removed (`load_only`: the loads' own ceiling).

    python benchmarks/gemv_tiled.py [--rb 64 16] [--only 0 6] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.gemv_probe import load_only
from benchmarks.kernel_speed import copies, graph_time_us, int_weight
from memfit.kernels import gpu_timing, mma_ptx, triton_int, triton_mma
from memfit.kernels.weights import tile

SETTINGS = [  # (out, in, group, M)
    (14336, 4096, 128, 1), (4096, 14336, 128, 1), (6144, 4096, 128, 1), (28672, 4096, 128, 1),
    (4096, 4096, 128, 1), (1024, 4096, 128, 1), (14336, 4096, 64, 1), (14336, 4096, 128, 16),
    (128256, 4096, 128, 1),
]


def best(x, ws, cands):
    out = []
    for c in cands:
        try:
            t = gpu_timing.graph_us([lambda w=w, c=c: triton_mma.run_mma(
                x, w, None, c.BN, c.SPLIT_K, c.num_warps, c.BK // 128) for w in ws],
                2 * len(ws), 3, min)
            out.append((t, c))
        except Exception as e:  # noqa: BLE001 (a probe: note and go on)
            print(f"  {c}: {type(e).__name__} {str(e)[:100]}")
    out.sort(key=lambda p: p[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rb", type=int, nargs="*", default=[64])
    ap.add_argument("--only", type=int, nargs="*", help="indices into SETTINGS")
    ap.add_argument("--json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k, g, m in [SETTINGS[i] for i in args.only] if args.only else SETTINGS:
        nb = n * k // 2
        ws = [int_weight(n, k, 4, g, gen) for _ in range(max(2, copies(nb)))]
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
                 for _ in range(max(2, copies(2 * nb * 2)))]
        bf16 = graph_time_us([lambda d=d, x=x: F.linear(x, d) for d in dense])
        del dense
        want = triton_int.run(x, ws[0], None, triton_int.Config(0, 0, 0)).float()
        cands = triton_int.mma_candidates(m, ws[0])
        row = {"n": n, "k": k, "group": g, "m": m, "bf16_us": round(bf16, 2)}
        for rb in [0] + args.rb:
            wl = ws if rb == 0 else [tile(w, rb) for w in ws]
            got = triton_mma.run_mma(x, wl[0], None, 64, 1, 4, 1).float()
            err = ((got - want).norm() / want.norm()).item()
            times = best(x, wl, cands)
            t, c = times[0]
            lo = None
            if m == 1:  # (M > 1 runs mma_ptx.shared_asm, which has no load-only variant)
                mma_ptx.mma_asm, full = load_only, mma_ptx.mma_asm
                try:
                    lo = best(x, wl, [c])[0][0]
                finally:
                    mma_ptx.mma_asm = full
            tb = (nb + ws[0].scale.numel() * 2 + ws[0].zero.numel()) / t / 1e6
            row[f"rb{rb}"] = {"us": round(t, 2), "x_bf16": round(bf16 / t, 3), "TBps": round(tb, 2),
                              "load_only_us": lo and round(lo, 2), "err": err,
                              "cfg": [c.BN, c.num_warps, c.BK // 128, c.SPLIT_K],
                              "top3": [(round(a, 2), [b.BN, b.num_warps, b.BK // 128, b.SPLIT_K])
                                       for a, b in times[:3]]}
            print(f"{n}x{k} g{g} M={m} RB={rb}: {t:.2f} us ({bf16 / t:.2f}x bf16 {bf16:.1f}, "
                  f"{tb:.2f} TB/s) load-only {lo} err {err:.1e} cfg {row[f'rb{rb}']['cfg']}",
                  flush=True)
            del wl
        rows.append(row)
        del ws
        torch.cuda.empty_cache()
        if args.json:  # after every row: a run stopped at its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
