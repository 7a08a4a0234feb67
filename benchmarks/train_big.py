"""Full fine-tuning memory of a random-weight Llama-3-8B-shaped model on one GPU: memfit train's
engine, optimizer and memory formula run in process on a model built on the device (no 16 GB
folder to write and read), on random token windows.

    python benchmarks/train_big.py --setting bf16-sib fp32-fsdp --steps 3      # on an H200
    python benchmarks/train_big.py --tiny --device cpu                          # a smoke run

Settings: `bf16-sib` = bfloat16 weights, 8-bit AdamW rounded stochastically, stepped in the
backward pass (`memfit train --weights bf16 --optim adamw8bit --step-in-backward --ac full`);
`fp32-fsdp` = float32 master weights on FSDP2 (world of one), bf16 compute, 8-bit AdamW, full AC
(`memfit train --optim adamw8bit --ac full`). Each setting runs in its own process (run in one,
the first setting's model and states stayed under the second's peak). Prints one JSON line per
setting: predicted bytes (memfit.train.memory), torch.cuda.max_memory_allocated over the steps,
step seconds, losses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def build(cfg: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():  # rotary inv_freq: recompute on the device
            if name.endswith("inv_freq"):
                base, dim = cfg.get("rope_theta", 10000.0), cfg["hidden_size"] // cfg["num_attention_heads"]
                b.copy_(1.0 / base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return model


def run(setting: str, cfg: dict, device: torch.device, steps: int, seq_len: int, batch: int) -> dict:
    from memfit.train.comm import ByteCounter
    from memfit.train.engine import init_distributed
    from memfit.train.loop import train_loop
    from memfit.train.memory import model_shape
    from memfit.train.run import TrainOptions, _build, _dtypes, _predicted

    bf16_weights = setting == "bf16-sib"
    o = TrainOptions(steps=steps, seq_len=seq_len, batch_size=batch, ac="full", optim="adamw8bit",
                     weights="bf16" if bf16_weights else "fp32", step_in_backward=bf16_weights,
                     precision="bf16", device=str(device))
    init_distributed(str(device))
    compute, reduce_dtype = _dtypes(o, device)
    t0 = time.perf_counter()
    model = build(cfg, device, torch.bfloat16 if bf16_weights else torch.float32)
    build_s = time.perf_counter() - t0
    shape = model_shape(model)
    engine = "single" if bf16_weights else "fsdp2"
    predicted = _predicted(shape, o, 1, engine, compute, device)
    net, opt, _, engine = _build(o, model, None, device, compute, reduce_dtype, ByteCounter())
    model.train()
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randint(0, cfg["vocab_size"], (batch, seq_len), generator=gen)

    rep = train_loop(net, opt, batches(), steps=steps, device=device, counter=ByteCounter(),
                     autocast_bf16=False)
    peak = rep["peak_memory_bytes"]
    return {"setting": setting, "engine": engine, "parameters": shape.params,
            "seq_len": seq_len, "batch": batch, "build_seconds": round(build_s, 1),
            "predicted": predicted, "predicted_total_gib": predicted["total_bytes"] / 2**30,
            "measured_peak_gib": peak / 2**30, "peak_kind": rep["peak_memory_kind"],
            "predicted_vs_measured": predicted["total_bytes"] / peak - 1,
            "step_seconds": [round(s, 2) for s in rep["step_seconds"]], "loss": rep["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", nargs="+", default=["bf16-sib"], choices=["bf16-sib", "fp32-fsdp"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-block toy config (smoke test)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if len(a.setting) > 1 and not a.one:  # each setting in a fresh process: nothing carries over
        for s in a.setting:
            cmd = [sys.executable, __file__, "--one", "--setting", s, "--steps", str(a.steps),
                   "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--device", a.device]
            subprocess.run(cmd + (["--tiny"] if a.tiny else []), check=False)
        return
    device = torch.device(a.device)
    cfg = TINY if a.tiny else LLAMA3_8B
    for s in a.setting:
        try:
            print(json.dumps(run(s, cfg, device, a.steps, a.seq_len, a.batch)), flush=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps({"setting": s, "error": f"out of memory: {str(e)[:200]}"}), flush=True)

if __name__ == "__main__":
    main()
