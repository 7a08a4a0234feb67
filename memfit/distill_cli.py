"""`memfit distill TEACHER STUDENT --out DIR`: heal a compressed student toward its teacher.

`distill_to` does the work (load both, check they share a tokenizer, measure, distill, save);
`cmd_distill` only prints. The student keeps its formats: a 3-bit model stays 3-bit, a 2:4 model
stays 2:4, so `memfit inspect` reports the same bytes before and after.

Protocol of the before/after numbers: perplexity of the student and KLD(teacher || student) per
token on the first `eval_windows` windows of the data's `eval` split, seq_len as given; training
draws from the `calib` split only, so the two never share text.
"""

from __future__ import annotations

from memfit.eval.memory import human_bytes

import json
from pathlib import Path

from memfit.errors import UserError


def check_same_tokenizer(teacher, student, teacher_spec: str, student_spec: str) -> None:
    """Refuse pairs whose tokenizers or output vocabularies differ (KL compares token by token)."""
    vt, vs = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    nt = teacher.model.get_output_embeddings().weight.shape[0]
    ns = student.model.get_output_embeddings().out_features
    if vt != vs or nt != ns:
        raise UserError(f"teacher {teacher_spec} (vocabulary {len(vt)} tokens, {nt} logits) and "
                        f"student {student_spec} (vocabulary {len(vs)} tokens, {ns} logits) use "
                        "different tokenizers; distill between models of one tokenizer")


def _student_meta(spec: str) -> dict:
    from memfit.io.save import META, read_meta

    folder = Path(spec).expanduser()
    return read_meta(folder) if (folder / META).exists() else {}


def _layer_map(teacher, student, kept: list[int] | None) -> dict[int, int]:
    """Teacher/student hidden states to match: through the blocks memfit compress kept when it
    dropped some, else spread evenly (memfit.distill.losses.matched_layers)."""
    from memfit.archs import arch_for, block_list
    from memfit.distill.losses import matched_layers

    n_t = len(block_list(teacher, arch_for(teacher.config)))
    n_s = len(block_list(student, arch_for(student.config)))
    return matched_layers(n_t, n_s, kept if n_s < n_t else None)


