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
