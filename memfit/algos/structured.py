"""Structured pruning scores: which whole blocks, MLP channels and attention heads to remove.

Pure functions over tensors: activations or weights and their statistics in, scores or index
lists out. Cutting the matrices and fixing the config is memfit.structured's job.

- Block influence (ShortGPT; Gromov et al., "The unreasonable ineffectiveness of the deeper
  layers"): a block whose output hidden state points the same way as its input changes little.
  Per token we take the angular distance arccos(cos(x_in, x_out)) / π, which lies in [0, 1] (0 =
  same direction, 0.5 = orthogonal, 1 = opposite), and average it over tokens. We use the angle
  rather than ShortGPT's 1 − cos because it is a true metric and its range is exactly [0, 1].
- MLP channel importance: channel j of the intermediate activation a contributes a_j · W_down[:, j]
  to the block output, so sqrt(E‖a_j W_down[:, j]‖²) = RMS(a_j) · ‖W_down[:, j]‖₂ exactly.
- Attention head importance: the o_proj input is the concatenation of the head outputs. A head's
  score is sqrt(Σ_c RMS(x_c)² ‖W_o[:, c]‖²) over its head_dim columns c: the RMS of the head's
  contribution to the output if its columns were uncorrelated (a cheap proxy that needs only the
  per-column RMS, not a head_dim x head_dim covariance per head).
- GQA: with `n_rep = heads / kv_heads`, query head h reads KV head h // n_rep (this is how
  transformers' `repeat_kv` lays them out). Heads are pruned in whole KV groups (one KV head and
  its n_rep query heads), so the ratio heads / kv_heads, and the model's GQA layout, is unchanged.
  A group's score is the sum of its query heads' squared scores, square-rooted (the same
  uncorrelated-contribution RMS, over the whole group).

Kept indices are always returned sorted ascending, so keeping everything is the identity, bit
for bit, and pruning preserves the original order of the surviving channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memfit.errors import UserError


def angular_distances(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """(tokens,) float32 arccos(cos(x_in, x_out)) / π per token of (..., hidden) activations."""
    if x_in.shape != x_out.shape:
        raise ValueError(f"block input {tuple(x_in.shape)} and output {tuple(x_out.shape)} "
                         "differ in shape")
    a = x_in.detach().reshape(-1, x_in.shape[-1]).float()   # (tokens, hidden)
    b = x_out.detach().reshape(-1, x_out.shape[-1]).float()  # (tokens, hidden)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """Mean angular distance in [0, 1] between a block's input and output hidden states."""
    d = angular_distances(x_in, x_out)
    if d.numel() == 0:
        raise UserError("no tokens reached this block, so its influence is undefined; "
                        "give more calibration text")
    return float(d.mean())


def choose_blocks_to_drop(scores: Sequence[float], n: int) -> list[int]:
    """Indices (ascending) of the `n` least influential blocks; ties go to the earlier block."""
    count = len(scores)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UserError(f"cannot drop {n!r} blocks; give a whole number from 0 to {count - 1}")
    if n >= count:
        raise UserError(f"cannot drop {n} of {count} blocks: at least one must remain; "
                        f"drop at most {count - 1}")
    order = sorted(range(count), key=lambda i: (float(scores[i]), i))
    return sorted(order[:n])


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(keep,) int64 indices of the `keep` highest scores, sorted ascending."""
    width = scores.numel()
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= width:
        raise UserError(f"cannot keep {keep!r} of {width} channels; "
                        f"give a whole number from 1 to {width}")
    top = torch.topk(scores.detach().float().reshape(-1), keep, sorted=False).indices
    return top.sort().values.to(torch.int64)


def keep_count(width: int, keep: int | float) -> int:
    """How many of `width` units to keep: an int count, or a float fraction in (0, 1] (rounded,
    at least 1)."""
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise UserError(f"keep fraction {keep} is outside (0, 1]; give e.g. 0.5")
        return max(1, int(math.floor(keep * width + 0.5)))
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 1 <= keep <= width:
            raise UserError(f"cannot keep {keep} of {width}; give a whole number from 1 to {width}")
        return keep
    raise UserError(f"keep={keep!r} is not a count or a fraction; give e.g. 0.5 or {width // 2}")


def _check_norms(norms: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if norms.dim() != 1 or norms.shape[0] != weight.shape[1]:
        raise UserError(f"{what} input norms have shape {tuple(norms.shape)} but the weight has "
                        f"{weight.shape[1]} input columns; pass the per-column RMS, shape (in,)")


def mlp_channel_scores(act_rms: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """(intermediate,) float32 RMS(a_j) · ‖W_down[:, j]‖₂ for down_proj weight (hidden, inter)."""
    _check_norms(act_rms, down_weight, "down_proj")
    col = down_weight.detach().float().norm(dim=0)  # (inter,)
    return act_rms.detach().float().to(col.device) * col


def weight_channel_scores(up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """(intermediate,) data-free fallback ‖W_up[j]‖₂ · ‖W_down[:, j]‖₂."""
    return up_weight.detach().float().norm(dim=1) * down_weight.detach().float().norm(dim=0)


def head_scores(o_in_rms: torch.Tensor, o_weight: torch.Tensor, num_heads: int,
                head_dim: int) -> torch.Tensor:
    """(num_heads,) float32 sqrt(Σ_c RMS(x_c)² ‖W_o[:, c]‖²) over each head's columns c."""
    _check_norms(o_in_rms, o_weight, "o_proj")
    if num_heads * head_dim != o_weight.shape[1]:
        raise ValueError(f"{num_heads} heads x {head_dim} dims != o_proj width {o_weight.shape[1]}")
    per_col = o_in_rms.detach().float().to(o_weight.device) ** 2 \
        * o_weight.detach().float().pow(2).sum(0)              # (heads * head_dim,)
    return per_col.reshape(num_heads, head_dim).sum(1).sqrt()  # (heads,)


def kv_group_scores(scores_per_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(num_kv_heads,) sqrt of the summed squared scores of the query heads sharing each KV head."""
    num_heads = scores_per_head.numel()
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
    grouped = scores_per_head.float().reshape(num_kv_heads, num_heads // num_kv_heads)
    return grouped.pow(2).sum(1).sqrt()


def groups_for_heads(num_heads: int, num_kv_heads: int, keep_heads: int) -> int:
    """KV groups to keep so that exactly `keep_heads` query heads remain (GQA-aware)."""
    n_rep = num_heads // num_kv_heads
    if not isinstance(keep_heads, int) or isinstance(keep_heads, bool) \
            or not 1 <= keep_heads <= num_heads or keep_heads % n_rep:
        raise UserError(
            f"cannot keep {keep_heads!r} of {num_heads} attention heads: heads are pruned in whole "
            f"KV groups of {n_rep}; give a multiple of {n_rep} from {n_rep} to {num_heads}")
    return keep_heads // n_rep


def gqa_indices(groups: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rows, kv_rows) int64: q_proj rows (= o_proj columns) and k/v_proj rows of the kept
    KV groups, in ascending order."""
    n_rep = num_heads // num_kv_heads
    groups = groups.to(torch.int64).reshape(-1)
    dims = torch.arange(head_dim, dtype=torch.int64)
    heads = (groups[:, None] * n_rep + torch.arange(n_rep)).reshape(-1)  # (kept groups * n_rep,)
    q_rows = (heads[:, None] * head_dim + dims).reshape(-1)              # (kept heads * head_dim,)
    kv_rows = (groups[:, None] * head_dim + dims).reshape(-1)            # (kept groups * head_dim,)
    return q_rows, kv_rows
