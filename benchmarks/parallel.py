"""Tensor-parallel decode and ring attention, measured side by side (memfit.parallel).

    python benchmarks/parallel.py                        # CPU, gloo: TP 1/2 dense+int4, ring 1/2/4
    NCCL_NVLS_ENABLE=0 python benchmarks/parallel.py --device cuda --ranks 1,2 --ring-seq 65536

The driver starts one `torchrun --standalone` per configuration (this file in --worker mode),
collects rank 0's JSON and prints a Markdown table. On GPUs every rank uses cuda:LOCAL_RANK and
NCCL; keep NVLink multicast off (NCCL_NVLS_ENABLE=0), as on our 2xH200 machine.

- TP: the model (default: the embedded SmolLM2-135M) dense and RTN w4g64 (compressed once into a
  temporary folder unless --int4-model is given); a 32-token prompt is prefilled, then
  --tokens greedy tokens are decoded one at a time through a DynamicCache; tokens/s is decode
  only. Per rank: the weight bytes it holds, its KV cache bytes per token, peak RSS (CPU) or
  peak allocated memory (CUDA).
- Ring: causal, zigzag, B=1, H=8 query / 2 KV heads of 64, --ring-seq tokens in all; forward +
  backward time of ring_attention, throughput = tokens / s, against ideal = ranks x the 1-rank
  throughput. Error: max abs difference of the output and dQ/dK/dV from float64 full attention
  (when --ring-seq <= 4096), next to the single-device tiled attention's.
CPU ranks share the machine's cores, so CPU scaling says little about a real multi-device run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- workers (one per rank, under torchrun) -----------------------------------------------------

def _init(device: str):
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, dist.get_world_size(), device


def _peak_bytes(device: str) -> int:
    import resource

    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_tp(args) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import DynamicCache

    import memfit
    from memfit.parallel.tp import parallelize_

    rank, world, device = _init(args.device)
    loaded = memfit.load_model(args.model, device=device)
    model = loaded.model
    report = parallelize_(model, rank, world)
    ids = torch.arange(100, 132, device=device)[None]  # (1, 32) prompt
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.tokens):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        seconds = time.perf_counter() - start
    report.update(peak_bytes=_peak_bytes(device), tokens_per_second=args.tokens / seconds)
    every = [None] * world
    dist.all_gather_object(every, report)
    return {"world": world, "model": args.model, "tokens": args.tokens, "ranks": every}


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_ring(args) -> dict:
    import torch
    import torch.distributed as dist

    from memfit.parallel.ring import (
        full_attention,
        ring_attention,
        shard_sequence,
        tiled_attention,
        unshard_sequence,
    )

    rank, world, device = _init(args.device)
    S, dtype = args.ring_seq, torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(1, h, S, 64, generator=g) for h in (8, 2, 2, 8))
    local = [shard_sequence(t, rank, world, True).to(device, dtype).requires_grad_()
             for t in (q, k, v)]
    go_local = shard_sequence(go, rank, world, True).to(device, dtype)
    times = []
    for _ in range(args.repeats + 1):  # the first run warms up
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        out = ring_attention(*local, causal=True)
        grads = torch.autograd.grad(out, local, go_local)
        _sync(device)
        times.append(time.perf_counter() - start)
    res = {"world": world, "seq": S, "dtype": str(dtype), "seconds": min(times[1:]),
           "tokens_per_second": S / min(times[1:])}
    if S <= 4096:
        parts = []
        for t in (out, *grads):
            every = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(every, t.contiguous())
            parts.append(unshard_sequence([e.cpu().double() for e in every], True))
        if rank == 0:
            ref_in = [t.double().requires_grad_() for t in (q, k, v)]
            ref = full_attention(*ref_in, causal=True)
            ref_all = (ref, *torch.autograd.grad(ref, ref_in, go.double()))
            t_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            tiled = tiled_attention(*t_in, causal=True, block=256)
            t_all = (tiled, *torch.autograd.grad(tiled, t_in, go.to(dtype)))
            for name, mine, want, base in zip(("out", "dq", "dk", "dv"), parts, ref_all, t_all):
                res[f"err_{name}"] = (mine - want).abs().max().item()
                res[f"tiled_err_{name}"] = (base.double() - want).abs().max().item()
    return res


# --- driver ----------------------------------------------------------------------------------

def _torchrun(n: int, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", __file__, "--out", str(out), *argv]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _int4_model(args, tmp: str) -> str:
    if args.int4_model:
        return args.int4_model
    out = str(Path(tmp) / "w4g64")
    subprocess.run([sys.executable, "-m", "memfit", "compress", args.model, "--recipe", "w4g64",
                    "--out", out, "--device", args.device], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def drive(args) -> None:
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"device {args.device}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if "tp" in args.what:
        print("\n| weights | TP | decode tokens/s | per rank: weights MiB / KV bytes per token / "
              "peak MiB |\n|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in (("dense", args.model), ("int4 w4g64", _int4_model(args, tmp))):
                for n in [r for r in ranks if r <= 2]:
                    r = _torchrun(n, ["--worker", "tp", "--model", model, "--device", args.device,
                                      "--tokens", str(args.tokens)])
                    held = "; ".join(f"{x['weight_bytes'] / 2**20:.1f} / {x['kv_bytes_per_token']:,}"
                                     f" / {x['peak_bytes'] / 2**20:.0f}" for x in r["ranks"])
                    print(f"| {name} | {n} | {r['ranks'][0]['tokens_per_second']:.1f} | {held} |",
                          flush=True)
    if "ring" in args.what:
        print("\n| ranks | seq | s (fwd+bwd) | tokens/s | % of ideal | max err out/dq/dk/dv "
              "(tiled) |\n|---|---|---|---|---|---|")
        base = None
        for n in ranks:
            r = _torchrun(n, ["--worker", "ring", "--device", args.device,
                              "--ring-seq", str(args.ring_seq), "--repeats", str(args.repeats)])
            base = base or r["tokens_per_second"] / n
            errs = "n/a"
            if "err_out" in r:
                errs = " / ".join(f"{r[f'err_{x}']:.2g} ({r[f'tiled_err_{x}']:.2g})"
                                  for x in ("out", "dq", "dk", "dv"))
            print(f"| {n} | {r['seq']} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | "
                  f"{100 * r['tokens_per_second'] / (n * base):.0f}% | {errs} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--what", default="tp,ring")
    p.add_argument("--ranks", default="1,2,4", help="ring: these; TP: those <= 2")
    p.add_argument("--model", default="default")
    p.add_argument("--int4-model", help="a memfit w4g64 folder (default: compress --model)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens timed (default 32)")
    p.add_argument("--ring-seq", type=int, default=2048, help="ring: tokens in all")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=["tp", "ring"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is None:
        drive(args)
        return
    res = (worker_tp if args.worker == "tp" else worker_ring)(args)
    import torch.distributed as dist
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
