"""What the first use of a packed model costs on a GPU: memfit's chooser checks (and so Triton
compiles) and times every candidate launch shape of each new (M bucket, layer shape), once per
GPU and software versions. A random-weight Llama-3-8B-shaped int4 g128 model (`--layers`; every
layer has the same shapes), transformers' eager `generate` of 2 new tokens after a 32-token
prompt (the prefill's shapes and the decode's; `--batch` prompts at once, `--prompt 1`: every
call at M = batch): wall time of the first call and of a second one,
with the kernel-choice file off (MEMFIT_KERNEL_CHOICES=0) and, for a cold start, a fresh Triton
cache (`--fresh-triton-cache`). Run it once per MEMFIT_COMPILE_THREADS setting, each in its own
process; it prints the choices and their timed µs so runs can be compared.

    MEMFIT_COMPILE_THREADS=1 python benchmarks/first_use.py --fresh-triton-cache [--json OUT]
    [MEMFIT_KERNEL_SEARCH=full] python benchmarks/first_use.py --batch 4 --prompt 1 ...
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=1)
ap.add_argument("--prompt", type=int, default=32)
ap.add_argument("--batch", type=int, default=1, help="prompts generated together")
ap.add_argument("--fresh-triton-cache", action="store_true")
ap.add_argument("--json")
a = ap.parse_args()
os.environ["MEMFIT_KERNEL_CHOICES"] = "0"
if a.fresh_triton_cache:  # before Triton is imported
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")

import torch

import decode_gpu
from decode_gpu import SHAPE, build, sync, to_int4

from memfit.kernels import triton_int


def main() -> None:
    m = build(a.layers, SHAPE)
    to_int4(m)
    ids = torch.randint(0, m.config.vocab_size, (a.batch, a.prompt), device=decode_gpu.DEV,
                        generator=torch.Generator(device=decode_gpu.DEV).manual_seed(0))
    walls = []
    with torch.inference_mode():
        for _ in range(2):
            sync()
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
            sync()
            walls.append(round(time.perf_counter() - t, 2))
    picks = {triton_int.choices.shape_key(k): {"best_us": v[0][0], "config": str(v[0][1]),
                                               "timed": len(v)}
             for k, v in triton_int.TIMES.items()}
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "compile_threads": triton_int.compile_threads(),
           "cpus": len(os.sched_getaffinity(0)), "batch": a.batch,
           "search": os.environ.get("MEMFIT_KERNEL_SEARCH", "shortlist"), "first_call_s": walls[0],
           "second_call_s": walls[1], "shapes_chosen": len(picks), "picks": picks}
    decode_gpu.report(out, a.json)


if __name__ == "__main__":
    main()
