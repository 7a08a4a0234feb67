"""Decode tokens/s at long contexts with memfit's own step (memfit.fastdecode) and a 16-bit or a
quantized KV cache (memfit.kernels.kv_static), side by side in one run: the random-weight
Llama-3-8B-shaped model of decode_gpu.py (32 layers unless --layers), int4 g128 weights (in the
tiled layout at batch 1), batch 1 unless --batch. Each row fills the cache with `context` random
states (the 16-bit cache written directly; the quantized one through its prefill, as a prompt's
states go in), captures the step at that position as one CUDA graph and replays it `--steps`
times (the position advancing: the quantized cache packs a group every `group` steps inside the
graph). tok/s = batch x steps / synchronized wall time, best of 2; KV MiB = the cache's
allocated bytes for `context + steps` positions (the 16-bit cache: 2 x layers x (batch, 8, L,
128) bf16; the quantized: its store at capacity + the rings).

    python benchmarks/decode_kv.py [--contexts 1024 8192 32768] [--kv none int4 int4-g128]
                                   [--layers 32] [--steps 128] [--batch 1 16] [--profile N]
                                   [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("MEMFIT_KERNEL_CHOICES", "0")
sys.path.insert(0, os.path.dirname(__file__))
from decode_gpu import SHAPE, build, to_int4

from memfit import fastdecode
from memfit.kvcache import kv_format


@torch.inference_mode()
def row(m, context: int, kv: str, steps: int, profile: int = 0, batch: int = 1) -> dict:
    fmt = kv_format(kv)
    step = fastdecode.NativeStep(m, batch, context + steps + 4, kv=fmt)
    dev = m.device
    g = torch.Generator(device=dev).manual_seed(context)
    shape = (batch, step.kv_heads, context, step.head_dim)
    with step.packed_groups():
        for i in range(len(step.layers)):
            k = torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
            v = torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
            if fmt is None:
                step.kc[i][:, :, :context].copy_(k)
                step.vc[i][:, :, :context].copy_(v)
            else:
                step.kv[i].prefill(k, v)
        del k, v
        tok = torch.ones(batch, 1, dtype=torch.long, device=dev)
        pos = torch.full((1,), context, dtype=torch.long, device=dev)

        def one():
            nxt = step(tok, pos)
            tok.copy_(nxt[:, None])
            pos.add_(1)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            one()
            one()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        pos.fill_(context)
        with torch.cuda.graph(graph):
            one()
        prof = None
        if profile:  # kernels of `profile` replays (decode_profile.py's table)
            from decode_profile import kernel_table
            from torch.profiler import ProfilerActivity
            with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(profile):
                    graph.replay()
                torch.cuda.synchronize()
            prof = kernel_table(p, profile, top=12)
        best = None
        for _ in range(2):
            pos.fill_(context)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
    if fmt is None:
        kv_bytes = sum(t.numel() * t.element_size() for t in step.kc + step.vc)
    else:
        kv_bytes = sum(c.nbytes() for c in step.kv)
    out = dict(context=context, kv=kv, batch=batch, tok_s=round(batch * steps / best, 1),
               ms_per_token=round(1e3 * best / steps, 3), kv_mib=round(kv_bytes / 2**20, 1))
    print(json.dumps(out), flush=True)
    if prof:
        out["profile"] = prof
        print(json.dumps(prof, indent=1), flush=True)
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--kv", nargs="+", default=["none", "int4", "int4-g128"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--merge", nargs="*", default=[],
                    help="CHANNELSxTOKENS merge launch settings to time in turn (kv_merge.MERGE)")
    ap.add_argument("--profile", type=int, default=0, help="profile N replays a row")
    ap.add_argument("--json")
    a = ap.parse_args()
    m = build(a.layers, SHAPE)
    to_int4(m)
    from memfit.kernels.kv_merge import MERGE
    rows = []
    for setting in a.merge or [None]:
        if setting:
            MERGE["channels"], MERGE["tokens"] = map(int, setting.split("x"))
        for b in a.batch:
            for c in a.contexts:
                for kv in a.kv:
                    rows.append(row(m, c, kv, a.steps, a.profile, b) | {"merge": dict(MERGE)})
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, layers=a.layers, steps=a.steps,
                weights="int4 g128, tiled", rows=rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
