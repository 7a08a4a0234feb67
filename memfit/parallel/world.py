"""Joining a torchrun world with a bounded wait: every rank either meets all the others within
the rendezvous timeout or stops with one clear line, instead of hanging in
`init_process_group` until its (much longer) collective timeout fires.

    join_world("gloo", collective_timeout=timedelta(seconds=300))

The rendezvous is torch's own env:// handler (`torch.distributed.rendezvous`: MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE; under torchrun its agent store, whose own rendezvous has already
met every worker) with the rendezvous wait; the process group is then made on the store it
returns with the collective timeout. Rank 0 waiting for peers that never come, or a rank that
cannot reach rank 0's store, raises UserError naming the address and what is missing. The wait is
MEMFIT_RENDEZVOUS_TIMEOUT seconds (default 30).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from memfit.errors import UserError


def rendezvous_timeout() -> float:
    return float(os.environ.get("MEMFIT_RENDEZVOUS_TIMEOUT", "30"))


def join_world(backend: str, collective_timeout: timedelta) -> tuple[int, int]:
    """init_process_group from the torchrun environment, the wait for peers bounded; -> (rank,
    world size)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"WORLD_SIZE is set but {', '.join(missing)} {verb} not: launch every rank "
                        "with torchrun --nproc-per-node N (it sets them), or unset WORLD_SIZE")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    wait = rendezvous_timeout()
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=wait)))
    except (RuntimeError, ValueError, TimeoutError) as e:  # DistStoreError is a RuntimeError
        raise UserError(f"rank {rank} of {world}: no rendezvous at {where} within {wait:.0f} s "
                        f"({str(e).splitlines()[0][:120]}); start every rank with torchrun "
                        "--nproc-per-node N, or check MASTER_ADDR/MASTER_PORT") from None
    store.set_timeout(collective_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=collective_timeout)
    return rank, world


def same_on_every_rank(values: torch.Tensor, device) -> bool:
    """True when every rank passed equal `values` (checksums: float64), all-gathered on
    `device`; every rank gets the same answer."""
    gathered = [torch.empty_like(values, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values.to(device))
    return all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
