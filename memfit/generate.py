"""Text generation, streamed token by token to a callback (the terminal, by default), with the
tokenizer's chat template applied when it has one.

Greedy decoding on CUDA runs memfit's static-cache CUDA-graph loop (memfit.decode.greedy_static;
the same tokens as transformers' `generate`, several times faster at batch 1), with a quantized
KV cache too where memfit's own step and memfit.kernels.kv_static take the model and format;
sampling, other quantized caches and the CPU go through transformers' `generate`, where a
quantized KV cache on CUDA is read by memfit's decode-attention kernel at each decode step
(attention "memfit_kv", memfit.kvcache.enable_fused_kv_attention)."""

from __future__ import annotations

import sys
import threading

import torch

from memfit.archs import text_config
from memfit.errors import UserError
from memfit.models import input_device


def build_prompt(tokenizer, prompt: str, *, chat: bool | None = None) -> str:
    """Wrap `prompt` as a single user turn when the tokenizer has a chat template."""
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if use_chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError("this model's tokenizer has no chat template; drop --chat")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return prompt


@torch.inference_mode()
def check_args(prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """A UserError for settings `generate` cannot take (the CLI asks before loading a model)."""
    if not prompt:
        raise UserError("the prompt is empty; pass --prompt 'some text'")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("use --temperature >= 0 and 0 < --top-p <= 1")


def fit_positions(config, prompt_tokens: int, max_new_tokens: int) -> int:
    """The new tokens that fit the model's positions (max_position_embeddings) after a prompt
    of `prompt_tokens`: fewer than asked, with a note on stderr, where the whole run would pass
    them; a prompt that fills them is an error."""
    limit = getattr(text_config(config), "max_position_embeddings", None)
    if not limit or prompt_tokens + max_new_tokens <= limit:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise UserError(f"the prompt is {prompt_tokens} tokens, and the model has {limit} "
                        "positions (max_position_embeddings): none is left to generate into; "
                        "shorten the prompt")
    print(f"memfit: generating {limit - prompt_tokens} tokens, not {max_new_tokens}: the prompt "
          f"({prompt_tokens} tokens) and the new tokens fill the model's {limit} positions",
          file=sys.stderr, flush=True)
    return limit - prompt_tokens


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool | None = None, stream=None,
             kv: str | None = None) -> str:
    """Generate a continuation; greedy when temperature == 0. `stream(text_piece)` gets each
    decoded piece as it is produced; `kv` ('int8', 'int4', 'int2') quantizes the KV cache
    (memfit.kvcache). Returns the generated text."""
    from memfit.kvcache import (QuantizedKVCache, cache_kwarg, enable_fused_kv_attention,
                                kv_format)
    from transformers import TextIteratorStreamer

    check_args(prompt, max_new_tokens, temperature, top_p)
    text = build_prompt(tokenizer, prompt, chat=chat)
    device = input_device(model)
    enc = tokenizer(text, return_tensors="pt", return_token_type_ids=False,
                    add_special_tokens=not text.startswith(tokenizer.bos_token or "\0")).to(device)
    max_new_tokens = fit_positions(model.config, enc["input_ids"].shape[1], max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    fmt = kv_format(kv)
    placed = getattr(model, "memfit_placement", None) is not None  # accelerate's hooks: eager
    if device.type == "cuda" and temperature == 0 and not placed:
        from memfit.decode import kv_ineligibility
        if fmt is None or kv_ineligibility(model, fmt) is None:
            return _generate_static(model, tokenizer, enc["input_ids"], max_new_tokens, stream,
                                    fmt)
    if fmt is not None:
        fused = device.type == "cuda" and not placed
        if fused:
            enable_fused_kv_attention(model)
        kwargs[cache_kwarg(model)] = QuantizedKVCache(model.config, fmt, fused=fused)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    errors = []

    def run():
        try:
            model.generate(**kwargs)
        except Exception as e:  # re-raised in the caller's thread below
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=run)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        (stream or (lambda s: (sys.stdout.write(s), sys.stdout.flush())))(piece)
    worker.join()
    if errors:
        raise errors[0]
    return "".join(pieces)


def _generate_static(model, tokenizer, input_ids, max_new_tokens: int, stream, kv=None) -> str:
    """Greedy text through memfit.decode.greedy_static, streamed as it grows."""
    from memfit.decode import greedy_static

    out = stream or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    ids: list[int] = []
    shown = [""]

    def on_token(tok):
        ids.append(int(tok[0]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            out(text[len(shown[0]):])
            shown[0] = text

    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    greedy_static(model, input_ids, max_new_tokens, on_token=on_token, eos_token_id=eos, kv=kv)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text != shown[0]:
        out(text[len(shown[0]):])
    return text
