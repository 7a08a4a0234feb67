"""Where a batch-1 decode step's time goes, and tokens/s side by side in one run: the random-weight
Llama-3-8B-shaped model of decode_gpu.py, bf16 and int4 g128, through memfit.decode.greedy_static
with transformers' forward in the graph (`hf-graph`, the previous loop) and with memfit's own
step (`native`, memfit.fastdecode; int4 rows with and without the tiled weight layout,
MEMFIT_TILE_ROWS=64 / 0, in --quick and for the int4 lm_head); for int4 also with the tensor-core decode kernel left out of
the per-shape choice (MEMFIT_TRITON_MMA=0 as an in-process switch: triton_int.MMA = False and the
choice cache cleared), and with the lm_head quantized to int4 g128 too; memfit's step with and
without programmatic dependent launch (memfit.kernels.pdl, MEMFIT_PDL=0 as an in-process switch).

tok/s: as decode_gpu.py's loop rows (synchronized wall time of N graph replays after the first
token, best of 2). Profile: torch.profiler over `--prof-steps` graph replays (started and stopped
from the on_token callback, which synchronizes after each step), CUDA kernels grouped by name:
launches per step and device µs per step; `kernel_ms` is the sum of kernel times per step, to set
against the wall time per step (the difference is launch gaps and idle time).

    python benchmarks/decode_profile.py [--layers 32] [--new 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# time the kernel candidates in this process (the cells and chooser tables report them), never
# take a choice kept on disk by an earlier run (memfit.kernels.choices)
os.environ.setdefault("MEMFIT_KERNEL_CHOICES", "0")

sys.path.insert(0, os.path.dirname(__file__))
import decode_gpu
from decode_gpu import SHAPE, TINY, build, to_int4

from memfit.decode import greedy_static


def _pdl(on: bool) -> None:
    from memfit.kernels import pdl
    pdl.ENABLED = None if on else False  # None: probe again (on where it works)


def _mma(on: bool) -> None:
    from memfit.kernels import triton_int
    triton_int.MMA = on
    triton_int._CHOICE.clear()


def run_row(m, batch, new, native, prof_steps, fuse=False):
    ids = torch.randint(0, m.config.vocab_size, (batch, 32), device=decode_gpu.DEV,
                        generator=torch.Generator(device=decode_gpu.DEV).manual_seed(batch))
    best = None
    for _ in range(2):
        t: dict = {}
        got = greedy_static(m, ids, 1 + new, timings=t, native=native, fuse=fuse)
        best = t["decode_s"] if best is None else min(best, t["decode_s"])
    prof = None
    if prof_steps and decode_gpu.DEV == "cuda":
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CUDA])
        state = {"n": 0}

        def on_token(_tok):
            state["n"] += 1
            if state["n"] == 3:
                torch.cuda.synchronize()
                prof.start()
            elif state["n"] == 3 + prof_steps:
                torch.cuda.synchronize()
                prof.stop()

        greedy_static(m, ids, 4 + prof_steps + 1, native=native, on_token=on_token, fuse=fuse)
    return batch * new / best, best / new, got, prof


def kernel_table(prof, steps: int, top: int = 14) -> dict:
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        if dev_us <= 0:
            continue
        rows.append({"kernel": e.key[:90], "per_step": e.count / steps, "us_per_step": dev_us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    launches = sum(r["per_step"] for r in rows)
    return {"kernel_ms": total / 1e3, "launches_per_step": launches, "top": rows[:top]}


def chooser_table() -> list:
    """Per (M bucket, shape) the chooser timed: the best time of each kernel family."""
    from memfit.kernels import triton_int
    out = []
    for key, times in triton_int.TIMES.items():
        best: dict = {}
        for us, c in times:
            fam = ("cuBLAS" if c.BM == 0 else c.words or ("gemv" if c.gemv else "byte-mm"))
            if fam not in best:
                best[fam] = {"us": us, "cfg": f"BN{c.BN} BK{c.BK} SK{c.SPLIT_K} w{c.num_warps}"}
        r = {"m": key[0], "shape": list(key[1]), "best": best}
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prof-steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for the JSON rows")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (checks the script)")
    ap.add_argument("--skip-hf-graph", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="bf16 and int4 native rows only (batch 1, and 16 with --batch16)")
    ap.add_argument("--batch16", action="store_true", help="--quick: batch 16 rows too")
    ap.add_argument("--int4-only", action="store_true",
                    help="--quick: the int4 rows of the tiled layout only")
    args = ap.parse_args()
    if args.tiny:
        decode_gpu.DEV = "cpu"
    m = build(args.layers, TINY if args.tiny else SHAPE)
    rows, refs, choices = [], {}, []

    def row(name, batch, native, prof_steps=args.prof_steps, fuse=False):
        tps, step_s, got, prof = run_row(m, batch, args.new, native, prof_steps, fuse)
        key = (name.split()[0], batch)
        if key not in refs:
            ids = torch.randint(0, m.config.vocab_size, (batch, 32), device=decode_gpu.DEV,
                                generator=torch.Generator(device=decode_gpu.DEV).manual_seed(batch))
            refs[key] = m.generate(ids[:1], max_new_tokens=1 + args.new,
                                   min_new_tokens=1 + args.new, do_sample=False,
                                   pad_token_id=0)[0, 32:]
        match = int((refs[key] == got[0]).long().cumprod(0).sum())
        r = {"row": name, "batch": batch, "tok_s": round(tps, 1), "step_ms": round(step_s * 1e3, 3),
             f"match_hf_generate_of_{1 + args.new}": match}
        if prof is not None:
            r["profile"] = kernel_table(prof, prof_steps)
        rows.append(r)
        print(json.dumps(r), flush=True)

    with torch.inference_mode():
        if args.quick:  # the target rows only, int4 with and without the tiled layout
            if not args.int4_only:
                row("bf16 native pdl=on", 1, True)
                if args.batch16:
                    row("bf16 native", 16, True, prof_steps=0)
            to_int4(m)
            for rb in (64,) if args.int4_only else (64, 0):
                os.environ["MEMFIT_TILE_ROWS"] = str(rb)
                row(f"int4 native tile={rb}", 1, True)
                if args.batch16 and rb:  # (the loop built at batch 16 is kept for the next row)
                    row(f"int4 native tile={rb}", 16, True, prof_steps=0)
            os.environ["MEMFIT_TILE_ROWS"] = "64"
            choices = chooser_table()
        for prec in () if args.quick else ("bf16", "int4"):
            if prec == "int4":
                to_int4(m)
            if not args.skip_hf_graph:
                row(f"{prec} hf-graph", 1, False)
            _pdl(True)
            row(f"{prec} native pdl=on", 1, True)
            if prec == "int4":
                choices = chooser_table()
            _pdl(False)
            row(f"{prec} native pdl=off", 1, True)
            _pdl(True)
            if prec == "int4":
                _mma(False)
                row("int4 native mma=off", 1, True)
                _mma(True)
            row(f"{prec} native", 16, True, prof_steps=0)
        # the lm_head in int4 g128 too
        from memfit.formats.grid import IntFormat
        from memfit.formats.quant_linear import QuantLinear
        head = m.lm_head
        dev = decode_gpu.DEV
        q = QuantLinear(head.in_features, head.out_features, IntFormat(bits=4, group_size=128),
                        bias=False, device=dev, dtype=torch.bfloat16)
        g = torch.Generator(device=dev).manual_seed(2)
        q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, device=dev, generator=g))
        q.zero.copy_(torch.randint(0, 256, q.zero.shape, device=dev, generator=g))
        q.scale.copy_(torch.rand(q.scale.shape, device=dev, generator=g) * 0.002)
        m.lm_head = q
        for rb in (64, 0):
            os.environ["MEMFIT_TILE_ROWS"] = str(rb)
            row(f"int4+head native tile={rb}", 1, True)
        os.environ.pop("MEMFIT_TILE_ROWS")
    head_info = {"device": torch.cuda.get_device_name() if decode_gpu.DEV == "cuda" else "cpu",
                 "torch": torch.__version__, "triton": __import__("triton").__version__,
                 "transformers": __import__("transformers").__version__,
                 "layers": args.layers, "new_tokens": args.new,
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if decode_gpu.DEV == "cuda" else None}
    print(json.dumps(head_info))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
            json.dump({"head": head_info, "rows": rows, "chooser": choices}, f, indent=1)
    print("\nrow | batch | tok/s | step ms | kernel ms | launches/step | match")
    for r in rows:
        p = r.get("profile", {})
        print(f"{r['row']} | {r['batch']} | {r['tok_s']} | {r['step_ms']} | "
              f"{p.get('kernel_ms', float('nan')):.3f} | {p.get('launches_per_step', 0):.0f} | "
              f"{r[f'match_hf_generate_of_{1 + args.new}']}")


if __name__ == "__main__":
    main()
