"""`memfit distill TEACHER STUDENT --out DIR` for two encoders: measure, heal, measure, save.

Protocol of the before/after numbers: mean-pooled embeddings of EVAL_SENTENCES held-apart
sentences of the data's `eval` split (memfit.eval.encoder.held_apart: distinct, spread over the
split), compared with the teacher's: mean and minimum cosine, and top-1 nearest-neighbour
agreement, over all queries and over those with a clear reference margin (memfit.eval.encoder). Training draws from the
`calib` split's lines only (memfit.distill.encoder), so the two never share text.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memfit.errors import UserError

EVAL_SENTENCES = 256


def _check_options(o) -> None:
    """Refuse the options that only mean something for decoders (logits, windows, BOS)."""
    bad = [flag for flag, on in (("--temperature", o.temperature != 1.0),
                                 ("--bos", o.bos != "auto")) if on]
    if bad:
        raise UserError(f"{', '.join(bad)}: decoder-only option(s) (logit KL, windows); an "
                        "encoder is distilled on its embeddings: drop them")
    if o.hidden_mse < 0:
        raise UserError(f"--hidden-mse {o.hidden_mse} is negative; give a weight >= 0")


def _measure(student, teacher_emb, tokenizer, sentences, max_length: int) -> dict:
    from memfit.eval.encoder import compare, embed

    return compare(embed(student, tokenizer, sentences, max_length=max_length), teacher_emb)


def distill_encoder_to(t, s, teacher: str, student: str, out, o) -> dict:
    """Heal encoder `s` (Loaded) towards encoder `t`; save it to `out`; -> report."""
    from memfit.calib.data import sentences
    from memfit.distill.encoder import distill_encoder_
    from memfit.distill.losses import model_layer_map
    from memfit.encoders import side_files, used_length
    from memfit.eval.encoder import embed, held_apart
    from memfit.eval.memory import weight_table
    from memfit.io.save import META, read_meta, save

    _check_options(o)
    if t.tokenizer.get_vocab() != s.tokenizer.get_vocab():
        raise UserError(f"teacher {teacher} and student {student} use different tokenizers; "
                        "distill between encoders of one tokenizer")
    max_length = min(o.seq_len, used_length(s))
    train = sentences(o.data, "calib", limit=None)
    if o.samples is not None:
        train = train[:o.samples]
    held_out = held_apart(o.data, "eval", EVAL_SENTENCES)
    say = (lambda text: print(f"memfit: {text}", file=sys.stderr, flush=True)) if o.progress \
        else (lambda text: None)
    folder = Path(student).expanduser()
    meta = read_meta(folder) if (folder / META).exists() else {}  # as distill_to reads it
    bytes_before = weight_table(s.model)["weight_bytes"]
    say(f"measuring the student before training ({len(held_out)} sentences)")
    teacher_emb = embed(t.model, t.tokenizer, held_out, max_length=max_length)
    before = _measure(s.model, teacher_emb, s.tokenizer, held_out, max_length)
    kept = (meta.get("report") or {}).get("kept_blocks")  # set when compress dropped blocks
    layer_map = model_layer_map(t.model, s.model, kept) if o.hidden_mse > 0 else None
    rep = distill_encoder_(s.model, t.model, s.tokenizer, train, steps=o.steps, lr=o.lr,
                           batch_size=16 if o.batch_size is None else o.batch_size,
                           max_length=max_length, optimizer=o.optimizer, seed=o.seed,
                           hidden_mse=o.hidden_mse, layer_map=layer_map or None,
                           progress=o.progress)
    say("measuring the student after training, then writing it")
    after = _measure(s.model, teacher_emb, s.tokenizer, held_out, max_length)
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    entry = {"teacher": teacher, "student": student, "data": o.data,
             "samples": len(train), **rep["config"]}
    save(s.model, s.tokenizer, out, recipe=dict(recipe), overwrite=o.overwrite,
         extra={"distill": entry, **({"report": {"kept_blocks": kept}} if kept else {})},
         side_files=side_files(s.source))
    return {"out": str(out), "kind": "encoder", "before": before, "after": after,
            "protocol": f"{o.data} eval, {len(held_out)} distinct sentences, mean pooling",
            "bytes_before": bytes_before, "bytes_after": weight_table(s.model)["weight_bytes"],
            **{k: v for k, v in rep.items() if k != "config"}}
