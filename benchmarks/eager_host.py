"""What memfit's host-side launch work costs an eager (no CUDA graph) int4 model: a
random-weight Llama-3-8B-shaped model with int4 g128 packed linears (decode_gpu.py's), timed
with transformers' eager `generate` (decode tokens/s at batch `--batch`, default 1:
t(1 + N new) - t(1 new)) and one eager prefill forward, in alternating rounds (`--rows`) of

- `sizes`: what memfit ships (memfit.kernels.sizes' integer helpers since session 20, the mma
  kernel's launch constants built once per launch shape since session 21);
- `triton`: Triton's own `triton.cdiv` / `triton.next_power_of_2` patched back into every
  memfit.kernels module that uses the helpers (before session 20);
- `uncached`: the mma kernel's launch constants (asm strings) rebuilt on every call (before
  session 21);
- `noplans`: no launch plans (memfit.kernels.replay; before session 29).

The kernels and their launch shapes are the same in every row: only host-side work differs.
Best of `--rounds` rounds for each; the bf16 model's eager rows first, for scale. Random
weights: speed only.

    python benchmarks/eager_host.py [--layers 32] [--new 32] [--prompt 512] [--rounds 3]
                                    [--batch 1] [--rows uncached sizes triton noplans]
                                    [--json OUT]
    python benchmarks/eager_host.py --profile OUT.txt   # cProfile of one eager decode and prefill
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import inspect
import json
import os
import pkgutil
import pstats
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import decode_gpu
from decode_gpu import SHAPE, TINY, build, decode_tps, to_int4

import memfit.kernels
from memfit.formats.quant_linear import QuantLinear
from memfit.kernels import replay, sizes, triton_mma

CONSTANTS = triton_mma.constants


def _uncached(*args, **kw):
    """triton_mma.constants without its cache (the arguments bound by name, so those added
    after `prefetch` land where `_constants` takes them)."""
    a = inspect.signature(CONSTANTS).bind(*args, **kw)
    a.apply_defaults()
    return triton_mma._constants.__wrapped__(**a.arguments, paired=triton_mma.mma_ptx.PAIRED)


def users() -> list:
    """memfit.kernels modules that bound the helpers at import."""
    out = []
    for info in pkgutil.iter_modules(memfit.kernels.__path__):
        mod = importlib.import_module(f"memfit.kernels.{info.name}")
        if mod is not sizes and (getattr(mod, "cdiv", None) is sizes.cdiv
                                 or getattr(mod, "next_pow2", None) is sizes.next_pow2):
            out.append(mod)
    return out


def use(mods: list, which: str, model=None) -> None:
    """`which`: "sizes" (memfit now), "triton" (Triton's arithmetic), "uncached" (memfit's
    arithmetic, the mma kernel's launch constants rebuilt on every call as before session 21),
    "noplans" (memfit now without its launch plans, memfit.kernels.replay: before session 29;
    `model`'s packed layers drop their plans on every switch)."""
    replay.ENABLED = which != "noplans"
    for mod in model.modules() if model is not None else ():
        if isinstance(mod, QuantLinear):
            mod._drop_cache()
    triton_mma.constants = (_uncached if which == "uncached" else CONSTANTS)
    cdiv, pow2 = ((triton.cdiv, triton.next_power_of_2) if which == "triton"
                  else (sizes.cdiv, sizes.next_pow2))
    for mod in mods:
        if hasattr(mod, "cdiv"):
            mod.cdiv = cdiv
        if hasattr(mod, "next_pow2"):
            mod.next_pow2 = pow2


def prefill_ms(m, prompt: int) -> float:
    ids = torch.randint(0, m.config.vocab_size, (1, prompt), device=decode_gpu.DEV,
                        generator=torch.Generator(device=decode_gpu.DEV).manual_seed(prompt))
    decode_gpu.sync()
    t = time.perf_counter()
    m(ids, use_cache=False, logits_to_keep=1)
    decode_gpu.sync()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="decode batch (rows of the decode step)")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (checks the script)")
    ap.add_argument("--json")
    ap.add_argument("--profile", help="write a cProfile of one decode and one prefill here")
    ap.add_argument("--rows", nargs="+", default=["triton", "sizes"],
                    help="what to alternate: triton, sizes, uncached, noplans (see use())")
    a = ap.parse_args()
    if a.tiny:
        decode_gpu.DEV = "cpu"
    m = build(a.layers, TINY if a.tiny else SHAPE)
    mods = users()
    print("patched modules:", [x.__name__ for x in mods], flush=True)
    best: dict = {}
    with torch.inference_mode():
        if not a.profile:  # the dense model's eager rows, for scale
            prefill_ms(m, a.prompt)
            best["bf16"] = {"decode_tok_s": round(decode_tps(m, a.batch, a.new, None), 2),
                            "prefill_ms": round(min(prefill_ms(m, a.prompt) for _ in range(3)), 2)}
            print(json.dumps({"bf16": best["bf16"]}), flush=True)
        to_int4(m)
        prefill_ms(m, a.prompt)  # warm-up: the chooser's timings and compiles for both rows
        if a.profile:
            decode_tps(m, 1, 4, None)  # warm-up of the decode shapes
            with open(a.profile, "w") as f:
                for name, fn in (("decode", lambda: decode_tps(m, a.batch, a.new, None)),
                                 ("prefill", lambda: prefill_ms(m, a.prompt))):
                    prof = cProfile.Profile()
                    prof.enable()
                    fn()
                    prof.disable()
                    for order in ("tottime", "cumulative"):
                        f.write(f"=== {name}, by {order}\n")
                        pstats.Stats(prof, stream=f).sort_stats(order).print_stats(40)
            with open(a.profile) as f:
                print(f.read()[:6000], flush=True)
            return
        for r in range(a.rounds):
            for which in a.rows if r % 2 == 0 else a.rows[::-1]:
                use(mods, which, m)
                tps = decode_tps(m, a.batch, a.new, None)
                pre = prefill_ms(m, a.prompt)
                row = best.setdefault(which, {"decode_tok_s": 0.0, "prefill_ms": float("inf")})
                row["decode_tok_s"] = max(row["decode_tok_s"], round(tps, 2))
                row["prefill_ms"] = min(row["prefill_ms"], round(pre, 2))
                print(json.dumps({"round": r, "arith": which, "decode_tok_s": round(tps, 2),
                                  f"prefill_P{a.prompt}_ms": round(pre, 2)}), flush=True)
        use(mods, "sizes", m)
    out = {"device": torch.cuda.get_device_name() if decode_gpu.DEV == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "layers": a.layers,
           "new": a.new, "prompt": a.prompt, "batch": a.batch, "best": best}
    decode_gpu.report(out, a.json)


if __name__ == "__main__":
    main()
