"""Optimizers for sharded training: torch's AdamW, or AdamW with 8-bit block-wise moments that
steps the local shard of each (DTensor) parameter.

The 8-bit format and its exact-update-then-requantize rule are memfit.distill.loop's (m int8 with a
float32 absmax per block of 256; sqrt(v) uint8 with a float32 max per block; ~2.03 bytes of state
per parameter against 8 for float32 AdamW). That class reads `p.grad` as one tensor; under FSDP2 a
parameter is a DTensor sharded on dim 0, and the update is element-wise, so this one works on
`p.to_local()` / `p.grad.to_local()`: every rank quantizes only its own shard, blocks never span
ranks, and no communication is needed. Plain tensors (world size 1 without FSDP, DDP) take the same
path. The update runs CHUNK_BLOCKS blocks at a time, so its float32 temporaries (m, v, the
gradient, the update) stay ~1 MB each instead of the size of the largest tensor (an embedding
table), which on a CPU would otherwise outweigh the state it saves.

bfloat16 weights (`memfit train --weights bf16`): an AdamW update of ~lr x weight is far below
bfloat16's resolution (8 significant bits), so rounding the updated weight to nearest would drop
most updates; the update is computed in float32 and rounded to bfloat16 stochastically (up with
probability equal to the distance from the lower neighbour), so in expectation every update
lands. No float32 master copy is kept: 2 bytes per weight instead of 4.

Stepping in the backward pass (`StepInBackward`, `--step-in-backward`): each parameter is
updated by its own optimizer as soon as its gradient is complete (a post-accumulate-grad hook),
and the gradient is freed at once, so the whole model's gradients never exist together. AdamW's
update is per element, so this gives the same weights as stepping after the backward pass; what
it rules out is anything that needs every gradient first (global-norm clipping, gradient
accumulation over micro-batches).

Why not torchao's AdamW8bit: torchao 0.18.0 installs from PyPI and did step a world-size-1 FSDP2
model here (DTensor states), but it is not a memfit dependency, its update goes through
torch.compile (a C++ build per shape on a CPU), and memfit already carries a tested block-wise
format; one more package for the same bytes was not worth it.
"""

from __future__ import annotations

import torch

from memfit.distill.loop import BLOCK, dequantize_blockwise, quantize_blockwise
from memfit.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit")
CHUNK_BLOCKS = 1024  # blocks updated at a time: 256k elements, ~1 MB per float32 temporary

__all__ = ["OPTIMIZERS", "ShardedAdamW8bit", "StepInBackward", "make_optimizer", "state_nbytes",
           "stochastic_round_bf16"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (a plain tensor is returned as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedAdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit moments, stepped on each parameter's local shard."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        w, g = _local(p), _local(p.grad)
        st = self.state[p]
        n = g.numel()
        if not st:
            st["step"] = 0
            nb = -(-n // BLOCK)
            st["m"] = torch.zeros(nb, BLOCK, dtype=torch.int8, device=g.device)
            st["m_absmax"] = torch.zeros(nb, device=g.device)
            st["sqrt_v"] = torch.zeros(nb, BLOCK, dtype=torch.uint8, device=g.device)
            st["v_absmax"] = torch.zeros(nb, device=g.device)
        st["step"] += 1
        w_flat, g_flat = w.view(-1), g.reshape(-1)
        for b0 in range(0, st["m"].shape[0], CHUNK_BLOCKS):  # bounded float32 temporaries
            b1 = min(b0 + CHUNK_BLOCKS, st["m"].shape[0])
            e0, e1 = b0 * BLOCK, min(b1 * BLOCK, n)
            self._update_chunk(w_flat[e0:e1], g_flat[e0:e1].float(), st, slice(b0, b1), group)

    @staticmethod
    def _update_chunk(w: torch.Tensor, g: torch.Tensor, st: dict, blocks: slice,
                      group: dict) -> None:
        """The exact AdamW update of one run of whole blocks, then their moments re-quantized."""
        beta1, beta2 = group["betas"]
        m = dequantize_blockwise(st["m"][blocks], st["m_absmax"][blocks], g)
        v = dequantize_blockwise(st["sqrt_v"][blocks], st["v_absmax"][blocks], g).square_()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = group["lr"] / (1 - beta1 ** st["step"])
        denom = v.div(1 - beta2 ** st["step"]).sqrt_().add_(group["eps"])
        if group["weight_decay"]:
            w.mul_(1 - group["lr"] * group["weight_decay"])
        update = m.div(denom).mul_(-step_size)
        if w.dtype == torch.bfloat16:  # no float32 master copy: round stochastically
            w.copy_(stochastic_round_bf16(update.add_(w.float())))
        else:
            w.add_(update.to(w.dtype))
        st["m"][blocks], st["m_absmax"][blocks] = quantize_blockwise(m, signed=True)
        st["sqrt_v"][blocks], st["v_absmax"][blocks] = quantize_blockwise(v.sqrt_(), signed=False)


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 rounded up with probability (x - lower) / (upper - lower): a random
    16-bit integer added to the low half of the float32 bits, which are then cut off (exact,
    unbiased; non-finite values pass through)."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    out = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x).to(torch.bfloat16)


class StepInBackward:
    """One optimizer per parameter, stepped from a post-accumulate-grad hook, the gradient freed
    right after; `step` and `zero_grad` are no-ops for the training loop. `state` merges the
    per-parameter optimizers' states (for state_nbytes)."""

    def __init__(self, name: str, params, lr: float, weight_decay: float = 0.0):
        self.optimizers = {}
        self._hooks = []
        for p in params:
            if not p.requires_grad:
                continue
            opt = make_optimizer(name, [p], lr, weight_decay)
            self.optimizers[p] = opt
            self._hooks.append(p.register_post_accumulate_grad_hook(self._step_one))

    def _step_one(self, p: torch.Tensor) -> None:
        self.optimizers[p].step()
        p.grad = None

    @property
    def state(self) -> dict:
        return {p: st for opt in self.optimizers.values() for p, st in opt.state.items()}

    def step(self, closure=None):
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank (the local shards of DTensor states)."""
    return sum(_local(t).numel() * t.element_size() for st in optimizer.state.values()
               for t in st.values() if isinstance(t, torch.Tensor))


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """`adamw` (torch's, float32 moments: 8 bytes/parameter) or `adamw8bit` (~2.03 bytes)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    if lr <= 0:
        raise UserError(f"--lr {lr} must be positive")
    params = list(params)
    if name == "adamw8bit":
        return ShardedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
