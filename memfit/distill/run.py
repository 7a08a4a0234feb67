"""`distill_to(teacher, student, out)`: load both models, check they share a tokenizer, measure,
distill, save. The student keeps its formats: a 3-bit model stays 3-bit, a 2:4 model stays 2:4,
so `memfit inspect` reports the same bytes before and after.

Protocol of the before/after numbers: perplexity of the student and KLD(teacher || student) per
token on the first `eval_windows` windows of the data's `eval` split, seq_len as given; training
draws from the `calib` split only, so the two never share text.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from memfit.archs import check_positions
from memfit.distill.losses import model_layer_map
from memfit.errors import UserError


def check_same_tokenizer(teacher, student, teacher_spec: str, student_spec: str) -> None:
    """Refuse pairs whose tokenizers differ (KL compares token by token); heads of two widths
    over one tokenizer (a table padded past it) are compared over the columns both have."""
    vt, vs = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    nt = teacher.model.get_output_embeddings().weight.shape[0]
    ns = student.model.get_output_embeddings().out_features
    if vt != vs:
        raise UserError(f"teacher {teacher_spec} (vocabulary {len(vt)} tokens, {nt} logits) and "
                        f"student {student_spec} (vocabulary {len(vs)} tokens, {ns} logits) use "
                        "different tokenizers; distill between models of one tokenizer")


def _student_meta(spec: str) -> dict:
    from memfit.io.save import META, read_meta

    folder = Path(spec).expanduser()
    return read_meta(folder) if (folder / META).exists() else {}


@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """How `distill_to` runs (defaults: 200 steps of 4 x 256 tokens at lr 1e-4; for encoders
    200 steps of 16 sentences, memfit.distill.encoder_run)."""

    data: str = "builtin"        # trains on its calib split, measures on its eval split
    steps: int = 200
    lr: float = 1e-4
    seq_len: int = 256
    samples: int | None = None   # training windows (None: 128); encoders: sentences (None: all)
    temperature: float = 1.0
    optimizer: str = "adamw"     # adamw | adamw8bit
    batch_size: int | None = None  # windows per step (None: 4); encoders: sentences (None: 16)
    hidden_mse: float = 0.0      # weight of the matched hidden-state MSE (0: logit KL only)
    eval_windows: int = 8
    overwrite: bool = False
    device: str = "cpu"
    seed: int = 0
    bos: str = "auto"
    progress: bool = True


def distill_to(teacher: str, student: str, out: str | Path,
               options: DistillOptions | None = None) -> dict:
    """Distill `teacher` into `student` and save the result to `out`; -> report.

    hidden_mse > 0 adds that weight times a scale-free MSE between matched blocks' outputs (a
    student with blocks dropped by memfit compress is matched through the blocks it kept)."""
    from memfit.calib.data import bos_id, token_windows
    from memfit.distill.loop import distill_
    from memfit.eval.lm import evaluate_lm
    from memfit.eval.memory import weight_table
    from memfit.io.checkpoint import check_device
    from memfit.io.folders import check_output
    from memfit.io.save import save
    from memfit.models import load_model

    o = options or DistillOptions()
    check_output(Path(out), o.overwrite, (teacher, student))  # fail before the slow part
    check_device(o.device)
    if o.hidden_mse < 0:
        raise UserError(f"--hidden-mse {o.hidden_mse} is negative; give a weight >= 0 (0 = logit "
                        "KL only)")
    t = load_model(teacher, device=o.device)
    s = load_model(student, device=o.device)
    if t.kind == "encoder" and s.kind == "encoder":
        from memfit.distill.encoder_run import distill_encoder_to
        return distill_encoder_to(t, s, teacher, student, out, o)
    if t.kind != "decoder" or s.kind != "decoder":
        raise UserError("distill needs two decoders (causal LMs) or two encoders; got a "
                        f"{t.kind} teacher and a {s.kind} student")
    o = replace(o, samples=128 if o.samples is None else o.samples,
                batch_size=4 if o.batch_size is None else o.batch_size)
    check_same_tokenizer(t, s, teacher, student)
    for m in (t, s):
        check_positions(m.model.config, o.seq_len, "--seq-len")
    meta = _student_meta(student)
    kept = (meta.get("report") or {}).get("kept_blocks")  # set when compress dropped blocks
    layer_map = model_layer_map(t.model, s.model, kept) if o.hidden_mse > 0 else None
    calib = token_windows(t.tokenizer, o.data, "calib", seq_len=o.seq_len, max_windows=o.samples,
                          seed=o.seed, bos=o.bos)
    held_out = token_windows(t.tokenizer, o.data, "eval", seq_len=o.seq_len,
                             max_windows=o.eval_windows, bos=o.bos)
    bytes_before = weight_table(s.model)["weight_bytes"]
    say = (lambda text: print(f"memfit: {text}", file=sys.stderr, flush=True)) if o.progress \
        else (lambda text: None)
    say(f"measuring the student before training ({len(held_out)} x {o.seq_len} tokens)")
    before = evaluate_lm(s.model, held_out, ref=t.model, progress=False)
    rep = distill_(s.model, t.model, calib, steps=o.steps, lr=o.lr, temperature=o.temperature,
                   batch_size=min(o.batch_size, calib.shape[0]), optimizer=o.optimizer,
                   seed=o.seed, hidden_mse_weight=o.hidden_mse, layer_map=layer_map,
                   progress=o.progress)
    say("measuring the student after training, then packing and writing it")
    after = evaluate_lm(s.model, held_out, ref=t.model, progress=False)
    entry = {"teacher": teacher, "student": student, "data": o.data,
             "samples": int(calib.shape[0]), **rep["config"]}
    # the recipe stays a valid Recipe, the run is recorded beside it, and kept_blocks is carried
    # so a later distill matches the blocks again
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    save(s.model, s.tokenizer, out, recipe=dict(recipe), overwrite=o.overwrite,
         extra={"distill": entry, **({"report": {"kept_blocks": kept}} if kept else {})})
    pick = ("perplexity", "kld", "top1_agreement", "ref_perplexity")
    return {"out": str(out), "before": {k: before[k] for k in pick},
            "after": {k: after[k] for k in pick},
            "protocol": f"{o.data} eval, {held_out.shape[0]} x {o.seq_len} tokens, "
                        f"{'BOS first' if bos_id(t.tokenizer, o.bos) is not None else 'no BOS'}",
            "bytes_before": bytes_before, "bytes_after": weight_table(s.model)["weight_bytes"],
            **{k: v for k, v in rep.items() if k != "config"}}
