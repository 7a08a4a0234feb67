"""Per-rank training memory predicted from the ZeRO-3 formula, to print beside the measured peak.

    total = states + working set + activations
    states      = P / W x (param bytes + grad bytes + optimizer bytes)       (on the host when
                  the optimizer is offloaded; a DDP replica has W_shard = 1)
    working set = the unsharded root (embeddings, final norm, head) + 2 unsharded blocks (the one
                  running and the one prefetched) in the compute dtype, + one block's unsharded
                  float32 gradients before its reduce-scatter
    activations = what autograd keeps, per AC mode (below) + the loss's logits chunk
                  (--step-in-backward: no gradient term; the working set is the largest
                  parameter's gradient and the 8-bit update's float32 chunk temporaries)
    residual    = int8 and PowerSGD error feedback: a float32 copy of the whole gradient (each
                  rank keeps what it sent and lost, for every destination), 4 P bytes

Optimizer bytes per parameter: AdamW float32 m and v = 8; 8-bit = 2 + 2 x 4 / 256 (two float32
scales per block of 256) = 2.03125.

Activations of one Llama-style block per token, in elements of the compute dtype (an estimate
from the tensors autograd saves with SDPA attention, whose probabilities are not kept):
8 H (norm inputs and outputs, q, attention output and its reshaped copy, o_proj input, residual)
+ 4 KV (k, v before and after RoPE) + 4 I (gate, up, silu(gate), down_proj input).
AC none keeps that for every block; full keeps each block's input (H) and recomputes one block
at a time; selective (every other block, memfit's choice: half the recompute of full) keeps
full activations for the odd blocks and inputs for the even ones. The backward pass of a block
holds the gradients of its activations besides them: one more block's worth. The loss keeps the final
hidden states and recomputes (B, chunk, V) float32 logits per chunk (three slabs: logits,
log-probabilities and their gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

AC_MODES = ("none", "full", "selective")
OPTIM_BYTES = {"adamw": 8.0, "adamw8bit": 2 + 2 * 4 / 256}


@dataclass(frozen=True, kw_only=True)
class Shape:
    """What the formula needs to know about the model and the batch."""

    params: int          # all parameters
    root_params: int     # parameters outside the blocks (embeddings, final norm, head)
    block_params: int    # parameters of the largest block
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int          # key/value heads x head dim
    vocab: int
    largest_param: int = 0  # elements of the largest single parameter (an embedding table)


def checkpointed_blocks(layers: int, ac: str) -> list[int]:
    """Indices of the blocks wrapped in activation checkpointing for an AC mode."""
    if ac not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing {ac!r}; use one of {AC_MODES}")
    if ac == "none":
        return []
    if ac == "full":
        return list(range(layers))
    return list(range(0, layers, 2))  # selective: every other block, starting at the first


def activation_bytes(s: Shape, *, batch: int, seq_len: int, ac: str, compute_bytes: int,
                     chunk: int = 256) -> int:
    """Activation estimate for one rank's micro-batch (see the module docstring)."""
    tokens = batch * seq_len
    per_block = tokens * (8 * s.hidden + 4 * s.kv_dim + 4 * s.intermediate) * compute_bytes
    block_input = tokens * s.hidden * compute_bytes
    n_ck = len(checkpointed_blocks(s.layers, ac))
    blocks = n_ck * block_input + (s.layers - n_ck) * per_block + (per_block if n_ck else 0)
    blocks += per_block if s.layers else 0  # gradients of one block's activations in backward
    head = 2 * tokens * s.hidden * compute_bytes + 3 * batch * min(chunk, seq_len) * s.vocab * 4
    return blocks + head


def predict(s: Shape, *, world: int, engine: str, optimizer: str, offload: bool,
            compute_bytes: int, act_bytes: int, param_bytes: int = 4,
            grad_comm: str = "fp32") -> dict:
    """-> bytes per rank: states, working set, activations, error-feedback residual, total, and
    `weights_bytes` (the resident weights, already allocated before the first step)."""
    shard = world if engine == "fsdp2" else 1
    # weights, gradients (float32 under FSDP2's reduce; in the weights' dtype otherwise), optimizer
    grad_bytes = 4 if engine != "single" else 0  # stepped in the backward: never all at once
    per_param = param_bytes + grad_bytes + OPTIM_BYTES[optimizer]
    states = 0 if offload else round(s.params / shard * per_param)
    if engine == "single":  # the largest parameter's gradient, then its optimizer temporaries
        working = s.largest_param * param_bytes + 4 * 4 * 1024 * 256  # 4 float32 chunk temps
    elif engine == "fsdp2" and world > 1:
        working = (s.root_params + 2 * s.block_params) * compute_bytes + s.block_params * 4
    else:  # nothing is gathered: weights are whole already
        working = 0
    # error feedback keeps what every sent gradient lost: float32, the whole (unsharded) gradient
    residual = 4 * s.params if grad_comm in ("int8", "powersgd") and world > 1 else 0
    total = states + working + act_bytes + residual
    return {"states_bytes": states, "working_bytes": working, "activation_bytes": act_bytes,
            "residual_bytes": residual, "total_bytes": total, "bytes_per_param": per_param,
            "shard": shard, "weights_bytes": 0 if offload else s.params * param_bytes // shard}


def model_shape(model) -> Shape:
    """The formula's Shape of a transformers causal LM (memfit.archs finds its blocks)."""
    from memfit.archs import arch_for, block_list, text_config

    cfg = text_config(model.config)
    blocks = block_list(model, arch_for(model.config))
    seen: set[int] = set()

    def count(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    block_sizes = [count(b.parameters()) for b in blocks]
    root = count(model.parameters())
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    largest = max(p.numel() for p in model.parameters())
    return Shape(params=root + sum(block_sizes), root_params=root, block_params=max(block_sizes),
                 largest_param=largest,
                 layers=len(blocks), hidden=cfg.hidden_size,
                 intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                 kv_dim=kv_heads * head_dim, vocab=cfg.vocab_size)
