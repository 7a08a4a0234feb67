"""Decode speed and peak memory of the default model on this CPU: dense float32 vs memfit packed
artifacts, each in its own process (so peak RSS is that model's alone), side by side.

Decode tokens/s = new tokens / (time(generate 1 + N) - time(generate 1)): the prompt's prefill is
excluded; greedy, no stopping (min_new_tokens = N); best of `--repeat`. Peak RSS is the process's
high-water mark (ru_maxrss) after loading and decoding.

    python benchmarks/decode_cpu.py [--new 32] [--threads 2] [--recipes w4g64 w8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(spec: str, dtype: str, new: int, repeat: int, threads: int) -> dict:
    import resource

    import torch

    from memfit.models import load_model
    torch.set_num_threads(threads)
    m = load_model(spec, dtype=dtype)
    model = m.model
    ids = m.tokenizer("The quick brown fox jumps over the lazy dog. " * 4,
                      return_tensors="pt").input_ids[:, :32]

    def gen(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=m.tokenizer.eos_token_id)
        return time.perf_counter() - t0, out

    gen(2)  # warm-up (kernel layouts are prepared on first use)
    best, text = float("inf"), None
    for _ in range(repeat):
        t_long, out = gen(1 + new)
        t_short, _ = gen(1)
        best = min(best, t_long - t_short)
        text = out[0, 32:].tolist()
    return {"model": spec, "dtype": dtype, "decode_tok_s": new / best,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": text}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="*", default=["w4g64", "w8"])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.new, args.repeat, args.threads)))
        return
    work = tempfile.mkdtemp(prefix="memfit-decode-")
    runs = [("default", "float32")]
    for r in args.recipes:
        out = os.path.join(work, r)
        subprocess.run([sys.executable, "-m", "memfit", "compress", "--recipe", r, "--out", out],
                       check=True, capture_output=True)
        runs += [(out, "float32"), (out, "bfloat16")]
    rows = []
    for spec, dtype in runs:
        p = subprocess.run([sys.executable, __file__, "--child", spec, dtype, "--new",
                            str(args.new), "--repeat", str(args.repeat), "--threads",
                            str(args.threads)], check=True, capture_output=True, text=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    base = rows[0]
    print(f"\n| model | dtype | decode tok/s | x fp32 | peak RSS MB | same greedy tokens as fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"])) / len(base["tokens"])
        name = r["model"] if r["model"] == "default" else os.path.basename(r["model"])
        print(f"| {name} | {r['dtype']} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['peak_rss_mb']:.0f} | "
              f"{100 * same:.0f}% |")


if __name__ == "__main__":
    main()
