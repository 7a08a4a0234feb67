"""Process group, the training objective as one module, and the two engines that wrap it:
FSDP2 (`fully_shard` per block, then the root) or a replicated DDP model (PowerSGD only).

The objective (`Objective`) is the module that gets sharded: its forward runs the student and
returns the loss, so FSDP2's root hooks gather the root parameters (embeddings, final norm, head)
around the whole loss, including the chunked head that memfit.distill.losses.logit_kl and
`lm_loss` recompute in the backward pass. The teacher is held outside the module tree (frozen,
replicated on every rank, in the compute dtype), so FSDP never shards it.

Activation checkpointing wraps blocks with torch's checkpoint_wrapper before sharding them (FSDP's
hooks then sit outside the checkpointed region, so recomputation never re-gathers parameters
twice): `full` wraps every block, `selective` every other block (memfit.train.memory explains
the choice). The wrapper's key prefix is stripped from state dicts by torch.

Process group: under torchrun the environment names the rendezvous; run plainly, memfit makes a
world of one in memory (HashStore), so the same code path runs without torchrun.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import UserError
from memfit.eval.lm import final_hidden, output_logits

TIMEOUT = datetime.timedelta(seconds=120)


def init_distributed(device: str) -> tuple[int, int, torch.device, bool]:
    """-> (rank, world size, this rank's device, whether this call created the group)."""
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev, False
    if "WORLD_SIZE" in os.environ:  # torchrun: peers met within memfit's rendezvous wait
        from memfit.parallel.world import join_world
        join_world(backend, TIMEOUT)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), dev, True


def check_same_model(model: nn.Module, what: str = "model") -> None:
    """Refuse, on every rank, model copies that differ across ranks (a checksum per rank)."""
    w = dist.get_world_size()
    if w == 1:
        return
    from memfit.parallel.world import same_on_every_rank

    with torch.no_grad():
        mine = torch.tensor([sum(p.double().sum().item() for p in model.parameters()),
                             sum(p.numel() for p in model.parameters())], dtype=torch.float64)
    if not same_on_every_rank(mine, next(model.parameters()).device):
        raise UserError(f"the {what} differs across ranks (parameter checksums differ); give "
                        "every rank the same model folder")


def lm_loss(model: nn.Module, h: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy from final hidden states (B, T, H), the head applied `chunk`
    positions at a time under checkpointing (no (B, T, V) logits kept; memfit.distill.losses)."""
    b, t = ids.shape
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, t - 1, chunk):
        e = min(s + chunk, t - 1)
        total = total + checkpoint(_chunk_ce, model, h[:, s:e], ids[:, s + 1:e + 1],
                                   use_reentrant=False)
    return total / (b * (t - 1))


def _chunk_ce(model, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = output_logits(model, h)  # (B, C, V) float32
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")


class Objective(nn.Module):
    """The loss as a module: causal-LM cross-entropy, or KL(teacher || student) x T² when a
    teacher is given (memfit.distill.losses.logit_kl)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *,
                 temperature: float = 1.0, chunk: int = 256):
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # a tuple: not a submodule, never sharded or trained
        self.temperature, self.chunk = temperature, chunk

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from memfit.distill.losses import logit_kl

        teacher = self._teacher[0]
        if teacher is None:
            return lm_loss(self.student, final_hidden(self.student, ids), ids, self.chunk)
        with torch.no_grad():
            h_t = final_hidden(teacher, ids)
        h_s = final_hidden(self.student, ids)
        return logit_kl(self.student, teacher, h_s, h_t, temperature=self.temperature,
                        chunk=self.chunk)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    from memfit.archs import arch_for, block_list
    return block_list(model, arch_for(model.config))


def apply_checkpointing_(model: nn.Module, ac: str) -> list[int]:
    """Wrap the blocks the AC mode names in torch's checkpoint_wrapper; -> their indices."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    from memfit.train.memory import checkpointed_blocks

    blocks = blocks_of(model)
    which = checkpointed_blocks(len(blocks), ac)
    for i in which:
        blocks[i] = checkpoint_wrapper(blocks[i])
    return which


def shard_(objective: Objective, *, device: torch.device, param_dtype: torch.dtype,
           reduce_dtype: torch.dtype, offload: bool, comm_factory=None) -> list[nn.Module]:
    """fully_shard every block, then the objective (root); -> the FSDP units. `comm_factory()`
    gives each unit its own reduce-scatter (memfit.train.comm)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = {"mesh": mesh, "mp_policy": mp}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    units = [fully_shard(b, **kw) for b in blocks_of(objective.student)]
    units.append(fully_shard(objective, **kw))
    if comm_factory is not None:
        for u in units:
            u.set_custom_reduce_scatter(comm_factory())
    return units


def replicate(objective: Objective, device: torch.device) -> nn.Module:
    """DDP over the objective (the engine of `--grad-comm powersgd`), in one gradient bucket:
    with several, torch's PowerSGD hook (per-bucket state) went out of step across ranks under
    activation checkpointing here (gloo: "collective mismatch"); one bucket gives up overlapping
    the all-reduce with the backward pass."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(objective, device_ids=ids, bucket_cap_mb=10_000)


def full_state_dict(engine_model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The student's whole state dict on the CPU (a collective under FSDP: call on every rank;
    only rank 0 receives tensors)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    prefix = "student."
    if fsdp:
        sd = get_model_state_dict(engine_model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    else:
        plain = getattr(engine_model, "module", engine_model)  # DDP's module, or the objective
        sd = {k: v.detach().float().cpu() for k, v in plain.state_dict().items()}
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
