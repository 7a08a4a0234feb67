"""Encoder (BERT-style) evaluation: mean-pooled sentence embeddings, compared with a reference
model's by cosine similarity per sentence. Mean pooling over non-padding tokens is what
sentence-transformers models such as all-MiniLM-L6-v2 use; it is also a fair probe for any encoder.

With a reference, a retrieval check too: how often each sentence's nearest neighbour among the
others stays the same sentence (top-1 nearest-neighbour agreement). That count is fragile where
the reference itself hardly separates two candidates: on the embedded encoder, running the same
fp32 weights under bfloat16 autocast (cosine 0.99999 to fp32) already moves 6 of the 256
held-apart sentences' nearest neighbours (benchmarks/RESULTS.md, issue 14). So the agreement is also reported over the
"clear" queries only, those whose reference top-1 similarity beats the runner-up by at least
`MARGIN` (0.01 in cosine, fixed before measuring), with how many queries that is.

The held-apart sentences (`held_apart`) are distinct sentence-like lines of 5+ words, taken
evenly spaced over the whole split, so a retrieval check is not dominated by one document nor
by exact repeats (whose nearest neighbour is trivially the copy).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memfit.errors import UserError
from memfit.eval.memory import PeakMemory
from memfit.models import input_device

MARGIN = 0.01  # cosine gap between a query's reference top-1 and top-2 that counts as "clear"
MIN_WORDS = 5  # a held-apart sentence has at least this many words (not a heading or signature)


def held_apart(source: str = "builtin", split: str = "eval", n: int = 256) -> list[str]:
    """`n` distinct sentence-like lines of MIN_WORDS+ words, evenly spaced over the split (in
    document order; all of them when the split holds fewer). Distinct: equal after collapsing
    whitespace; the first occurrence is kept."""
    from memfit.calib.data import sentences

    seen, pool = set(), []
    for line in sentences(source, split, limit=None):
        key = " ".join(line.split())
        if key not in seen and len(key.split()) >= MIN_WORDS:
            seen.add(key)
            pool.append(line)
    if len(pool) < 2:
        raise UserError(f"{source} {split} text has fewer than 2 distinct lines of {MIN_WORDS}+ "
                        "words; a retrieval check needs more text")
    if len(pool) <= n:
        return pool
    return [pool[i * len(pool) // n] for i in range(n)]


@torch.inference_mode()
def embed(model, tokenizer, sentences: list[str], *, batch_size: int = 32,
          max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """(n, hidden) float32 mean-pooled embeddings."""
    device = input_device(model)
    out = []
    for b in tqdm(range(0, len(sentences), batch_size), disable=not progress, leave=False,
                  desc="embed"):
        enc = tokenizer(sentences[b:b + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        h = model(**enc).last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((h * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).cpu()


def _similarities(e: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarities, the diagonal (a sentence with itself) set to -inf."""
    e = F.normalize(e.float(), dim=1)
    sim = e @ e.T
    return sim.fill_diagonal_(-float("inf"))


def neighbour_agreement(emb: torch.Tensor, ref_emb: torch.Tensor, margin: float = 0.0) -> float:
    """Retrieval check: the fraction of sentences whose nearest neighbour (cosine, itself
    excluded) among the same sentences is the same sentence under `emb` as under `ref_emb`;
    with `margin` > 0, over the queries whose reference top-1 beats its top-2 by >= margin only
    (nan when there is none)."""
    if len(emb) < 2:
        raise ValueError("a nearest neighbour needs at least 2 sentences")
    ref_sim = _similarities(ref_emb)
    same = _similarities(emb).argmax(1) == ref_sim.argmax(1)
    if margin > 0:
        if len(emb) < 3:
            raise ValueError("a margin to the runner-up needs at least 3 sentences")
        top2 = ref_sim.topk(2, dim=1).values  # (n, 2)
        same = same[top2[:, 0] - top2[:, 1] >= margin]
    return same.float().mean().item() if len(same) else float("nan")


def compare(emb: torch.Tensor, ref_emb: torch.Tensor) -> dict:
    """Cosine (mean, min) and the retrieval check of `emb` against `ref_emb` (module docstring):
    `neighbour_agreement` over all queries, `neighbour_agreement_clear` over the
    `clear_queries` whose reference margin is at least MARGIN."""
    cos = F.cosine_similarity(emb, ref_emb, dim=1)
    top2 = _similarities(ref_emb).topk(2, dim=1).values
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "neighbour_agreement": neighbour_agreement(emb, ref_emb),
            "neighbour_agreement_clear": neighbour_agreement(emb, ref_emb, MARGIN),
            "clear_queries": int((top2[:, 0] - top2[:, 1] >= MARGIN).sum()),
            "neighbour_margin": MARGIN}


def evaluate_encoder(model, tokenizer, sentences: list[str], *, ref=None, batch_size: int = 32,
                     progress: bool = True) -> dict:
    """Throughput and peak memory; with `ref` (model, tokenizer) also cosine similarity."""
    device = input_device(model)
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
        result.update(**compare(emb, ref_emb),
                      cosine_per_sentence=[round(c, 6) for c in cos.tolist()])
    return result
