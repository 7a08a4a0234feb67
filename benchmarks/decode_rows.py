"""The decode rows of issue 10's benchmark in one run: a random-weight Llama-3-8B-shaped model
(decode_gpu.py's), batch 1 and 16, a `--prompt`-token prompt (default 1024, so that the
quantized KV cache holds packed groups: it keeps the last 128 tokens dense), `--new` new tokens:

- bf16, transformers' eager `generate` (decode time = t(1 + N new) - t(1 new), best of 2);
- bf16, memfit's loop (memfit.decode.greedy_static: memfit's own step, one CUDA graph a step);
- int4 weights (`--group`, default 128 codes), memfit's loop;
- the int4 weights + the `--kv` quantized KV cache (default int4: groups of 64), memfit's loop
  (the static quantized cache, memfit.kvstatic).

memfit loop rows: the synchronized wall time of the N graph replays after the first token
(prefill, warm-up and capture excluded), best of 2. KV MiB: what the row's cache holds for
prompt + new tokens (16-bit: 2 x layers x batch x 8 heads x tokens x 128 x 2 bytes; quantized:
memfit.kvcache.quantized_kv_bytes, the bytes `memfit inspect --kv` reports). Random weights: speed only.

    python benchmarks/decode_rows.py [--layers 32] [--prompt 1024] [--new 64] [--kv int4]
                                     [--batches 1 16] [--shape llama3-8b] [--rows ...]
                                     [--group 128] [--bits 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import decode_gpu
from decode_gpu import SHAPES, TINY, build, decode_tps, loop_tps, to_int4

from memfit.kvcache import kv_format, quantized_kv_bytes


ROWS = ["bf16-hf", "bf16-loop", "int4-loop", "int4-kv"]


def loop(m, batch: int, prompt: int, new: int, kv) -> float:
    return loop_tps(m, batch, new, native=None, prompt=prompt, kv=kv, match=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--kv", default="int4")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (checks the script)")
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--group", type=int, default=128, help="int4 rows: codes per group")
    ap.add_argument("--bits", type=int, default=4, help="the int4 rows' code width (3: the loop "
                    "widens them to 4-bit codes)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.tiny:
        decode_gpu.DEV = "cpu"
    m = build(a.layers, TINY if a.tiny else SHAPES[a.shape])
    cfg = m.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    fmt = kv_format(a.kv)
    rows = []

    def note(name: str, batch: int, tok_s: float, kv: str) -> None:
        tokens = a.prompt + 1 + a.new
        heads = cfg.num_key_value_heads
        if kv == "16-bit":
            total = 2 * cfg.num_hidden_layers * batch * heads * tokens * hd * 2
        else:
            total = cfg.num_hidden_layers * quantized_kv_bytes(
                fmt, tokens=tokens, batch=batch, kv_heads=heads, head_dim=hd, dtype_bytes=2)
        r = {"row": name, "batch": batch, "tok_s": round(tok_s, 1), "kv": kv,
             "kv_mib": round(total / 2**20, 1)}
        rows.append(r)
        print(json.dumps(r), flush=True)

    with torch.inference_mode():
        for b in a.batches:
            if "bf16-hf" in a.rows:
                note("bf16, transformers eager generate", b,
                     decode_tps(m, b, a.new, None, a.prompt), "16-bit")
            if "bf16-loop" in a.rows:
                note("bf16, memfit loop", b, loop(m, b, a.prompt, a.new, None), "16-bit")
        to_int4(m, a.group, a.bits)
        for b in a.batches:
            if "int4-loop" in a.rows:
                note(f"int{a.bits} g{a.group}, memfit loop", b, loop(m, b, a.prompt, a.new, None),
                     "16-bit")
            if "int4-kv" in a.rows:
                note(f"int{a.bits} g{a.group} + KV {a.kv}, memfit loop", b,
                     loop(m, b, a.prompt, a.new, fmt), a.kv)
    info = {"device": torch.cuda.get_device_name() if decode_gpu.DEV == "cuda" else "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "transformers": __import__("transformers").__version__, "layers": a.layers,
            "shape": a.shape, "mma_uneven": os.environ.get("MEMFIT_MMA_UNEVEN", "1"),
            "prompt": a.prompt, "new": a.new, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
