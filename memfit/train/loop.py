"""The training loop: fixed-seed global batches split across ranks, forward/backward/step, the
global mean loss per step, the gradient bytes each step sent, and the measured peak memory.

Data parallel semantics: `batch_size` is the global batch (windows per step); rank r takes rows
[r B/W, (r+1) B/W) of it, so any world size sees the same windows per step, and FSDP's averaged
gradient of the per-rank mean losses is the gradient of the global mean (every window has the
same number of tokens). That is what makes W = 2 reproduce W = 1.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from memfit.eval.memory import rss_peak_bytes


def global_batches(windows: torch.Tensor, batch_size: int, seed: int, rank: int, world: int):
    """Endless (batch_size / world, T) slices of fixed-seed global batches (a new permutation of
    the windows each epoch)."""
    gen = torch.Generator().manual_seed(seed)
    per = batch_size // world
    while True:
        order = torch.randperm(windows.shape[0], generator=gen)
        for b in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[b:b + batch_size]][rank * per:(rank + 1) * per]


def rss_now() -> int:
    """Current resident set size of this process (VmRSS), bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().float().clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(x)  # SUM: gloo has no AVG
        x /= dist.get_world_size()
    return x.item()


def train_loop(model, optimizer, batches, *, steps: int, device: torch.device, counter,
               autocast_bf16: bool = False, progress: bool = False, on_step=None) -> dict:
    """Run `steps` optimizer steps of `model(ids) -> loss`; -> losses, bytes per step, time,
    measured peak memory. `on_step(step)` is called after each step (tests use it)."""
    ac = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 \
        else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, comm, step_seconds = [], [], []
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress)
    t0 = time.perf_counter()
    tokens = 0
    for step in bar:
        t_step = time.perf_counter()
        ids = next(batches).to(device)
        tokens += ids.numel()
        with ac:
            loss = model(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_mean_over_ranks(loss))
        comm.append(counter.reset())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - t_step)
        bar.set_postfix(loss=f"{losses[-1]:.5f}", refresh=False)
        if on_step is not None:
            on_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda_max_memory_allocated"}
    else:
        peak = {"peak_memory_bytes": rss_peak_bytes(), "peak_memory_kind": "process_peak_rss"}
    seconds = time.perf_counter() - t0
    return {"loss": losses, "grad_comm_per_step": comm, "seconds": seconds,
            "step_seconds": step_seconds,
            "tokens_per_second_rank": tokens / seconds, **peak}
