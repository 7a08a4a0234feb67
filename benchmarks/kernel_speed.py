"""GPU kernels side by side, one run: memfit's Triton int4/int8 linear vs bf16 cuBLAS vs torch's
int4 kernel (`aten._weight_int4pack_mm`), and 2:4 sparse (cuSPARSELt) vs dense, on Llama-3-8B
linear shapes, M in {1, 4, 16, 64, 256, 2048}.

Timing: each cell is CUDA-graph replays of CALLS calls that cycle over enough weight copies to
overflow the 60 MB L2 (so every call reads its weight from HBM, as in a real model), timed with
CUDA events: the median of 6 replays after warm-up, divided by CALLS; the columns of a cell
replay their graphs in turns (forward, then backward), so a device that slows while it runs (the
clocks under compute-bound GEMMs) slows every column alike; `bf16_replays` shows the drift.
Effective bandwidth counts the weight bytes (+ activations and output) once per call. memfit's
launch shape per (M, shape) is the one its kernel chose by timing its candidates
(memfit.kernels.triton_int.choose).

    python benchmarks/kernel_speed.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from memfit.kernels import gpu_timing, launch_shapes, triton_int
from memfit.kernels.packing import pack
from memfit.kernels.weights import IntWeight, tile

# time the kernel candidates in this process (the cells report them), never take a choice kept
# on disk by an earlier run (memfit.kernels.choices)
os.environ.setdefault("MEMFIT_KERNEL_CHOICES", "0")
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
MS = [1, 4, 16, 64, 256, 2048]
CALLS = 20
REPLAYS = 6  # per column, in turns with the others
L2_BYTES = 60 << 20


def graph_time_us(fns) -> float:
    """Median µs per call of `fns` (a list, called in turn), from CUDA-graph replays."""
    for f in fns:  # warm-up outside the graph (kernel choice, compilation)
        f()
    torch.cuda.synchronize()
    return gpu_timing.graph_us(fns, CALLS, REPLAYS, statistics.median)


def copies(nbytes: int) -> int:
    return max(1, min(8, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def int_weight(n, k, bits, group, gen) -> IntWeight:
    ng = -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, ng, generator=gen) * 0.01 + 1e-3).half()
    zero = pack(torch.randint(0, 2**bits, (n, ng), generator=gen, dtype=torch.uint8), bits)
    return IntWeight(pack(codes, bits).cuda(), scale.cuda(), zero.cuda(), (n, k), bits, group, "int")


def torch_int4(n, k, group, gen):
    """(packed, scales_and_zeros) for aten._weight_int4pack_mm, or None if this torch lacks it."""
    try:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32).cuda()
        packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.rand(k // group, n, 2, generator=gen).to(torch.bfloat16).cuda()
        return w, sz
    except (RuntimeError, AttributeError) as e:
        print(f"torch int4 kernel unavailable: {e}", file=sys.stderr)
        return None


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _short(c) -> str:
    """A launch shape's fields that differ from Config's defaults."""
    d = triton_int.Config(0, 0, 0)
    keep = {f: v for f, v in vars(c).items() if f in ("BM", "BN", "BK") or v != getattr(d, f)}
    return " ".join(f"{f}={v}" for f, v in keep.items())


def bench_shape(n, k, ms, gen, out=None, only3=False) -> list[dict]:
    """Every column for NxK at each M; only3: bf16 and the 3-bit column alone."""
    rows = []
    dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
             for _ in range(copies(n * k * 2))]
    q3 = [int_weight(n, k, 3, 128, gen) for _ in range(copies(n * k * 3 // 8))]
    q4 = {} if only3 else {g: [int_weight(n, k, 4, g, gen) for _ in range(copies(n * k // 2))]
                           for g in (128, 64)}
    q8 = [] if only3 else [int_weight(n, k, 8, k, gen) for _ in range(copies(n * k))]
    t4 = [None] if only3 else [torch_int4(n, k, 128, gen) for _ in range(copies(n * k // 2))]
    sparse = None
    try:
        from torch.sparse import to_sparse_semi_structured
        if not only3:
            mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(n, k // 4).cuda()
            sparse = [to_sparse_semi_structured(d * mask) for d in dense]
    except (RuntimeError, ImportError) as e:
        print(f"2:4 sparse unavailable: {e}", file=sys.stderr)
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        cell = {"shape": f"{n}x{k}", "M": m}
        t0 = time.perf_counter()
        cols = {"bf16": [lambda w=w, x=x: F.linear(x, w) for w in dense]}
        for g, ws in q4.items():
            cols[f"memfit_int4_g{g}"] = [lambda w=w, x=x: triton_int.triton_linear(x, w) for w in ws]
        tiled = {}
        for g, ws in q4.items():  # the decode loop's tiled layout (batch 1: the mma kernel)
            if m == 1 or (m <= 16 and g % 128 == 0) or 16 < m <= launch_shapes.WA_MAX_M:
                tiled[g] = [tile(w, 64) for w in ws]
                cols[f"memfit_int4_g{g}_tiled"] = [lambda w=w, x=x: triton_int.triton_linear(x, w)
                                                   for w in tiled[g]]
        if q8:
            cols["memfit_int8"] = [lambda w=w, x=x: triton_int.triton_linear(x, w) for w in q8]
        # 3 bits outside memfit's decode loop (the loop widens them to 4 bits once): the byte GEMV,
        # the tile kernel, dequantize + cuBLAS or widen + a 4-bit kernel, as the chooser times them
        cols["memfit_int3_g128"] = [lambda w=w, x=x: triton_int.triton_linear(x, w) for w in q3]
        if t4[0] is not None:
            cols["torch_int4_g128"] = [
                lambda p=p, x=x: torch.ops.aten._weight_int4pack_mm(x, p[0], 128, p[1]) for p in t4]
        if sparse is not None and m >= 16:  # cuSPARSELt needs >= 16 rows (pads less poorly)
            cols["sparse24_bf16"] = [lambda w=w, x=x: F.linear(x, w) for w in sparse]
        for fns in cols.values():  # the chooser's first timings and compilation, before any cell
            for f in fns:
                f()
        torch.cuda.synchronize()
        # every column's graph replayed in turns (gpu_timing.graph_us_each): clocks that sink
        # during the cell (M = 2048: bf16 read 312 µs first and 349 last when timed one column
        # after another, session 41) slow every column alike
        reps = gpu_timing.graph_us_each(list(cols.values()), lambda fns: CALLS, REPLAYS, list,
                                        alive=len(cols))
        for name, t in zip(cols, reps):
            cell[name] = statistics.median(t)
        cell["bf16_replays"] = [round(t, 2) for t in reps[0]]  # in time order: the drift
        for g, ws in q4.items():
            cell[f"cfg_g{g}"] = str(triton_int.choose(x, ws[0], None))
            if g in tiled:
                cell[f"cfg_g{g}_tiled"] = str(triton_int.choose(x, tiled[g][0], None))
        cell["cfg_int3"] = str(triton_int.choose(x, q3[0], None))
        del tiled
        wbytes = n * k // 2 + n * (-(-k // 128)) * 2.5
        if q4:
            cell["int4_g128_TBps"] = (wbytes + 2 * m * (k + n)) / cell["memfit_int4_g128"] / 1e6
        cell["wall_s"] = round(time.perf_counter() - t0, 1)  # incl. the chooser's first timings
        # every candidate's time per chooser key of this M (which families ever win)
        cell["timed"] = {str(key): [(t, _short(c)) for t, c in v[:8]] + [("of", len(v))]
                         for key, v in triton_int.TIMES.items() if key[0] == _bucket(m)}
        rows.append(cell)
        print(json.dumps(cell), flush=True)
        if out:  # after every cell: a run stopped at its time limit keeps what it measured
            with open(out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    return rows


def ceilings() -> dict:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_time_us([lambda: b.copy_(a)])
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = graph_time_us([lambda: x @ x])
    return {"copy_TBps": 2 * a.numel() / t / 1e6, "bf16_TFLOPs": 2 * 8192**3 / tm / 1e6}


def table(rows) -> str:
    keys = ["memfit_int4_g128", "memfit_int4_g128_tiled", "memfit_int4_g64", "memfit_int4_g64_tiled",
            "memfit_int8", "memfit_int3_g128", "torch_int4_g128", "sparse24_bf16"]
    out = ["| shape (out x in) | M | bf16 µs | " + " | ".join(f"{k} µs (x bf16)" for k in keys)
           + " | int4 g128 / torch int4 | int4 g128 TB/s |",
           "|---|---:|---:|" + "---:|" * len(keys) + "---:|---:|"]
    for r in rows:
        cells = []
        for k in keys:
            cells.append(f"{r[k]:.1f} ({r['bf16'] / r[k]:.2f}x)" if k in r else "n/a")
        vs = f"{r['torch_int4_g128'] / r['memfit_int4_g128']:.2f}x" if "torch_int4_g128" in r else "n/a"
        out.append(f"| {r['shape']} | {r['M']} | {r['bf16']:.1f} | " + " | ".join(cells)
                   + f" | {vs} | {r.get('int4_g128_TBps', float('nan')):.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="14336x4096 only, M in {1, 16, 64, 2048}")
    ap.add_argument("--json", default=None, help="write the raw cells here")
    ap.add_argument("--shapes", nargs="*", help="only these NxK shapes (e.g. 14336x4096)")
    ap.add_argument("--m", type=int, nargs="*", help="only these M")
    ap.add_argument("--int3", action="store_true", help="bf16 and the 3-bit column only")
    args = ap.parse_args()
    import triton
    gen = torch.Generator().manual_seed(0)
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv), **ceilings()}
    print(json.dumps(head), flush=True)
    shapes, ms = (SHAPES[2:3], [1, 16, 64, 2048]) if args.quick else (SHAPES, MS)
    if args.shapes:
        shapes = [s for s in SHAPES if f"{s[0]}x{s[1]}" in args.shapes]
    ms = args.m or ms
    rows = [r for n, k in shapes for r in bench_shape(n, k, ms, gen, args.json, args.int3)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head": head, "rows": rows}, f, indent=1)
    print(json.dumps(head))
    print(table(rows))


if __name__ == "__main__":
    main()
