"""`memfit eval` as a function: load, pick windows, score, and describe the protocol."""

from __future__ import annotations

from memfit.archs import check_positions
from memfit.calib.data import bos_id, token_windows
from memfit.errors import UserError
from memfit.eval.encoder import MIN_WORDS, evaluate_encoder, held_apart
from memfit.eval.lm import evaluate_lm
from memfit.kvcache import kv_format
from memfit.models import Loaded, load_model

KV_STEP = 64  # tokens per forward when --kv is set: each step attends to the quantized past


def _typed(spec, loaded: Loaded) -> str:
    """What the user typed (e.g. "default"); the resolved path goes in `*_path`."""
    return spec if isinstance(spec, str) else loaded.source


def _split_for(data: str, split: str | None) -> str:
    if split:
        return split
    return "eval" if data in ("builtin", "wikitext2", "c4") else "all"


def run_eval(model: str | Loaded = "default", *, ref: str | Loaded | None = None,
             data: str = "builtin", split: str | None = None, seq_len: int = 512,
             max_tokens: int | None = None, batch_size: int = 1, bos: str = "auto", dtype=None,
             device: str = "cpu", kv: str | None = None,
             progress: bool = True) -> dict:
    """Evaluate a model (spec or Loaded) and return a JSON-able dict with the protocol."""
    m = model if isinstance(model, Loaded) else load_model(model, dtype=dtype, device=device)
    r = ref if (ref is None or isinstance(ref, Loaded)) else load_model(ref, dtype=dtype, device=device)
    split = _split_for(data, split)
    if r is not None and r.kind != m.kind:
        a = {"encoder": "an encoder", "decoder": "a decoder"}
        raise UserError(f"--ref is {a[r.kind]} but the model is {a[m.kind]}; compare like with "
                        "like")
    fmt = kv_format(kv)
    if m.kind == "encoder":
        if fmt is not None:
            raise UserError("--kv quantizes a decoder's KV cache; an encoder has none (drop --kv)")
        sents = held_apart(data, split)
        res = evaluate_encoder(m.model, m.tokenizer, sents,
                               ref=(r.model, r.tokenizer) if r else None, progress=progress)
        res["protocol"] = (f"data {data}:{split}, {len(sents)} distinct lines of {MIN_WORDS}+ "
                           "words spread over the split, mean pooling")
        return {"model": _typed(model, m), "model_path": m.source, "kind": "encoder", "data": data,
                "split": split, **res}
    if r is not None and r.tokenizer.get_vocab() != m.tokenizer.get_vocab():
        raise UserError(f"--ref uses a different tokenizer ({len(r.tokenizer)} tokens, the model "
                        f"{len(m.tokenizer)}); KL divergence needs the same tokenizer")
    if max_tokens is not None and max_tokens < seq_len:
        raise UserError(f"--max-tokens={max_tokens} is smaller than one window (--seq-len {seq_len})")
    check_positions(m.model.config, seq_len, "--seq-len")
    max_windows = max_tokens // seq_len if max_tokens else None
    start = bos_id(m.tokenizer, bos)
    wins = token_windows(m.tokenizer, data, split, seq_len=seq_len, max_windows=max_windows,
                         bos=bos)
    res = evaluate_lm(m.model, wins, ref=r.model if r else None, batch_size=batch_size,
                      progress=progress, kv_format=fmt, kv_step=KV_STEP)
    res["protocol"] = (f"data {data}:{split}, seq_len {seq_len}, {res['windows']} non-overlapping "
                       f"windows, {res['tokens']} scored tokens, "
                       + ("BOS + text" if start is not None else "no BOS")
                       + ("" if fmt is None else
                          f", KV cache int{fmt.bits} (group {fmt.group}, {fmt.residual} recent "
                          f"tokens dense), {KV_STEP} tokens per forward"))
    out = {"model": _typed(model, m), "model_path": m.source, "kind": "decoder", "data": data,
           "split": split,
           "bos": start is not None, **res}
    if r is not None:
        out["ref"], out["ref_path"] = _typed(ref, r), r.source
    return out
