"""Gradient communication: fp32 / bf16 / int8-with-error-feedback reduce-scatter inside FSDP2, and
PowerSGD all-reduce on a replicated (DDP) model; every mode counts the bytes it sends.

Engines (`ENGINE`): FSDP2 reduce-scatters each unit's gradients from one flat buffer laid out as
(world, shard) and lets a module replace that collective (`FSDPModule.set_custom_reduce_scatter`),
so fp32, bf16 (FSDP2's reduce_dtype) and int8 all run on the sharded model. PowerSGD needs every
rank's whole gradient matrix for its two power-iteration all-reduces (P = M Q, then Q = Mᵀ P), which
a reduce-scatter of row shards does not give, so `powersgd` trains a replicated model under DDP
with torch's `powerSGD_hook` (rank `powersgd_rank`, error feedback on, vanilla all-reduce for the
first step as torch requires).

int8 (`Int8ReduceScatter`): each rank adds its carried residual e to the buffer, quantizes every
block of 256 values of each destination's chunk to int8 with one float32 scale (absmax / 127),
keeps e = x - dequant(codes) for the next step (error feedback: over steps the receiver gets the
true sum minus only the last residual), and exchanges codes and scales with one all-to-all; each
rank dequantizes what it received and sums in float32.

Bytes: `payload` is what a rank hands to its collectives per step (the tensors' sizes); `wire` is
what it sends to other ranks: (W-1)/W x payload for reduce-scatter and all-to-all, 2 (W-1)/W x
payload for a ring all-reduce (DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# the interface set_custom_reduce_scatter takes; torch does not re-export it publicly (2.13)
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from memfit.errors import UserError

GRAD_COMM = ("fp32", "bf16", "int8", "powersgd")
ENGINE = {"fp32": "fsdp2", "bf16": "fsdp2", "int8": "fsdp2", "powersgd": "ddp"}
BLOCK = 256


class ByteCounter:
    """Bytes handed to gradient collectives, summed over a step (reset by the loop)."""

    def __init__(self):
        self.payload = 0
        self.wire = 0.0

    def add(self, payload: int, wire_factor: float) -> None:
        self.payload += payload
        self.wire += payload * wire_factor

    def reset(self) -> dict:
        out = {"payload_bytes": self.payload, "wire_bytes": round(self.wire)}
        self.payload, self.wire = 0, 0.0
        return out


class CountingReduceScatter(ReduceScatter):
    """FSDP2's plain reduce-scatter (fp32 or bf16 buffers), counting the bytes it is given."""

    def __init__(self, counter: ByteCounter):
        self.counter = counter

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        w = group.size()
        self.counter.add(input_tensor.numel() * input_tensor.element_size(), (w - 1) / w)
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                          async_op=async_op)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) float -> (codes (rows, nb, BLOCK) int8, scales (rows, nb) float32), zero-padded."""
    rows, n = x.shape
    nb = -(-n // BLOCK)
    padded = torch.zeros(rows, nb * BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :n] = x
    blocks = padded.view(rows, nb, BLOCK)  # (rows, nb, BLOCK)
    scales = blocks.abs().amax(dim=2).clamp_min(1e-30) / 127
    codes = torch.round(blocks / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of quantize_int8 -> (rows, n) float32."""
    return (codes.float() * scales[..., None]).flatten(1)[:, :n]


class Int8ReduceScatter(ReduceScatter):
    """Reduce-scatter through int8 codes with error feedback (see the module docstring). One
    instance per FSDP unit: its residual has that unit's buffer size."""

    def __init__(self, counter: ByteCounter | None = None):
        self.counter = counter
        self.residual: torch.Tensor | None = None

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        w = group.size()
        x = input_tensor.float().view(w, -1)  # (W, shard): row r goes to rank r
        n = x.shape[1]
        if self.residual is not None:
            x = x + self.residual
        codes, scales = quantize_int8(x)
        self.residual = x - dequantize_int8(codes, scales, n)
        got_codes, got_scales = torch.empty_like(codes), torch.empty_like(scales)
        dist.all_to_all_single(got_codes, codes, group=group)  # got row s: rank s's part for me
        dist.all_to_all_single(got_scales, scales, group=group)
        total = dequantize_int8(got_codes, got_scales, n).sum(dim=0)  # (shard,)
        if op == dist.ReduceOp.AVG:
            total /= w
        elif op != dist.ReduceOp.SUM:
            raise AssertionError(f"int8 reduce-scatter got op {op}; FSDP2 passes SUM or AVG")
        output_tensor.copy_(total.to(output_tensor.dtype))
        if self.counter is not None:
            self.counter.add(codes.numel() + scales.numel() * scales.element_size(), (w - 1) / w)


def powersgd_compressed(n: int, m: int, rank: int, min_rate: float) -> bool:
    """torch's PowerSGD rule: an (n, m) gradient is sent as P (n, r) and Q (m, r) when
    (n + m) r x min_rate < n m, else whole."""
    return (n + m) * rank * min_rate < n * m


def powersgd_payload(shapes: list[torch.Size], rank: int, min_rate: float = 2.0) -> dict:
    """Elements sent per step by PowerSGD for gradients of `shapes`: P and Q of the compressed
    matrices plus every other gradient whole (1-D tensors and matrices not worth compressing)."""
    p = q = dense = 0
    for s in shapes:
        if len(s) < 2:
            dense += s.numel()
            continue
        n, m = s[0], s.numel() // s[0]
        r = min(n, m, rank)
        if powersgd_compressed(n, m, r, min_rate):
            p, q = p + n * r, q + m * r
        else:
            dense += n * m
    return {"p": p, "q": q, "dense": dense, "total": p + q + dense}


def attach_powersgd(ddp_model, rank: int, counter: ByteCounter, start_iter: int = 2):
    """Register torch's PowerSGD hook (error feedback, warm start) on a DDP model, counting the
    bytes each bucket sends; -> the hook's state (its p/q_memory_dict hold the sent P and Q)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    if rank < 1:
        raise UserError(f"--powersgd-rank {rank}: the low-rank approximation needs rank >= 1")
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                               start_powerSGD_iter=start_iter, min_compression_rate=2,
                               use_error_feedback=True, warm_start=True)
    w = dist.get_world_size()

    def hook(st, bucket):
        if st.iter < st.start_powerSGD_iter or w == 1:
            sent = bucket.buffer().numel()
        else:
            sent = powersgd_payload([g.shape for g in bucket.gradients()], rank)["total"]
        counter.add(sent * 4, 2 * (w - 1) / w)
        return psgd.powerSGD_hook(st, bucket)

    ddp_model.register_comm_hook(state, hook)
    return state


def attach_allreduce_counter(ddp_model, counter: ByteCounter) -> None:
    """DDP's plain all-reduce, counting bytes (the fp32 reference of the DDP engine)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    w = dist.get_world_size()

    def hook(st, bucket):
        counter.add(bucket.buffer().numel() * bucket.buffer().element_size(), 2 * (w - 1) / w)
        return default_hooks.allreduce_hook(st, bucket)

    ddp_model.register_comm_hook(None, hook)
