"""Prefill time (the forward of a P-token prompt, batch 1: the time to the first token) of a
random-weight Llama-3-8B-shaped model on one GPU, side by side in one run: bf16, then int4 g128
(memfit's QuantLinear + Triton kernels) three times: with the packed linears' prefill on
dequantize + cuBLAS only past 128 tokens (the default: `launch_shapes.WA_MAX_M = 128`), the same
with memfit's launch plans off (`memfit.kernels.replay`, MEMFIT_LAUNCH_PLANS=0: each call takes
the ordinary path of checks, choice and Triton's launcher) and with the dq 4 tile kernel
also offered up to 1024 tokens (MEMFIT_PREFILL_TILE=1); then the prompt's forward through
memfit's own decode step (`memfit.fastdecode.NativeStep`, what `memfit generate` runs on CUDA).

Each variant is warmed up once per prompt length (the chooser times its candidates at the first
call of each shape; MEMFIT_KERNEL_CHOICES=0 keeps the on-disk choices out), then the forward is
timed with the CUDA device synchronized around it, best of `--reps` (3). With `--rounds N` the
rows before the own step are timed in turns instead (`turns_ms`: N rounds, medians; the bf16
row on a second copy of the model): the way to compare rows on a host whose speed drifts.
`logits_to_keep=1`: only the last position's logits, as `generate` computes them. Random
weights: speed only.

    MEMFIT_KERNEL_CHOICES=0 python benchmarks/prefill.py [--layers 32] [--prompts 256 512 1024 2048]
        [--reps 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import decode_gpu
from decode_gpu import SHAPE, TINY, build, to_int4

from memfit import fastdecode
from memfit.kernels import launch_shapes, replay, triton_int


def prompt_ids(vocab: int, prompt: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, prompt), device=decode_gpu.DEV,
                         generator=torch.Generator(device=decode_gpu.DEV).manual_seed(prompt))


def best_ms(forward, reps: int) -> float:
    """`forward()` once to warm up (the chooser's timings, compiles), then the best of `reps`
    calls with the device synchronized around each, ms."""
    forward()
    best = float("inf")
    for _ in range(reps):
        decode_gpu.sync()
        t = time.perf_counter()
        forward()
        decode_gpu.sync()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def turns_ms(variants: dict, prompts: list[int], rounds: int, reps: int) -> dict:
    """Variants timed in turns: `variants` maps a name to (switch(), forward(prompt)); each of
    `rounds` rounds switches to every variant in order, runs each prompt's forward once (the
    switch's warm-up: plans, the chooser's timings), then times `reps` forwards with the device
    synchronized around each. A host whose speed drifts during the run adds the same to every
    variant, where variants timed one after another each get their own stretch of it (session
    48 read a slowdown that way which timing in turns does not show: RESULTS.md session 49).
    -> {name: {"P<p>_ms": median, "P<p>_min_ms": min, "P<p>_all": every forward, ms}}."""
    times = {(v, p): [] for v in variants for p in prompts}
    for _ in range(rounds):
        for name, (switch, forward) in variants.items():
            switch()
            for p in prompts:
                forward(p)
                for _ in range(reps):
                    decode_gpu.sync()
                    t = time.perf_counter()
                    forward(p)
                    decode_gpu.sync()
                    times[name, p].append(round((time.perf_counter() - t) * 1e3, 3))
    out: dict = {v: {} for v in variants}
    for (v, p), t in times.items():
        out[v] |= {f"P{p}_ms": round(statistics.median(t), 2), f"P{p}_min_ms": min(t),
                   f"P{p}_all": t}
    return out


def prefill_ms(m, prompt: int, reps: int = 3) -> float:
    ids = prompt_ids(m.config.vocab_size, prompt)
    return best_ms(lambda: m(ids, use_cache=False, logits_to_keep=1), reps)


def step_ms(step, prompt: int, reps: int = 3) -> float:
    """The prompt's forward through memfit's own decode step (fastdecode.NativeStep, what
    `memfit generate` runs on CUDA before its CUDA-graph loop), ms."""
    ids = prompt_ids(step.model.config.vocab_size, prompt)
    pos = torch.arange(prompt, device=decode_gpu.DEV)
    return best_ms(lambda: step(ids, pos), reps)


def drop_caches(m) -> None:
    """Every packed layer's prepared state (its launch plans) dropped: made again on its next
    call, with or without plans as `replay.ENABLED` then says."""
    for mod in m.modules():
        if hasattr(mod, "_drop_cache"):
            mod._drop_cache()


ROWS = (("int4 g128, dequantize + cuBLAS past 128 tokens", 128, True),  # (row, WA_MAX_M, plans)
        ("the same, launch plans off (MEMFIT_LAUNCH_PLANS=0)", 128, False),
        ("int4 g128, tile kernel up to 1024 tokens", 1024, True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--tiny", action="store_true",
                    help="a small model on the CPU (checks the script)")
    ap.add_argument("--reps", type=int, default=3,
                    help="timed forwards a cell (the best is kept), or a round with --rounds")
    ap.add_argument("--rounds", type=int, default=0,
                    help="time the rows in turns over this many rounds (medians; the bf16 row "
                         "on a second copy of the model); the own-step row follows")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.tiny:
        decode_gpu.DEV = "cpu"
    m = build(args.layers, TINY if args.tiny else SHAPE)
    rows = []

    def note(name, ms):
        rows.append({"row": name, **ms})
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                           else "cpu", "torch": torch.__version__, "layers": args.layers,
                           "rows": rows}, f, indent=1)

    keep, keep_plans = launch_shapes.WA_MAX_M, replay.ENABLED

    def use(top: int, plans: bool) -> None:
        """A row's setting; its choices made again only where the candidates change (rows that
        differ in plans alone run the same picks)."""
        if top != launch_shapes.WA_MAX_M:
            triton_int._CHOICE.clear()
        launch_shapes.WA_MAX_M, replay.ENABLED = top, plans
        drop_caches(m)

    with torch.inference_mode():
        if args.rounds:  # every row in turns: the bf16 row on its own copy of the model
            mb = build(args.layers, TINY if args.tiny else SHAPE)
            to_int4(m)
            ids = {p: prompt_ids(m.config.vocab_size, p) for p in args.prompts}
            variants = {"bf16": (lambda: None, lambda p: mb(ids[p], use_cache=False,
                                                            logits_to_keep=1))}
            for name, top, plans in ROWS:
                variants[name] = (lambda top=top, plans=plans: use(top, plans),
                                  lambda p: m(ids[p], use_cache=False, logits_to_keep=1))
            for name, r in turns_ms(variants, args.prompts, args.rounds, args.reps).items():
                note(name, r)
            del mb, variants
        else:
            note("bf16", {f"P{p}_ms": round(prefill_ms(m, p, args.reps), 2)
                          for p in args.prompts})
            to_int4(m)
            for name, top, plans in ROWS:
                use(top, plans)
                ms = {f"P{p}_ms": round(prefill_ms(m, p, args.reps), 2) for p in args.prompts}
                note(name, {**ms, "picks": {str(key[:2]): str(cfg) for key, cfg
                                            in triton_int._CHOICE.items() if key[0] > 128}})
        launch_shapes.WA_MAX_M = keep
        replay.ENABLED = keep_plans
        drop_caches(m)
        step = fastdecode.NativeStep(m, 1, max(args.prompts) + 1)
        with step.packed_groups():  # batch 1: the 4-bit weights tiled for the decode kernel
            note("int4 g128, memfit's own step (memfit generate's prompt)",
                 {f"P{p}_ms": round(step_ms(step, p, args.reps), 2) for p in args.prompts})


if __name__ == "__main__":
    main()
