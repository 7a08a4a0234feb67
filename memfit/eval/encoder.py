"""Encoder (BERT-style) evaluation: mean-pooled sentence embeddings, compared with a reference
model's by cosine similarity per sentence. Mean pooling over non-padding tokens is what
sentence-transformers models such as all-MiniLM-L6-v2 use; it is also a fair probe for any encoder.
With a reference, a retrieval check too: how often each sentence's nearest neighbour among the
others stays the same sentence (top-1 nearest-neighbour agreement).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memfit.eval.memory import PeakMemory


@torch.inference_mode()
def embed(model, tokenizer, sentences: list[str], *, batch_size: int = 32,
          max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """(n, hidden) float32 mean-pooled embeddings."""
    device = next(model.parameters()).device
    out = []
    for b in tqdm(range(0, len(sentences), batch_size), disable=not progress, leave=False,
                  desc="embed"):
        enc = tokenizer(sentences[b:b + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        h = model(**enc).last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((h * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).cpu()


def neighbour_agreement(emb: torch.Tensor, ref_emb: torch.Tensor) -> float:
    """Retrieval check: the fraction of sentences whose nearest neighbour (cosine, itself
    excluded) among the same sentences is the same sentence under `emb` as under `ref_emb`."""
    if len(emb) < 2:
        raise ValueError("a nearest neighbour needs at least 2 sentences")

    def nearest(e):
        e = F.normalize(e.float(), dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return (nearest(emb) == nearest(ref_emb)).float().mean().item()


def evaluate_encoder(model, tokenizer, sentences: list[str], *, ref=None, batch_size: int = 32,
                     progress: bool = True) -> dict:
    """Throughput and peak memory; with `ref` (model, tokenizer) also cosine similarity."""
    device = next(model.parameters()).device
    with PeakMemory(device) as peak:
        t0 = time.perf_counter()
        emb = embed(model, tokenizer, sentences, batch_size=batch_size, progress=progress)
        seconds = time.perf_counter() - t0
        ref_emb = embed(*ref, sentences, batch_size=batch_size) if ref is not None else None
    tokens = sum(len(tokenizer(s, truncation=True, max_length=256)["input_ids"]) for s in sentences)
    result = {"sentences": len(sentences), "tokens": tokens, "seconds": seconds,
              "tokens_per_second": tokens / seconds, "embedding_dim": emb.shape[1],
              "embedding_norm_mean": emb.norm(dim=1).mean().item(), **peak.report()}
    if ref_emb is not None:
        cos = F.cosine_similarity(emb, ref_emb, dim=1)
        result.update(cosine_mean=cos.mean().item(), cosine_min=cos.min().item(),
                      neighbour_agreement=neighbour_agreement(emb, ref_emb),
                      cosine_per_sentence=[round(c, 6) for c in cos.tolist()])
    return result
