"""Perplexity, KL divergence and top-1 agreement of causal LMs, streamed.

Vocabularies are 50k-150k tokens, so a (windows, seq_len, vocab) logits tensor would dwarf a small
model. memfit runs the base model to get hidden states, then applies the output head to chunks of
`chunk` positions at a time and reduces each chunk to sums (negative log-likelihood, KL, top-1
hits) before the next. Peak extra memory is one (batch, chunk, vocab) float32 slab per model
(two with a reference), independent of seq_len (`chunk_sums` works in place); the plain `model(ids, labels=ids)` loop holds the whole (batch, seq_len, vocab) logits.

Protocol: every window is scored on its positions 1..seq_len-1 given the preceding tokens of the
same window (no context carried between windows), the GPTQ/SparseGPT convention. KL is
KL(reference || model) per token, averaged, as llama.cpp reports it.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from memfit.eval.memory import PeakMemory
from memfit.models import input_device


def head_logits(head, h: torch.Tensor, config) -> torch.Tensor:
    """float32 logits of hidden states `h` through an output `head` (with Gemma-2's soft cap)."""
    logits = head(h).float()
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def output_logits(model, h: torch.Tensor) -> torch.Tensor:
    """float32 logits of `model`'s output head on hidden states `h`."""
    return head_logits(model.get_output_embeddings(), h, model.config)


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The base model's final hidden states (after the final norm) for token ids."""
    out = model.base_model(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def final_hidden_cached(model, ids: torch.Tensor, kv_format, step: int) -> torch.Tensor:
    """Final hidden states computed `step` tokens at a time through a quantized KV cache
    (memfit.kvcache), so each step attends to the quantized past as decoding would."""
    from memfit.kvcache import QuantizedKVCache, cache_kwarg

    cache = QuantizedKVCache(model.config, kv_format)
    kw = cache_kwarg(model.base_model)
    outs = []
    for s in range(0, ids.shape[1], step):
        out = model.base_model(input_ids=ids[:, s:s + step], use_cache=True, **{kw: cache})
        outs.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])
    return torch.cat(outs, dim=1)


def _chunks(seq_len: int, chunk: int):
    """Position ranges [s, e) whose logits predict tokens s+1..e (the last position predicts none)."""
    for s in range(0, seq_len - 1, chunk):
        yield s, min(s + chunk, seq_len - 1)


def _log_probs_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary, written over `logits` (same bits as F.log_softmax: the
    kernel reads each row before writing it), so no second slab exists."""
    return torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)


def kl_sum(log_q: torch.Tensor, log_p: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Σ q (log q - log p): KL(q || p) summed over every position of (..., V) log-probabilities,
    the one KL of memfit (eval, the smoke check and distillation's loss). `inplace` overwrites both
    inputs (no vocabulary-sized temporary: for inference); otherwise it is differentiable."""
    if inplace:
        log_p.sub_(log_q).neg_()  # log q - log p
        return torch.dot(log_q.exp_().view(-1), log_p.view(-1))
    return (log_q.exp() * (log_q - log_p)).sum()


@torch.inference_mode()
def chunk_sums(logits: torch.Tensor, target: torch.Tensor,
               ref_logits: torch.Tensor | None = None) -> dict:
    """Sums over one chunk of positions: nll of `target` (N,), and with reference logits also the
    reference's nll, KL(reference || model) and top-1 agreement. `logits`/`ref_logits` are
    fresh (N, V) float32 buffers this function overwrites: the peak is those two slabs (one
    without a reference) and nothing vocabulary-sized beside them. Logits of two widths (one
    table padded past the tokenizer) are compared over the columns both have, renormalized."""
    lp = _log_probs_(logits)
    out = {"nll": -lp.gather(1, target[:, None]).sum().item()}
    if ref_logits is None:
        return out
    lq = _log_probs_(ref_logits)
    out["ref_nll"] = -lq.gather(1, target[:, None]).sum().item()
    if lq.shape[1] != lp.shape[1]:  # one tokenizer, one table padded wider (rows no token has):
        width = min(lq.shape[1], lp.shape[1])  # compared over the rows both have
        lp, lq = (_log_probs_(t[:, :width].contiguous()) for t in (lp, lq))
    out["top1"] = (lq.argmax(-1) == lp.argmax(-1)).sum().item()
    out["kld"] = kl_sum(lq, lp, inplace=True).item()
    return out


def _fresh_logits(model, h: torch.Tensor) -> torch.Tensor:
    """(N, V) float32 logits of hidden states (B, C, H): a new buffer, safe to overwrite. A
    16-bit head first makes a 16-bit slab, freed once converted (1.5 slabs for a moment)."""
    return output_logits(model, h).flatten(0, 1)


@torch.inference_mode()
def evaluate_lm(model, windows: torch.Tensor, *, ref=None, batch_size: int = 1, chunk: int = 512,
                progress: bool = True, kv_format=None, kv_step: int = 64) -> dict:
    """Score `model` on (n, seq_len) token windows; with `ref`, also KLD and top-1 agreement.

    Returns perplexity, nll, tokens, windows, seq_len, tokens_per_second (window tokens per second
    of scoring; with `ref` the reference's forward passes are inside that time) and peak memory; with ref also kld, top1_agreement and ref_perplexity.
    `kv_format` (memfit.kvcache.KVFormat): the model (not the reference) runs `kv_step` tokens at a
    time through a quantized KV cache; the reference keeps full-precision attention.
    """
    device = input_device(model)
    n, seq_len = windows.shape
    sums = {"nll": 0.0, "ref_nll": 0.0, "kld": 0.0, "top1": 0.0}
    tokens, fwd_seconds = 0, 0.0
    with PeakMemory(device) as peak:
        bar = tqdm(total=n, desc="eval", unit="win", disable=not progress, leave=False)
        for b in range(0, n, batch_size):
            ids = windows[b:b + batch_size].to(device)
            t0 = time.perf_counter()
            h = (final_hidden(model, ids) if kv_format is None
                 else final_hidden_cached(model, ids, kv_format, kv_step))
            h_ref = final_hidden(ref, ids) if ref is not None else None
            for s, e in _chunks(seq_len, chunk):
                target = ids[:, s + 1:e + 1].reshape(-1)
                logits = _fresh_logits(model, h[:, s:e])  # (B*C, V)
                ref_logits = None if h_ref is None else _fresh_logits(ref, h_ref[:, s:e].to(h.device))
                for k, v in chunk_sums(logits, target, ref_logits).items():
                    sums[k] += v
                del logits, ref_logits
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            fwd_seconds += time.perf_counter() - t0
            tokens += ids.shape[0] * (seq_len - 1)
            bar.update(ids.shape[0])
        bar.close()
    result = {
        "perplexity": math.exp(sums["nll"] / tokens),
        "nll": sums["nll"] / tokens,
        "tokens": tokens,
        "windows": n,
        "seq_len": seq_len,
        "seconds": fwd_seconds,
        "tokens_per_second": n * seq_len / fwd_seconds if fwd_seconds else float("nan"),
        **peak.report(),
    }
    if ref is not None:
        result.update(kld=sums["kld"] / tokens, top1_agreement=sums["top1"] / tokens,
                      ref_perplexity=math.exp(sums["ref_nll"] / tokens))
    return result
