"""Distillation losses: logit KL with a temperature, and hidden-state MSE on matched layers.

Pure functions over a model's hidden states; the loop (memfit.distill.loop) owns the forward
passes, the data and the optimizer.

Memory: vocabularies are 50k-150k tokens, so the (B, T, V) logits of teacher and student would
dwarf a small model, and autograd would keep every chunk's softmax for the backward pass if the
chunks were simply summed. `logit_kl` therefore applies the output heads to `chunk` positions at a
time inside activation checkpointing: each chunk's logits are freed after its forward and
recomputed (teacher's too, under no_grad) in the backward pass. Peak extra memory is a few
(B, chunk, V) float32 slabs, independent of the sequence length, for one extra head matmul per
chunk. The teacher's head is applied to its own hidden states (as memfit.eval.lm does), so
neither model's full logits ever exist.

KL(teacher || student) of the temperature-softened distributions, times T² (Hinton et al.: it
keeps the gradient scale independent of T), averaged over every position of every window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from memfit.errors import UserError
from memfit.eval.lm import kl_sum, output_logits as head_logits


def hidden_states(model, ids: torch.Tensor, layers: tuple[int, ...] = ()) -> tuple:
    """-> (last hidden state (B, T, H), {layer index: hidden state (B, T, H)} for `layers`).

    Index 0 is the embedding output and i the output of block i (transformers' convention)."""
    out = model.base_model(input_ids=ids, use_cache=False, output_hidden_states=bool(layers))
    last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if not layers:
        return last, {}
    hs = out.hidden_states
    bad = [i for i in layers if not 0 <= i < len(hs)]
    if bad:
        raise UserError(f"layer map names layer(s) {bad} but the model has hidden states "
                        f"0..{len(hs) - 1}; fix the layer map")
    return last, {i: hs[i] for i in layers}


def _chunk_kl(student, teacher, temperature: float, h_s: torch.Tensor,
              h_t: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over a (B, C, H) chunk of positions. Heads of two widths
    (one tokenizer, one table padded past it) are compared over the columns both have."""
    z_s = head_logits(student, h_s)  # (B, C, V)
    with torch.no_grad():
        z_t = head_logits(teacher, h_t)
        width = min(z_s.shape[-1], z_t.shape[-1])
        log_p_t = F.log_softmax(z_t[..., :width] / temperature, dim=-1)
    log_p_s = F.log_softmax(z_s[..., :width] / temperature, dim=-1)
    return kl_sum(log_p_t, log_p_s)


def logit_kl(student, teacher, h_s: torch.Tensor, h_t: torch.Tensor, *, temperature: float = 1.0,
             chunk: int = 256) -> torch.Tensor:
    """Mean per-token KL(teacher || student) × T² from the two models' last hidden states."""
    if temperature <= 0:
        raise UserError(f"temperature={temperature} must be positive (1.0 is plain KL)")
    if h_s.shape[:2] != h_t.shape[:2]:
        raise UserError(f"student hidden states {tuple(h_s.shape)} and teacher's "
                        f"{tuple(h_t.shape)} cover different tokens; feed both the same windows")
    b, t = h_s.shape[:2]
    total = h_s.new_zeros((), dtype=torch.float32)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        total = total + checkpoint(_chunk_kl, student, teacher, temperature, h_s[:, s:e],
                                   h_t[:, s:e].to(h_s.device), use_reentrant=False)
    return total * temperature**2 / (b * t)


def hidden_mse(student_hidden: dict, teacher_hidden: dict, layer_map: dict[int, int]) -> torch.Tensor:
    """Mean over matched layers of MSE(student, teacher) / mean(teacher²).

    `layer_map` is {teacher layer: student layer}. Dividing by the teacher's mean square makes
    the term scale-free (hidden states grow with depth), so one weight fits every layer."""
    if not layer_map:
        raise UserError("hidden-state MSE needs a layer map {teacher layer: student layer}")
    terms = []
    for t_i, s_i in layer_map.items():
        hs, ht = student_hidden[s_i], teacher_hidden[t_i].to(student_hidden[s_i].device)
        if hs.shape != ht.shape:
            raise UserError(f"teacher layer {t_i} {tuple(ht.shape)} and student layer {s_i} "
                            f"{tuple(hs.shape)} differ in shape; match layers of equal width")
        ht = ht.float()
        terms.append(F.mse_loss(hs.float(), ht) / ht.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def matched_layers(n_teacher: int, n_student: int,
                   kept: list[int] | None = None) -> dict[int, int]:
    """{teacher hidden-state index: student's} for the hidden MSE, one pair per student block but
    the last (its output is the final, normed hidden state, which the logit KL already matches).

    `kept`: the teacher's block indices the student kept (memfit compress records them when it
    drops blocks), so student block j is teacher block kept[j]; without it blocks are spread
    evenly (student block j ~ teacher block round((j + 1) n_teacher / n_student) - 1), which is
    the identity for equal depths."""
    if n_student > n_teacher:
        raise UserError(f"the student has {n_student} blocks, more than the teacher's "
                        f"{n_teacher}; hidden-state matching needs a student no deeper")
    if kept is not None:
        if (len(kept) != n_student or sorted(set(kept)) != list(kept)
                or not all(0 <= k < n_teacher for k in kept)):
            raise UserError(f"kept blocks {kept} do not describe a {n_student}-block student of "
                            f"a {n_teacher}-block teacher; pass a matching teacher")
        pairs = {kept[j]: j for j in range(n_student)}
    else:
        pairs = {round((j + 1) * n_teacher / n_student) - 1: j for j in range(n_student)}
    return {t + 1: s + 1 for t, s in pairs.items() if s < n_student - 1}


def model_layer_map(teacher, student, kept: list[int] | None) -> dict[int, int]:
    """Teacher/student hidden states to match: through the blocks memfit compress kept when it
    dropped some, else spread evenly (memfit.distill.losses.matched_layers)."""
    from memfit.archs import arch_for, block_list

    n_t = len(block_list(teacher, arch_for(teacher.config)))
    n_s = len(block_list(student, arch_for(student.config)))
    return matched_layers(n_t, n_s, kept if n_s < n_t else None)
