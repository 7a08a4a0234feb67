"""Where the host time of one eager packed-linear call goes (CUDA): each layer of the call path,
from the module down to Triton's launcher, timed alone on the same weight and activations.

An eager (no CUDA graph) decode step is bound by the host: the GPU finishes a 4096-wide int4
linear in 4-15 µs, and the host must enqueue the next before then. Rows (µs a call, M rows of
bf16 activations, int4 g128 stored layout; the best of `--rounds` rounds of `--calls` calls, the
host time only: the loop is timed without a synchronize, which follows it):

- `F.linear bf16`: the dense layer, for scale;
- `module`: QuantLinear.__call__ (what transformers calls), with its launch plans
  (memfit.kernels.replay, session 29), and `module, no plans` (MEMFIT_LAUNCH_PLANS=0: before);
- `kernels.linear`, `triton_linear`, `run`, `run_mma`: memfit's layers below it;
- `jit launch`: Triton's `_mma_gemv[grid](...)` with the arguments run_mma built (recorded once);
- `compiled runner`: the compiled kernel's own launcher (`CompiledKernel[grid](*args)`), which
  skips Triton's binding, specialization and cache look-up;
- `torch.empty`: one output allocation.

    python benchmarks/host_launch.py [--shapes 4096x4096 1024x4096] [--m 1 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch
import torch.nn.functional as F

from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.kernels import linear as kernels_linear
from memfit.kernels import replay, triton_int, triton_mma

OPTIONS = ("num_warps", "num_stages", "launch_pdl", "maxnreg", "num_ctas")


def per_call_us(fn, calls: int, rounds: int) -> float:
    """Host µs a call: `calls` calls timed without a synchronize (best of `rounds`)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
        torch.cuda.synchronize()
    return best


class Recorder:
    """Stands in for triton_mma._mma_gemv for one call: keeps its grid and arguments."""

    def __init__(self, fn):
        self.fn, self.seen = fn, None

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.seen = (grid, args, kw)
            return self.fn[grid](*args, **kw)
        return call


def layer(n: int, k: int, group: int) -> QuantLinear:
    q = QuantLinear(k, n, IntFormat(bits=4, group_size=group), bias=False, device="cuda",
                    dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, device="cuda", generator=g))
    q.zero.copy_(torch.randint(0, 256, q.zero.shape, device="cuda", generator=g))
    q.scale.copy_(torch.rand(q.scale.shape, device="cuda", generator=g) * 0.002)
    return q


def rows(n: int, k: int, m: int, group: int, calls: int, rounds: int) -> dict:
    q = layer(n, k, group)
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
    x2 = x.reshape(m, k)
    w = q.kernel_weight()
    with torch.no_grad():
        q(x)  # the chooser's first use (timed search) happens here
        cfg = triton_int.choose(x2, w, None)
        out = {"shape": f"{n}x{k}", "m": m, "group": group, "config": str(cfg)}
        fns = {"F.linear bf16": lambda: F.linear(x, dense),
               "module": lambda: q(x),
               "kernels.linear": lambda: kernels_linear(x, w, None, None),
               "triton_linear": lambda: triton_int.triton_linear(x, w, None),
               "run": lambda: triton_int.run(x2, w, None, cfg),
               "torch.empty": lambda: torch.empty(m, n, device="cuda", dtype=torch.bfloat16)}
        if cfg.words == "mma":
            fns["run_mma"] = lambda: triton_mma.run_mma(
                x2, w, None, cfg.BN, cfg.SPLIT_K, cfg.num_warps, cfg.BK // 128, epi=cfg.epi,
                reps=cfg.reps, prefetch=cfg.num_stages, maxnreg=cfg.regs)
            rec = Recorder(triton_mma._mma_gemv)
            triton_mma._mma_gemv = rec
            try:
                fns["run_mma"]()
            finally:
                triton_mma._mma_gemv = rec.fn
            grid, args, kw = rec.seen
            fns["jit launch"] = lambda: rec.fn[grid](*args, **kw)
            bound = inspect.signature(rec.fn.fn).bind(
                *args, **{a: v for a, v in kw.items() if a not in OPTIONS})
            bound.apply_defaults()
            compiled = triton_mma.LAST[0]
            grid3 = tuple(grid) + (1,) * (3 - len(grid))
            fns["compiled runner"] = lambda: compiled[grid3](*bound.arguments.values())
        for name, fn in fns.items():
            out[name] = round(per_call_us(fn, calls, rounds), 2)
        replay.ENABLED = False
        q._drop_cache()
        out["module, no plans"] = round(per_call_us(lambda: q(x), calls, rounds), 2)
        replay.ENABLED = True
        q._drop_cache()
        out["plans == ordinary"] = bool(torch.equal(q(x), q(x)) and torch.equal(
            q(x), kernels_linear(x, w, None, None)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "1024x4096"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    res = []
    for s in a.shapes:
        n, k = map(int, s.split("x"))
        for m in a.m:
            r = rows(n, k, m, a.group, a.calls, a.rounds)
            print(json.dumps(r), flush=True)
            res.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": res}, f, indent=1)


if __name__ == "__main__":
    main()
