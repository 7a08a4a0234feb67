"""Decode tokens/s of a random-weight Llama-3-8B-shaped model on one GPU, side by side in one run:
bf16 (HF eager `generate`), bf16 through memfit's static-cache CUDA-graph loop
(memfit.decode.greedy_static), int4 g128 through memfit's QuantLinear + Triton kernels (HF eager
loop and memfit's loop), and int4 + memfit's int4 KV cache (HF loop; with --kv-prompt P also at a
P-token prompt, batch 1: bf16 cache vs the int4 cache dequantized vs read by the decode-attention
kernel, "fused"). Random weights: speed only, not text quality.

HF `generate` rows: decode time = time(generate 1 + N new tokens) - time(generate 1 new token), so
the prefill of the 32-token prompt is excluded; greedy, no stopping; CUDA synchronised around each
call; best of 2. memfit loop rows: the synchronized wall time of the N graph replays after the
first token (prefill, warm-up and capture excluded), best of 2; "graph loop" rows replay
transformers' forward (greedy_static(native=False)), "+ fused" rows also run its
RMSNorm/MLP/rotary pieces torch.compile'd (memfit.decode.fused); "native step" rows replay
memfit's own step (memfit.fastdecode, greedy_static's default for Llama-family models). `match` is how many of the N
greedy tokens of row 0 equal HF `generate`'s (the same function; bf16 ties may differ).

    python benchmarks/decode_gpu.py [--layers 32] [--new 64] [--skip-hf] [--kv-prompt 4096]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.decode import greedy_static
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.kvcache import (QuantizedKVCache, cache_kwarg, enable_fused_kv_attention,
                            kv_format)


DEV = "cuda"
SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256}
SHAPES = {  # --shape of the decode benchmarks: Llama-3-8B (the issue's), and two whose rows
    # have awkward tile counts (Qwen2.5-7B's down_proj: 148 tiles of 128; Llama-2-7B's: 86)
    "llama3-8b": SHAPE,
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000},
}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000}  # --tiny: a CPU check of this script


def build(layers: int, shape: dict) -> LlamaForCausalLM:
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192,
                      rope_theta=500000.0, **shape)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    m = m.to_empty(device=DEV).to(torch.bfloat16).eval()
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=g)
        for n, b in m.named_buffers():
            if "inv_freq" in n:  # recompute rotary frequencies lost by to_empty
                hd = cfg.hidden_size // cfg.num_attention_heads
                b.copy_(1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=DEV).float() / hd)))
    return m


def to_int4(m, group: int = 128, bits: int = 4) -> None:
    """Every linear of the blocks as a random packed `bits`-bit QuantLinear (default 4)."""
    fmt = IntFormat(bits=bits, group_size=group)
    g = torch.Generator(device=DEV).manual_seed(1)
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = QuantLinear(lin.in_features, lin.out_features, fmt, bias=False, device=DEV,
                                dtype=torch.bfloat16)
                q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, device=DEV, generator=g))
                q.zero.copy_(torch.randint(0, 256, q.zero.shape, device=DEV, generator=g))
                q.scale.copy_(torch.rand(q.scale.shape, device=DEV, generator=g) * 0.002)
                setattr(parent, name, q)
    if DEV == "cuda":
        torch.cuda.empty_cache()


def report(out: dict, path: str | None) -> None:
    """Print a run's result as one JSON line; also to `path` (indented) when given."""
    print(json.dumps(out))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def decode_tps(m, batch: int, new: int, kv: str | None, prompt: int = 32,
               fused: bool = False) -> float:
    ids = torch.randint(0, m.config.vocab_size, (batch, prompt), device=DEV)

    def gen(n):
        kw = {cache_kwarg(m): QuantizedKVCache(m.config, kv_format(kv), fused)} if kv else {}
        sync()
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        sync()
        return time.perf_counter() - t0

    gen(4)  # warm-up: kernel choice and compilation
    best = min(gen(1 + new) - gen(1) for _ in range(2))
    return batch * new / best


def loop_tps(m, batch: int, new: int, fuse: bool = False, native: bool = False,
             prompt: int = 32, kv=None, match: bool = True) -> tuple[float, int | None]:
    """(tokens/s of memfit's graph loop, tokens of row 0 equal to HF generate's; None without
    `match`), a `prompt`-token prompt, `kv` a memfit.kvcache.KVFormat or None."""
    ids = torch.randint(0, m.config.vocab_size, (batch, prompt), device=DEV,
                        generator=torch.Generator(device=DEV).manual_seed(batch))
    best = None
    for _ in range(2):
        t: dict = {}
        got = greedy_static(m, ids, 1 + new, timings=t, fuse=fuse, native=native, kv=kv)
        best = t["decode_s"] if best is None else min(best, t["decode_s"])
    if not match:
        return batch * new / best, None
    ref = m.generate(ids[:1], max_new_tokens=1 + new, min_new_tokens=1 + new, do_sample=False,
                     pad_token_id=0)[0, prompt:]
    return batch * new / best, int((ref == got[0]).long().cumprod(0).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (checks the script)")
    ap.add_argument("--skip-hf", action="store_true", help="memfit loop rows only")
    ap.add_argument("--kv-prompt", type=int, default=0, help="also int4 KV rows at this prompt")
    args = ap.parse_args()
    global DEV
    if args.tiny:
        DEV = "cpu"
    m = build(args.layers, TINY if args.tiny else SHAPE)
    rows = []
    with torch.inference_mode():
        for prec in ("bf16", "int4 g128"):
            if prec != "bf16":
                to_int4(m)
            for batch in (1, 16):
                if not args.skip_hf:
                    rows.append({"model": f"{prec} HF eager generate", "batch": batch,
                                 "tok_s": decode_tps(m, batch, args.new, None)})
                for fuse, native in ((False, False), (True, False), (False, True)):
                    try:
                        tps, match = loop_tps(m, batch, args.new, fuse, native)
                    except Exception:  # noqa: BLE001 (report, keep the other rows)
                        traceback.print_exc()
                        tps, match = float("nan"), None
                    name = (f"{prec} memfit native step (memfit.fastdecode)" if native else
                            f"{prec} memfit graph loop" + (" + fused (torch.compile)" if fuse else ""))
                    rows.append({"model": name, "batch": batch, "tok_s": tps,
                                 "match_of_%d" % (1 + args.new): match})
                    print(json.dumps(rows[-1]), flush=True)
                if prec != "bf16" and not args.skip_hf:
                    rows.append({"model": "int4 g128 memfit + KV int4 (HF loop)", "batch": batch,
                                 "tok_s": decode_tps(m, batch, args.new, "int4")})
                    print(json.dumps(rows[-1]), flush=True)
        if args.kv_prompt:
            p = args.kv_prompt
            for name, kv, fused in (("bf16 cache", None, False), ("KV int4", "int4", False),
                                    ("KV int4 fused kernel", "int4", True)):
                if fused:
                    enable_fused_kv_attention(m)
                rows.append({"model": f"int4 g128 memfit + {name} (HF loop), {p}-token prompt",
                             "batch": 1, "tok_s": decode_tps(m, 1, args.new, kv, p, fused)})
                print(json.dumps(rows[-1]), flush=True)
    head = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
            "torch": torch.__version__, "layers": args.layers, "new_tokens": args.new,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None}
    print(json.dumps(head))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
