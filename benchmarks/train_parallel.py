"""`memfit train` side by side: training memory per rank, tokens/s and gradient bytes on the wire
for (FSDP degree, activation checkpointing, optimizer bits, gradient communication) combinations,
one run, one random-weight Llama.

Each combination is a fresh process group: degree 1 runs this script plainly (a world of one),
degree N under `torchrun --nproc-per-node N` (gloo on the CPU, NCCL on CUDA with
NCCL_NVLS_ENABLE=0). Reported per combination: tokens/s over the global batch from step 2 on (the
first step builds kernels and buffers), memory per rank (the largest rank) predicted by
memfit.train.memory next to the measured peak (CPU: the process's peak RSS, and its rise above
the rise of RSS during the training steps next to the predicted total less the resident
weights; CUDA: max_memory_allocated), the optimizer state bytes on
rank 0, and the gradient bytes a rank handed to collectives in the last step (and the share it
sends to other ranks: memfit.train.comm).

    python benchmarks/train_parallel.py [--device cuda] [--hidden 256 --layers 4] [--steps 6]
        [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FSDP_GRID = [(w, ac, opt) for w in (1, 2) for ac in ("none", "full") for opt in ("adamw", "adamw8bit")]
COMM_MODES = ("bf16", "int8", "powersgd")


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random-weight Llama (Llama-shaped ratios, the embedded encoder's 30522-token tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memfit.models import resolve

    cfg = AutoConfig.for_model("llama", vocab_size=30522, hidden_size=hidden,
                               intermediate_size=hidden * 8 // 3 // 8 * 8, num_hidden_layers=layers,
                               num_attention_heads=max(hidden // 64, 2),
                               num_key_value_heads=max(hidden // 128, 1),
                               max_position_embeddings=4096, bos_token_id=101, eos_token_id=102,
                               pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve("default-encoder")[1]).save_pretrained(folder)
    return folder


def worker(model: str, options: dict) -> None:
    """One combination on this rank; prints `RESULT {json}` (every rank)."""
    from memfit.train import TrainOptions, train_to

    rep = train_to(model, None, TrainOptions(**options))
    keep = ("rank", "world_size", "engine", "loss", "grad_comm_per_step", "step_seconds",
            "peak_memory_bytes", "peak_memory_kind", "rss_before_training_bytes", "predicted",
            "optimizer_state_bytes", "parameters", "device", "compute_dtype", "reduce_dtype")
    # one write() of under 4096 bytes: atomic on a pipe, so ranks' lines never interleave
    line = ("RESULT " + json.dumps({k: rep[k] for k in keep}) + "\n").encode()
    assert len(line) < 4096, len(line)
    sys.stdout.flush()
    os.write(1, line)


def launch(world: int, model: str, options: dict, device: str) -> list[dict]:
    """Run one combination in fresh processes; -> every rank's result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    me = [str(Path(__file__).resolve()), "--worker", json.dumps({"model": model, "options": options})]
    if world == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={port}", *me]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"combination {world} x {options} failed:\n{p.stderr[-4000:]}")
    return [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


def summarize(world: int, options: dict, ranks: list[dict], batch: int, seq_len: int) -> dict:
    r0 = min(ranks, key=lambda r: r["rank"])
    worst = max(ranks, key=lambda r: r["peak_memory_bytes"])
    steps = max((r["step_seconds"] for r in ranks), key=sum)[1:] or r0["step_seconds"]
    comm = r0["grad_comm_per_step"][-1]
    return {"fsdp_degree": world if r0["engine"] == "fsdp2" else 1, "ranks": world,
            "engine": r0["engine"], "ac": options["ac"], "optim": options["optim"],
            "grad_comm": options["grad_comm"],
            "tokens_per_second": batch * seq_len * len(steps) / sum(steps),
            "predicted_bytes": r0["predicted"]["total_bytes"],
            "predicted": r0["predicted"],
            "peak_bytes": worst["peak_memory_bytes"], "peak_kind": worst["peak_memory_kind"],
            "rise_bytes": worst["peak_memory_bytes"] - worst["rss_before_training_bytes"],
            "predicted_rise_bytes": r0["predicted"]["total_bytes"] - r0["predicted"]["weights_bytes"],
            "optimizer_state_bytes": r0["optimizer_state_bytes"],
            "grad_payload_bytes": comm["payload_bytes"], "grad_wire_bytes": comm["wire_bytes"],
            "loss_first": r0["loss"][0], "loss_last": r0["loss"][-1],
            "parameters": r0["parameters"], "compute_dtype": r0["compute_dtype"]}


def table(rows: list[dict]) -> str:
    mb = 2**20
    cuda = rows[0]["peak_kind"].startswith("cuda")
    head = ("| ranks | engine | AC | optimizer | grad comm | tokens/s | predicted MiB/rank | "
            + ("measured MiB/rank (max_memory_allocated)" if cuda else
               "peak RSS MiB/rank | predicted rise MiB | measured RSS rise MiB") +
            " | optimizer state MiB/rank | grad bytes/step/rank (sent to others) | loss first -> last |")
    cols = head.count("|") - 1
    lines = [head, "|" + "---|" * cols]
    for r in rows:
        mem = f"{r['peak_bytes'] / mb:.0f}" if cuda else (
            f"{r['peak_bytes'] / mb:.0f} | {r['predicted_rise_bytes'] / mb:.0f} | "
            f"{r['rise_bytes'] / mb:.0f}")
        lines.append(f"| {r['ranks']} | {r['engine']} | {r['ac']} | {r['optim']} | {r['grad_comm']} | "
                     f"{r['tokens_per_second']:.0f} | {r['predicted_bytes'] / mb:.0f} | {mem} | "
                     f"{r['optimizer_state_bytes'] / mb:.1f} | {r['grad_payload_bytes']:,} "
                     f"({r['grad_wire_bytes']:,}) | {r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="global windows per step")
    ap.add_argument("--ranks", type=int, default=2, help="the FSDP degree besides 1 (default 2)")
    ap.add_argument("--quick", action="store_true", help="degree 2 only, fewer combinations")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    if a.worker:
        job = json.loads(a.worker)
        worker(job["model"], job["options"])
        return
    base = {"steps": a.steps, "lr": 1e-4, "seq_len": a.seq_len, "batch_size": a.batch_size,
            "samples": 8 * a.batch_size, "device": a.device}
    grid = [(a.ranks if w == 2 else 1, ac, opt, "fp32") for w, ac, opt in FSDP_GRID]
    grid += [(a.ranks, "none", "adamw", m) for m in COMM_MODES]
    if a.quick:
        grid = [g for g in grid if g[0] > 1 and (g[1], g[2]) == ("none", "adamw")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_model(Path(tmp) / "llama", a.hidden, a.layers))
        for world, ac, opt, gc in grid:
            opts = {**base, "ac": ac, "optim": opt, "grad_comm": gc}
            rows.append(summarize(world, opts, launch(world, model, opts, a.device),
                                  a.batch_size, a.seq_len))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"device: {dev}; torch {torch.__version__}; date {datetime.date.today()}; "
          f"model: random Llama hidden {a.hidden}, {a.layers} blocks, vocab 30522, "
          f"{rows[0]['parameters']:,} parameters; {a.steps} steps of {a.batch_size} x {a.seq_len} "
          f"tokens (global), compute {rows[0]['compute_dtype']}\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
