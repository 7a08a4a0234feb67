"""Measure a candidate plan's KL divergence to the original without building it: the chosen
modules' dequantized weights are swapped into the dense model (the same values the packed
modules compute with), dropped blocks are bypassed by a hook, the KL is measured on held windows,
and everything is put back. Probing a plan costs one forward pass over the probe windows.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from memfit.eval.lm import final_hidden, final_hidden_cached
from memfit.eval.smoke import window_sums


class ProbeReference:
    """The original model's final hidden states on the probe windows and a frozen copy of its
    output head (swapping a tied table changes the live head)."""

    @torch.inference_mode()
    def __init__(self, model, windows: torch.Tensor):
        self.windows = windows
        device = next(model.parameters()).device
        self.hidden = [final_hidden(model, windows[i:i + 1].to(device)) for i in range(len(windows))]
        head = model.get_output_embeddings()
        self.head = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                                    device=device, dtype=head.weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head.weight)
            if head.bias is not None:
                self.head.bias.copy_(head.bias)

    @torch.inference_mode()
    def kld(self, model, kv_format=None, chunk: int = 256) -> dict:
        """KL(original || model) per token and the model's perplexity on the probe windows
        (`kv_format`: through a quantized KV cache, 64 tokens per forward)."""
        device = next(model.parameters()).device
        nll = kld = 0.0
        tokens = 0
        for i in range(len(self.windows)):
            ids = self.windows[i:i + 1].to(device)
            h = final_hidden(model, ids) if kv_format is None else \
                final_hidden_cached(model, ids, kv_format, 64)
            got = window_sums(model, ids, h, self.head, self.hidden[i], chunk)
            nll += got["nll"]
            kld += got["kld"]
            tokens += got["tokens"]
        return {"kld": kld / tokens if math.isfinite(kld) else float("inf"),
                "perplexity": math.exp(nll / tokens) if math.isfinite(nll) else float("inf"),
                "tokens": tokens}


def _set_weight(mod, w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    old = mod.weight.data
    mod.weight.data = (w.t() if conv1d else w).to(old.dtype).contiguous()
    return old


@contextmanager
def swapped(model, blocks, assignment: dict[str, torch.nn.Module], dropped=(), tables=None,
            conv1d: bool = False):
    """Inside the block, `model` computes with the dequantized weights of `assignment` {linear
    path: packed module}, `tables` (a QuantEmbedding replacing the embedding table, and/or a
    head module), and the `dropped` blocks pass their input through."""
    saved, handles = [], []
    try:
        for path, new in assignment.items():
            mod = model.get_submodule(path)
            saved.append((mod, _set_weight(mod, new.dequantize(torch.float32), conv1d)))
        for kind, new in (tables or {}).items():
            mod = model.get_input_embeddings() if kind == "embeddings" \
                else model.get_output_embeddings()
            saved.append((mod, _set_weight(mod, new.dequantize(torch.float32), False)))
        for i in dropped:
            handles.append(blocks[i].register_forward_hook(_bypass, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for mod, old in reversed(saved):
            mod.weight.data = old


def _bypass(_mod, args, kwargs, out):
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(out, (tuple, list)):
        return (x, *out[1:])
    return x


class EmbeddingProbe:
    """The encoder's counterpart of ProbeReference: the original's mean-pooled embeddings of
    held sentences; a plan's damage is the mean of 1 - cosine to them (what `memfit compress`
    checks and benchmarks/encoder.py reports). Stored under the key "kld" so the planner's
    plumbing is shared; it is labelled "1 - cos" wherever it is shown."""

    def __init__(self, model, tokenizer, sentences: list[str], max_length: int):
        from memfit.eval.encoder import embed

        self.tokenizer, self.sentences, self.max_length = tokenizer, sentences, max_length
        with torch.inference_mode():
            self.ref = embed(model, tokenizer, sentences, max_length=max_length)

    @torch.inference_mode()
    def kld(self, model, kv_format=None) -> dict:
        from memfit.eval.encoder import embed

        emb = embed(model, self.tokenizer, self.sentences, max_length=self.max_length)
        cos = torch.nn.functional.cosine_similarity(emb, self.ref, dim=1)
        damage = float((1 - cos).mean()) if torch.isfinite(emb).all() else float("inf")
        return {"kld": damage, "perplexity": float("nan"), "tokens": len(self.sentences),
                "cosine_mean": 1 - damage}


def calib_windows(loaded, data: str, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """Calibration windows: token windows for a decoder, sentence windows for an encoder."""
    from memfit.calib.data import sentence_windows, token_windows
    make = sentence_windows if loaded.kind == "encoder" else token_windows
    return make(loaded.tokenizer, data, "calib", seq_len=seq_len, max_windows=n, seed=seed)


def probe_reference(loaded, o, split: str):
    """What plans are measured against on `split`: "calib" (the probes) or "eval" (the final
    check). Decoders: KL on token windows (ProbeReference); encoders: 1 - cosine of mean-pooled
    embeddings of the split's sentences (EmbeddingProbe, the probes on sentences the evaluation
    does not use)."""
    from memfit.calib.data import sentences, token_windows
    from memfit.encoders import used_length
    if loaded.kind == "encoder":
        n = o.probe_windows * 16 if split == "calib" else o.eval_windows * 16
        return EmbeddingProbe(loaded.model, loaded.tokenizer,
                              sentences(o.data, split, limit=n), used_length(loaded))
    seq, n, seed = (o.probe_seq_len, o.probe_windows, o.seed + 1) if split == "calib" \
        else (o.eval_seq_len, o.eval_windows, None)
    ids = token_windows(loaded.tokenizer, o.data, split, seq_len=seq, max_windows=n, seed=seed)
    return ProbeReference(loaded.model, ids)


def probe_protocol(loaded, o, split: str) -> str:
    """How `probe_reference(loaded, o, split)` measures, in words."""
    if loaded.kind == "encoder":
        n = o.probe_windows * 16 if split == "calib" else o.eval_windows * 16
        return f"{o.data}:{split}, 1 - cosine of the mean-pooled embeddings of {n} sentences"
    seq, n = (o.probe_seq_len, o.probe_windows) if split == "calib" \
        else (o.eval_seq_len, o.eval_windows)
    return f"{o.data}:{split}, {n} windows x {seq} tokens"
