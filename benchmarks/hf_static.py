"""Plain transformers `generate` on a memfit model, with and without transformers' static cache: a
random-weight Llama-3-8B-shaped model on one GPU, bf16 and int4 g128 (memfit QuantLinear), batch
`--batch` (default 1; tokens/s counts every row).

Rows per model:
- `eager`: `model.generate(ids, ...)` as a user calls it (dynamic cache, no compile);
- `static`: `model.generate(ids, ..., cache_implementation="static")`, for which transformers
  compiles the decode step itself (torch.compile, mode "reduce-overhead": CUDA graphs); memfit's
  packed linears enter the graph as the opaque custom op `memfit::int_linear`;
- `memfit loop` (int4 only, `--loop`): memfit.decode.greedy_static, memfit's own CUDA-graph step,
  for scale.

Decode tokens/s = N / (t(generate 1 + N new) - t(generate 1 new)): the prompt's prefill is left out;
greedy, no stopping, CUDA synchronised around each call, best of `--rounds`. The static rows'
first call (compile and graph capture) is timed apart as `first_call_s`. `match` counts the leading
tokens of a row equal to the eager row of the same model. Random weights: speed only.

    python benchmarks/hf_static.py [--layers 32] [--new 64] [--batch 1] [--rounds 2] [--no-loop]
                                   [--json OUT]
    python benchmarks/hf_static.py --tiny      # a small model on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import transformers

import decode_gpu
from decode_gpu import SHAPE, TINY, build, sync, to_int4

from memfit.decode import greedy_static


def generate(m, ids, n: int, static: bool) -> tuple[float, torch.Tensor]:
    kw = {"cache_implementation": "static"} if static else {}
    sync()
    t = time.perf_counter()
    out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                     **kw)
    sync()
    return time.perf_counter() - t, out[0, ids.shape[1]:]


def leading_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    return int((a[:n] == b[:n]).long().cumprod(0).sum())


def rows_for(m, name: str, ids, new: int, rounds: int, ref: dict) -> list:
    out = []
    for static in (False, True):
        try:
            first, toks = generate(m, ids, 1 + new, static)  # warm-up: kernels, compile, capture
            best = min(generate(m, ids, 1 + new, static)[0] - generate(m, ids, 1, static)[0]
                       for _ in range(rounds))
        except Exception:  # noqa: BLE001 (report it, keep the other rows)
            traceback.print_exc()
            out.append({"model": name, "generate": "static cache" if static else "eager",
                        "error": traceback.format_exc(limit=1).strip().splitlines()[-1]})
            continue
        if not static:
            ref[name] = toks
        row = {"model": name, "generate": "static cache" if static else "eager",
               "tok_s": round(new * ids.shape[0] / best, 2), "first_call_s": round(first, 2),
               f"match_of_{1 + new}": leading_equal(toks, ref[name])}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-loop", action="store_true", help="leave out memfit's own loop row")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (checks the script)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.tiny:
        decode_gpu.DEV = "cpu"
    m = build(a.layers, TINY if a.tiny else SHAPE)
    ids = torch.randint(0, m.config.vocab_size, (a.batch, a.prompt), device=decode_gpu.DEV,
                        generator=torch.Generator(device=decode_gpu.DEV).manual_seed(0))
    rows, ref = [], {}
    with torch.inference_mode():
        rows += rows_for(m, "bf16", ids, a.new, a.rounds, ref)
        to_int4(m)
        torch._dynamo.reset()  # the int4 model's graph compiles afresh, as in a new process
        rows += rows_for(m, "int4 g128", ids, a.new, a.rounds, ref)
        if not a.no_loop:
            best, toks = None, None
            for _ in range(a.rounds + 1):  # the first call chooses kernels and captures
                t: dict = {}
                toks = greedy_static(m, ids, 1 + a.new, timings=t)
                best = t["decode_s"] if best is None else min(best, t["decode_s"])
            rows.append({"model": "int4 g128", "generate": "memfit loop (greedy_static)",
                         "tok_s": round(a.new * a.batch / best, 2),
                         f"match_of_{1 + a.new}": leading_equal(toks[0], ref["int4 g128"])})
            print(json.dumps(rows[-1]), flush=True)
    out = {"device": torch.cuda.get_device_name() if decode_gpu.DEV == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "layers": a.layers, "new": a.new, "prompt": a.prompt, "batch": a.batch,
           "rows": rows}
    decode_gpu.report(out, a.json)


if __name__ == "__main__":
    main()
