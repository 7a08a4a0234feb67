"""A quick collapse guard used before a compressed model is written.

Before compressing, `Reference.capture` runs a few evaluation windows and keeps only the final
hidden states (windows x T x hidden, small) and the output head module itself (compression
replaces modules rather than mutating them, so the original head object stays intact). After
compressing, `check` recomputes both distributions chunk by chunk and returns perplexities and
KL(reference || compressed), without ever holding full logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memfit.eval.lm import _chunks, chunk_sums, final_hidden, head_logits


@dataclass
class Reference:
    windows: torch.Tensor
    hidden: list
    head: torch.nn.Module

    @classmethod
    @torch.inference_mode()
    def capture(cls, model, windows: torch.Tensor) -> "Reference":
        device = next(model.parameters()).device
        hidden = [final_hidden(model, windows[i:i + 1].to(device)) for i in range(len(windows))]
        return cls(windows=windows, hidden=hidden, head=model.get_output_embeddings())

    @torch.inference_mode()
    def check(self, model, chunk: int = 256) -> dict:
        device = next(model.parameters()).device
        nll = ref_nll = kld = 0.0
        tokens = 0
        for i in range(len(self.windows)):
            ids = self.windows[i:i + 1].to(device)
            got = window_sums(model, ids, final_hidden(model, ids), self.head, self.hidden[i],
                              chunk)
            nll += got["nll"]
            ref_nll += got["ref_nll"]
            kld += got["kld"]
            tokens += got["tokens"]
        finite = math.isfinite(nll) and math.isfinite(kld)
        return {"perplexity": math.exp(nll / tokens) if finite else float("nan"),
                "ref_perplexity": math.exp(ref_nll / tokens),
                "kld": kld / tokens if finite else float("nan"), "tokens": tokens,
                "windows": len(self.windows), "seq_len": int(self.windows.shape[1])}


def window_sums(model, ids: torch.Tensor, h: torch.Tensor, ref_head, ref_hidden: torch.Tensor,
                chunk: int = 256) -> dict:
    """NLL, reference NLL and KL sums of one window (1, T) scored chunk by chunk from the
    model's final hidden states `h` and the reference's (`ref_hidden` through `ref_head`):
    shared by the smoke check and the planner's probes (memfit.plan.probe)."""
    out = {"nll": 0.0, "ref_nll": 0.0, "kld": 0.0, "tokens": 0}
    for s, e in _chunks(ids.shape[1], chunk):
        target = ids[:, s + 1:e + 1].reshape(-1)
        got = chunk_sums(
            head_logits(model.get_output_embeddings(), h[:, s:e], model.config).flatten(0, 1),
            target, head_logits(ref_head, ref_hidden[:, s:e], model.config).flatten(0, 1))
        for k in ("nll", "ref_nll", "kld"):
            out[k] += got[k]
        out["tokens"] += target.numel()
    return out
