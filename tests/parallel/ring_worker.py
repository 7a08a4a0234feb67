"""Run under torchrun (gloo): ring attention on every rank vs float64 full attention and the
single-device tiled attention; rank 0 writes the errors as JSON to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from memfit.parallel.ring import (
    full_attention,
    ring_attention,
    shard_sequence,
    tiled_attention,
    unshard_sequence,
)

# (name, causal, B, H, Hkv, seq per rank, D)
CASES = [
    ("causal", True, 1, 4, 4, 32, 16),
    ("causal_gqa_odd", True, 2, 6, 2, 10, 12),   # zigzag chunks of 5 tokens, head dim 12
    ("full_gqa_odd", False, 1, 6, 3, 7, 8),      # 7 tokens per rank
    ("full", False, 2, 4, 2, 32, 16),
]


def gather(t, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def run_case(causal, B, H, Hkv, per_rank, D, rank, world):
    S = per_rank * world
    g = torch.Generator().manual_seed(1234)
    q, k, v, go = (torch.randn(B, h, S, D, generator=g) for h in (H, Hkv, Hkv, H))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref = full_attention(*ref, causal=causal)
    grads_ref = torch.autograd.grad(out_ref, ref, go.double())
    tiled_in = [t.clone().requires_grad_() for t in (q, k, v)]
    out_tiled = tiled_attention(*tiled_in, causal=causal, block=max(8, S // 8))
    grads_tiled = torch.autograd.grad(out_tiled, tiled_in, go)
    local = [shard_sequence(t, rank, world, causal).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=causal)
    grads = torch.autograd.grad(out, local, shard_sequence(go, rank, world, causal))
    full = [unshard_sequence(gather(t, world), causal) for t in (out, *grads)]
    err = {}
    for name, mine, tiled, want in zip(("out", "dq", "dk", "dv"), full, (out_tiled, *grads_tiled),
                                       (out_ref, *grads_ref)):
        err[name] = {"ring": (mine.double() - want).abs().max().item(),
                     "tiled": (tiled.double() - want).abs().max().item()}
    return err


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {"world": world}
    for name, *args in CASES:
        res[name] = run_case(*args, rank, world)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
