"""SparseLinear's forward on the CPU: the dense weight rebuilt whole per call (before) or a row
tile at a time (memfit.formats.sparse_rows, now): peak memory and time per call.

One 14336x4096 layer (a Llama-3-8B MLP shape) in each stored kind: 50% bitmask with float32
values, 2:4 with float32 values, 50% bitmask + int4 g64 codes, 2:4 + int4 g64. Each (kind, mode)
runs in a fresh child process: peak = VmHWM after the calls minus the RSS after building the
layer and its input (freed heap trimmed, VmHWM reset there: memfit.eval.memory's helpers; the
child holds glibc's mmap threshold as memfit's loaders do), i.e. the forward's own temporaries;
time = best of 3 calls after one warm-up.
"before" sets memfit.formats.sparse.TILE_WEIGHTS above the layer's size (one tile = the whole
matrix, the previous forward).

    python benchmarks/sparse_forward.py [--m 1 32] [--threads 2] [--kinds "2:4 int4" ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(kind: str, mode: str, m: int, threads: int) -> dict:
    import torch

    from memfit.algos.prune import magnitude_mask
    from memfit.eval.memory import reset_peak_rss, rss_peak_bytes, steady_malloc, trim_heap
    from memfit.formats import grid, sparse
    from memfit.formats.grid import IntFormat, minmax_params, round_params
    from memfit.formats.sparse import SparseIntWeight, SparseLinear

    steady_malloc()  # large tensors in their own mappings, freed at once (as memfit's loaders)
    torch.set_num_threads(threads)
    out, k = 14336, 4096
    g = torch.Generator().manual_seed(0)
    layout = "2:4" if kind.startswith("2:4") else "bitmask"
    with torch.no_grad():
        w = torch.randn(out, k, generator=g)
        keep = magnitude_mask(w, **({"nm": (2, 4)} if layout == "2:4" else {"sparsity": 0.5}))
        if kind.endswith("int4"):
            fmt = IntFormat(bits=4, group_size=64)
            s, z = round_params(*minmax_params(w * keep, fmt), fmt)
            w_hat = grid.dequantize(grid.quantize(w * keep, s, z, fmt), s, z, fmt) * keep
            lin = SparseLinear(SparseIntWeight.from_dense(w_hat, s, z, fmt, layout))
            del w_hat, s, z
        else:
            dense = torch.nn.Linear(k, out, bias=False)
            dense.weight.copy_(w * keep)
            lin = SparseLinear.from_linear(dense, layout)
            del dense
        del w, keep
    if mode == "before":
        sparse.TILE_WEIGHTS = out * k
    elif mode.startswith("tile="):  # another tile size (weights)
        sparse.TILE_WEIGHTS = int(mode[5:])
    x = torch.randn(m, k, generator=g)
    with torch.no_grad():
        if layout == "bitmask":
            lin.row_offsets()  # counted once per module (cached): not a per-call cost
        import gc
        gc.collect()
        trim_heap()
        reset_peak_rss()  # building the layer peaked higher than any forward
        base = rss_peak_bytes() / 2**20
        y = lin(x)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            y = lin(x)
            times.append(time.perf_counter() - t0)
    return {"kind": kind, "mode": mode, "m": m, "peak_over_base_mb": round(rss_peak_bytes() / 2**20 - base, 1),
            "ms_per_call": round(1e3 * min(times), 1), "stored_mb": round(lin.nbytes() / 2**20, 1),
            "y_norm": float(y.norm())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="*", default=["bitmask fp32", "2:4 fp32", "bitmask int4",
                                                   "2:4 int4"])
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), args.threads)))
        return
    rows = []
    for kind in args.kinds:
        for m in args.m:
            for mode in ("before", "tiled"):
                r = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                                    "--child", kind, mode, str(m)], capture_output=True, text=True, check=False)
                if r.returncode:
                    print(r.stderr[-2000:], file=sys.stderr)
                    continue
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| kind | M | stored MB | before: peak MB, ms | tiled: peak MB, ms |\n|---|---:|---:|---|---|")
    for i in range(0, len(rows) - 1, 2):
        a, b = rows[i], rows[i + 1]
        print(f"| {a['kind']} | {a['m']} | {a['stored_mb']} | {a['peak_over_base_mb']}, "
              f"{a['ms_per_call']} | {b['peak_over_base_mb']}, {b['ms_per_call']} |")


if __name__ == "__main__":
    main()
