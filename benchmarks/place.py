"""A model split by `--place` (memfit.parallel.place) against the same model whole: greedy text,
decode speed, and memory, each setting in a fresh process.

    OMP_NUM_THREADS=1 python benchmarks/place.py default --place none cpu=400MB,disk
    python benchmarks/place.py /tmp/rl --make-random --tokenizer TOKDIR \
        --place none cuda:0=2GB,cpu --new 32        # on a GPU: a random 1.3B-shaped Llama

Per setting, one JSON line: the plan (per device), the load's peak RSS, the run's peak RSS
(reset after loading), peak CUDA allocation per device, decode tokens/s (greedy, `--new` tokens
after a `--prompt-tokens` prompt of builtin:eval text) and the generated ids. The last line says
whether every setting generated the same ids as the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run_one(model: str, place: str, prompt_tokens: int, new: int, context: int) -> dict:
    import torch

    from memfit.calib.data import token_windows
    from memfit.eval.memory import reset_peak_rss, rss_peak_bytes
    from memfit.models import input_device, load_model
    from memfit.parallel.place import load_placed, parse_devices

    t0 = time.perf_counter()
    if place == "none":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        m, plan = load_model(model, device=device), None
    else:
        m, plan = load_placed(model, parse_devices(place), context=context)
    load_s, load_peak = time.perf_counter() - t0, rss_peak_bytes()
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.init()  # a plan that keeps every part offloaded has not touched CUDA yet
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    ids = token_windows(m.tokenizer, "builtin", "eval", seq_len=prompt_tokens,
                        max_windows=1, bos="auto")[:1].to(input_device(m.model))
    with torch.inference_mode():
        # warm-up: a prefill and a decode step (packed GPU kernels pick and compile theirs
        # on their first call of each shape)
        m.model.generate(ids, max_new_tokens=2, do_sample=False)
        t1 = time.perf_counter()
        one = m.model.generate(ids, max_new_tokens=1, do_sample=False)
        t2 = time.perf_counter()
        out = m.model.generate(ids, max_new_tokens=new, do_sample=False)
        t3 = time.perf_counter()
    del one
    decode_s = (t3 - t2) - (t2 - t1)
    res = {"place": place, "load_seconds": round(load_s, 1), "load_peak_rss": load_peak,
           "run_peak_rss": rss_peak_bytes(), "prefill_seconds": round(t2 - t1, 3),
           "decode_tokens_per_second": round((new - 1) / decode_s, 2),
           "ids": out[0, ids.shape[1]:].tolist()}
    if torch.cuda.is_available():
        res["cuda_peak"] = {f"cuda:{i}": torch.cuda.max_memory_allocated(i)
                            for i in range(torch.cuda.device_count())}
    if plan is not None:
        res["plan"] = plan.to_dict()["devices"]
    return res


def make_random(out: str, tokenizer: str, hidden: int = 2048, layers: int = 16) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128 or 1,
                      num_key_value_heads=max(hidden // 512, 1), max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--place", nargs="+", default=["none", "cpu=400MB,disk"],
                   help="settings: 'none' (whole, on the GPU if any) or a --place description")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--context", type=int, default=2048, help="the context the plan makes room for")
    p.add_argument("--make-random", action="store_true", help="first write a random-weight "
                   "Llama folder (hidden 2048, 16 blocks, bf16) at MODEL, with --tokenizer's files")
    p.add_argument("--tokenizer", help="a folder with tokenizer files (for --make-random)")
    p.add_argument("--hidden", type=int, default=2048, help="--make-random's width")
    p.add_argument("--layers", type=int, default=16, help="--make-random's depth")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.make_random:
        make_random(a.model, a.tokenizer, a.hidden, a.layers)
    if a.one is not None:
        print(json.dumps(run_one(a.model, a.one, a.prompt_tokens, a.new, a.context)), flush=True)
        return
    rows = []
    for place in a.place:
        cmd = [sys.executable, __file__, a.model, "--one", place, "--prompt-tokens",
               str(a.prompt_tokens), "--new", str(a.new), "--context", str(a.context)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tb = [ln for ln in r.stderr.strip().splitlines() if "Loading" not in ln]
            print(json.dumps({"place": place, "error": tb[-1], "traceback": tb[-14:]}))
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ids"}), flush=True)
    same = all(r["ids"] == rows[0]["ids"] for r in rows) if rows else False
    print(json.dumps({"same_ids_as_first": same, "settings": len(rows)}))


if __name__ == "__main__":
    main()
