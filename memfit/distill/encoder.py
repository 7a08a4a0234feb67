"""Distillation healing for encoders: train a compressed encoder (the student) to give the
embeddings its original (the teacher) gives, keeping every format (a 2:4 model stays 2:4).

There are no logits to match, so the loss compares what an encoder is used for, on batches of
whole sentences padded to the longest, over real tokens only:

    loss = (1 - cos(mean-pooled student, mean-pooled teacher)).mean()
           + MSE(student token states, teacher token states) / mean teacher token state²

The first term is the quantity the targets are stated in; the second (scale-free, so its weight
does not depend on the model's hidden-state norms) gives every token a gradient. Training draws
sentences from the data's `calib` split; the before/after numbers come from its `eval` split.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memfit.distill.loop import make_optimizer, state_nbytes
from memfit.distill.trainable import make_trainable_, repack_
from memfit.errors import UserError
from memfit.eval.memory import PeakMemory


def _pooled(model, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (token states (B, T, H) float32, mean-pooled (B, H)) over the attention mask."""
    h = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return h, (h * mask).sum(1) / mask.sum(1).clamp(min=1)


def embedding_loss(h_s, e_s, h_t, e_t, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, mean cosine) for student/teacher token states h (B, T, H), pooled e (B, H) and
    the (B, T) attention mask (see the module docstring)."""
    cos = F.cosine_similarity(e_s, e_t, dim=1)
    m = mask.unsqueeze(-1).float()
    n = m.sum() * h_t.shape[-1]
    mse = ((h_s - h_t).square() * m).sum() / n
    scale = (h_t.square() * m).sum() / n
    return (1 - cos).mean() + mse / scale.clamp(min=1e-12), cos.mean()


def distill_encoder_(student, teacher, tokenizer, sentences: list[str], *, steps: int = 200,
                     lr: float = 1e-4, batch_size: int = 16, max_length: int = 128,
                     optimizer: str = "adamw", seed: int = 0, progress: bool = False) -> dict:
    """Train `student` towards `teacher`'s embeddings on `sentences`, in place; -> report."""
    if min(steps, batch_size) < 1 or lr <= 0:
        raise UserError("steps and batch_size must be at least 1 and lr positive")
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
                h_t, e_t = _pooled(teacher, enc)
            h_s, e_s = _pooled(student, enc)
            loss, cos = embedding_loss(h_s, e_s, h_t, e_t, enc["attention_mask"])
            loss.backward()
            opt.step()
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
                       "loss": "1 - cos(mean-pooled) + scale-free token MSE"},
            **report}
