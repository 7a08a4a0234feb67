"""What launch plans do to memfit's own prompt forward: the prompt's forward through
`fastdecode.NativeStep` (batch 1, 4-bit weights tiled, q/k/v and gate/up fused; what `memfit
generate` runs on CUDA before its CUDA-graph loop), four ways in one process:

    off      - fused groups without plans, tiled weights with no prefill plan (session 48)
    groups   - the fused groups keep launch plans
    tiled    - tiled weights keep a prefill bucket plan
    both     - both (shipped since session 49)

Each variant is patched in explicitly, whatever the shipped code does. Default: per variant the
best of `--reps` forwards (device synchronized), then one profiled forward (the CUDA kernels'
summed time, the launch calls, the kernels that take the most time). `--rounds N`: the variants
in turn, N rounds (a host whose speed drifts adds the same to each), medians: session 48 timed
the variants one after another and read a slowdown that timing in turns does not show
(benchmarks/RESULTS.md session 49).

    MEMFIT_KERNEL_CHOICES=0 python benchmarks/ownstep_plans.py [--layers 8] [--prompts 256 512]
        [--rounds 6 --reps 3] [--variants off both]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import decode_gpu
from decode_gpu import SHAPE, TINY, build, to_int4
from prefill import best_ms, drop_caches, prompt_ids, turns_ms

from memfit import fastdecode
from memfit.kernels import linear as kernel_linear
from memfit.kernels import prepare, replay, triton_int

_shipped_group_call = fastdecode._Group.__call__
_shipped_plan = triton_int.plan


def _group_with_plans(self, x):
    if self.kind == "int":
        if not hasattr(self, "_plans"):
            self._plans = prepare(self.weight) if self.weight.qdata.is_cuda else None
        return kernel_linear(x, self.weight, None, self._plans)
    return _shipped_group_call(self, x)


def _group_without_plans(self, x):
    if self.kind == "int":
        return kernel_linear(x, self.weight)
    return _shipped_group_call(self, x)


def _plan_tiled_too(x2, w, bias):
    if x2.shape[0] > replay.MAX_M and w.tile_rows and triton_int.ineligibility(w) is None:
        return triton_int._bucket_plan(x2, w, bias, triton_int.choose(x2, w, bias))
    return _shipped_plan(x2, w, bias)


def _plan_stored_only(x2, w, bias):
    if x2.shape[0] > replay.MAX_M and w.tile_rows and triton_int.ineligibility(w) is None:
        return triton_int.run(x2, w, bias, triton_int.choose(x2, w, bias)), None
    return _shipped_plan(x2, w, bias)


def variant(name: str, groups) -> None:
    """Patch in a variant (explicit either way: not whatever the shipped code does)."""
    fastdecode._Group.__call__ = _group_with_plans if name in ("groups", "both") else \
        _group_without_plans
    triton_int.plan = _plan_tiled_too if name in ("tiled", "both") else _plan_stored_only
    for g in groups:
        g.__dict__.pop("_plans", None)


def shipped() -> None:
    fastdecode._Group.__call__, triton_int.plan = _shipped_group_call, _shipped_plan


def profile(step, ids, pos) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step(ids, pos)
        decode_gpu.sync()
    rows = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: -e.self_device_time_total)
    top = [{"name": e.key[:90], "calls": e.count, "us": round(e.self_device_time_total, 1)}
           for e in rows[:8]]
    cuda_us = sum(e.self_device_time_total for e in rows)
    host = [e for e in p.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                      "cuLaunchKernelEx", "cudaMemsetAsync",
                                                      "cudaMalloc", "cudaFree",
                                                      "cudaStreamSynchronize")]
    return {"cuda_kernels_us": round(cuda_us, 1), "launches": {e.key: e.count for e in host},
            "top": top}


def in_turns(m, step, groups, args) -> dict:
    """Every variant in each of `--rounds` rounds, in turn (prefill.turns_ms)."""
    ids = {p: prompt_ids(m.config.vocab_size, p) for p in args.prompts}
    pos = {p: torch.arange(p, device=decode_gpu.DEV) for p in args.prompts}

    def switch(name: str) -> None:
        variant(name, groups)
        drop_caches(m)
    res = turns_ms({v: (lambda v=v: switch(v), lambda p: step(ids[p], pos[p]))
                    for v in args.variants}, args.prompts, args.rounds, args.reps)
    for v, r in res.items():
        print(v, {k: x for k, x in r.items() if not k.endswith("_all")}, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["off", "groups", "tiled", "both", "off"])
    ap.add_argument("--tiny", action="store_true",
                    help="a small model on the CPU (checks the script)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="instead: this many rounds of every variant in turn (no profile), "
                         "each a warm-up call then --reps timed calls; medians and minima")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.tiny:
        decode_gpu.DEV = "cpu"
    m = build(args.layers, TINY if args.tiny else SHAPE)
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "layers": args.layers, "rows": []}
    with torch.inference_mode():
        to_int4(m)
        drop_caches(m)
        step = fastdecode.NativeStep(m, 1, max(args.prompts) + 1)
        groups = step.qkv + step.gate_up
        with step.packed_groups():
            if args.rounds:
                out["turns"] = in_turns(m, step, groups, args)
            for name in ([] if args.rounds else args.variants):
                variant(name, groups)
                drop_caches(m)
                row = {"variant": name}
                for p in args.prompts:
                    ids = prompt_ids(m.config.vocab_size, p)
                    pos = torch.arange(p, device=decode_gpu.DEV)
                    row[f"P{p}_ms"] = round(best_ms(lambda: step(ids, pos), args.reps), 3)
                    if not args.tiny:
                        row[f"P{p}_profile"] = profile(step, ids, pos)
                out["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k.endswith("_ms")}
                                 | {"variant": name}), flush=True)
        shipped()
    for row in out["rows"]:
        for k, v in row.items():
            if k.endswith("_profile"):
                print(row["variant"], k, v["cuda_kernels_us"], v["launches"])
                for t in v["top"][:5]:
                    print("   ", t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
