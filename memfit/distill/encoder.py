"""Distillation healing for encoders: train a compressed encoder (the student) to give the
embeddings its original (the teacher) gives, keeping every format (a 2:4 model stays 2:4).

There are no logits to match, so the loss compares what an encoder is used for, on batches of
whole sentences padded to the longest, over real tokens only:

    loss = (1 - cos(mean-pooled student, mean-pooled teacher)).mean()
           + MSE(student token states, teacher token states) / mean teacher token state²
           + hidden_mse x the same scale-free MSE, averaged over the matched inner blocks

The first term is the quantity the targets are stated in; the second (scale-free, so its weight
does not depend on the model's hidden-state norms) gives every token a gradient; the third
(`--hidden-mse`, memfit.distill.losses.matched_layers pairs the blocks) gives every block its own
target, so an early block's error is corrected where it arises instead of only through the
blocks after it. The learning rate warms up linearly over the first WARMUP of the steps, then
follows a cosine decay to zero ("cosine"; "constant" keeps it flat). Training draws sentences
from the data's `calib` split; the before/after numbers come from its `eval` split.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memfit.distill.loop import make_optimizer, state_nbytes
from memfit.distill.trainable import make_trainable_, repack_
from memfit.errors import UserError
from memfit.eval.memory import PeakMemory


WARMUP = 0.1  # share of the steps over which the learning rate rises linearly to `lr`
SCHEDULES = ("cosine", "constant")


def _pooled(model, enc, hidden: bool = False):
    """-> (token states (B, T, H) float32, mean-pooled (B, H), every block's output or None)."""
    out = model(**enc, output_hidden_states=hidden)
    h = out.last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return h, (h * mask).sum(1) / mask.sum(1).clamp(min=1), out.hidden_states if hidden else None


def scale_free_mse(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of (B, T, H) states over the (B, T) mask's real tokens / mean teacher state²."""
    m = mask.unsqueeze(-1).float()
    n = m.sum() * h_t.shape[-1]
    mse = ((h_s.float() - h_t.float()).square() * m).sum() / n
    return mse / ((h_t.float().square() * m).sum() / n).clamp(min=1e-12)


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The learning-rate multiplier at `step` (0-based) of `steps` (module docstring)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def embedding_loss(h_s, e_s, h_t, e_t, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, mean cosine) for student/teacher token states h (B, T, H), pooled e (B, H) and
    the (B, T) attention mask (see the module docstring)."""
    cos = F.cosine_similarity(e_s, e_t, dim=1)
    return (1 - cos).mean() + scale_free_mse(h_s, h_t, mask), cos.mean()


def distill_encoder_(student, teacher, tokenizer, sentences: list[str], *, steps: int = 200,
                     lr: float = 1e-4, batch_size: int = 16, max_length: int = 128,
                     optimizer: str = "adamw", seed: int = 0, hidden_mse: float = 0.0,
                     layer_map: dict[int, int] | None = None, schedule: str = "cosine",
                     progress: bool = False) -> dict:
    """Train `student` towards `teacher`'s embeddings on `sentences`, in place; -> report.
    `layer_map`: {teacher hidden-state index: student's} for the `hidden_mse` term."""
    if min(steps, batch_size) < 1 or lr <= 0:
        raise UserError("steps and batch_size must be at least 1 and lr positive")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {schedule!r}; use one of {SCHEDULES}")
    if hidden_mse > 0 and not layer_map:
        raise UserError("hidden_mse needs matched blocks (layer_map); the student has one block")
    if len(sentences) < batch_size:
        raise UserError(f"{len(sentences)} training sentences are fewer than one batch of "
                        f"{batch_size}; use more text or a smaller --batch-size")
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    trained = make_trainable_(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UserError("the student has no linear or compressed module to train")
    opt = make_optimizer(optimizer, params, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, schedule))
    hidden = hidden_mse > 0
    student.train()
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses, cosines = [], []
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        for _ in tqdm(range(steps), desc="distill", unit="step", disable=not progress):
            if len(order) < batch_size:  # a fresh fixed-seed permutation per epoch
                order = torch.randperm(len(sentences), generator=gen).tolist()
            batch, order = [sentences[i] for i in order[:batch_size]], order[batch_size:]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            with torch.no_grad():
                h_t, e_t, hs_t = _pooled(teacher, enc, hidden)
            h_s, e_s, hs_s = _pooled(student, enc, hidden)
            loss, cos = embedding_loss(h_s, e_s, h_t, e_t, enc["attention_mask"])
            if hidden:
                inner = [scale_free_mse(hs_s[j], hs_t[i], enc["attention_mask"])
                         for i, j in layer_map.items()]
                loss = loss + hidden_mse * torch.stack(inner).mean()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            cosines.append(cos.item())
        seconds = time.perf_counter() - t0
        report = peak.report()
    opt_bytes = state_nbytes(opt)
    del opt
    repack_(student)
    student.eval()
    return {"steps": steps, "loss": losses, "train_cosine": cosines, "seconds": seconds,
            "sentences": steps * batch_size, "trained_modules": len(trained),
            "trainable_parameters": sum(p.numel() for p in params), "optimizer": optimizer,
            "optimizer_state_bytes": opt_bytes,
            "config": {"steps": steps, "lr": lr, "batch_size": batch_size,
                       "max_length": max_length, "optimizer": optimizer, "seed": seed,
                       "schedule": schedule, "warmup": WARMUP if schedule == "cosine" else 0,
                       "hidden_mse": hidden_mse,
                       "loss": "1 - cos(mean-pooled) + scale-free token MSE"
                               + (" + hidden_mse x inner-block MSE" if hidden else "")},
            **report}