def distill_to(teacher: str, student: str, out: str | Path, *, data: str = "builtin",
               steps: int = 200, lr: float = 1e-4, seq_len: int = 256, samples: int = 128,
               temperature: float = 1.0, optimizer: str = "adamw", batch_size: int = 4,
               hidden_mse: float = 0.0, eval_windows: int = 8, overwrite: bool = False,
               device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    """Distill `teacher` into `student` and save the result to `out`; -> report.

    hidden_mse > 0 adds that weight times a scale-free MSE between matched blocks' outputs (a
    student with blocks dropped by memfit compress is matched through the blocks it kept)."""
    from memfit.data import token_windows
    from memfit.distill.loop import distill_
    from memfit.eval.lm import evaluate_lm
    from memfit.eval.memory import weight_table
    from memfit.io.save import _check_target, save
    from memfit.models import load_model

    _check_target(Path(out), overwrite)  # fail before the slow part
    if hidden_mse < 0:
        raise UserError(f"--hidden-mse {hidden_mse} is negative; give a weight >= 0 (0 = logit KL "
                        "only)")
    t = load_model(teacher, device=device)
    s = load_model(student, device=device)
    if t.kind != "decoder" or s.kind != "decoder":
        raise UserError("distill needs two decoder (causal LM) models; got "
                        f"{t.kind} teacher and {s.kind} student")
    check_same_tokenizer(t, s, teacher, student)
    meta = _student_meta(student)
    kept = (meta.get("report") or {}).get("kept_blocks")  # set when compress dropped blocks
    layer_map = _layer_map(t.model, s.model, kept) if hidden_mse > 0 else None
    calib = token_windows(t.tokenizer, data, "calib", seq_len=seq_len, max_windows=samples,
                          seed=seed)
    held_out = token_windows(t.tokenizer, data, "eval", seq_len=seq_len, max_windows=eval_windows)
    bytes_before = weight_table(s.model)["weight_bytes"]
    before = evaluate_lm(s.model, held_out, ref=t.model, progress=False)
    rep = distill_(s.model, t.model, calib, steps=steps, lr=lr, temperature=temperature,
                   batch_size=min(batch_size, calib.shape[0]), optimizer=optimizer, seed=seed,
                   hidden_mse_weight=hidden_mse, layer_map=layer_map, progress=progress)
    after = evaluate_lm(s.model, held_out, ref=t.model, progress=False)
    entry = {"teacher": teacher, "student": student, "data": data, "samples": int(calib.shape[0]),
             **rep["config"]}
    # the recipe stays a valid Recipe, the run is recorded beside it, and kept_blocks is carried
    # so a later distill matches the blocks again
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    save(s.model, s.tokenizer, out, recipe=dict(recipe), overwrite=overwrite,
         extra={"distill": entry, **({"report": {"kept_blocks": kept}} if kept else {})})
    pick = ("perplexity", "kld", "top1_agreement", "ref_perplexity")
    return {"out": str(out), "before": {k: before[k] for k in pick},
            "after": {k: after[k] for k in pick},
            "protocol": f"{data} eval, {held_out.shape[0]} x {seq_len} tokens",
            "bytes_before": bytes_before, "bytes_after": weight_table(s.model)["weight_bytes"],
            **{k: v for k, v in rep.items() if k != "config"}}


def cmd_distill(args) -> None:
    rep = distill_to(args.teacher, args.student, args.out, data=args.data, steps=args.steps,
                     lr=args.lr, seq_len=args.seq_len, samples=args.samples,
                     temperature=args.temperature, optimizer=args.optimizer,
                     batch_size=args.batch_size, hidden_mse=args.hidden_mse,
                     overwrite=args.overwrite, device=args.device, progress=True)
    if args.json:
        print(json.dumps(rep))
        return
    b, a = rep["before"], rep["after"]
    print(f"wrote        {rep['out']}  (weights {human_bytes(rep['bytes_after'])}, "
          f"before {human_bytes(rep['bytes_before'])})")
    print(f"distilled    {rep['steps']} steps in {rep['seconds']:.1f} s, loss "
          f"{rep['loss'][0]:.5f} -> {rep['loss'][-1]:.5f}, peak memory "
          f"{human_bytes(rep['peak_memory_bytes'])} ({rep['peak_memory_kind']})")
    print(f"perplexity   {b['perplexity']:.4f} -> {a['perplexity']:.4f} "
          f"(teacher {a['ref_perplexity']:.4f}; {rep['protocol']})")
    print(f"KLD          {b['kld']:.6f} -> {a['kld']:.6f}, top-1 agreement "
          f"{100 * b['top1_agreement']:.2f}% -> {100 * a['top1_agreement']:.2f}%")


def add_distill(sub) -> None:
    d = sub.add_parser("distill", help="heal a compressed model by distilling its teacher into "
                       "it (the format and size stay)")
    d.add_argument("teacher", help="the reference model spec (e.g. the uncompressed model)")
    d.add_argument("student", help="the model to train (e.g. a memfit-compressed folder)")
    d.add_argument("--out", required=True, help="output folder (written complete or not at all)")
    d.add_argument("--data", default="builtin", help="builtin, wikitext2, c4 or a .txt/.jsonl "
                   "file; trains on its calib split, measures on its eval split")
    d.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    d.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    d.add_argument("--samples", type=int, default=128, help="training windows (default 128)")
    d.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    d.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the "
                   "KL loss (default 1.0)")
    d.add_argument("--hidden-mse", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT x a hidden-state MSE between matched blocks (default 0: "
                   "logit KL only); a student whose blocks memfit compress dropped is matched "
                   "through the blocks it kept, others evenly by depth")
    d.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit keeps the moments in 8 bits (~1/4 of the state memory)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.set_defaults(func=cmd_distill)
