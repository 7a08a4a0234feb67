"""`memfit distill TEACHER STUDENT --out DIR`: options and printing; the work is
memfit.distill.run.distill_to."""

from __future__ import annotations

import json

from memfit.cli.common import add_bos, number

from memfit.eval.memory import human_bytes


def cmd_distill(args) -> None:
    from memfit.eval.memory import keep_system_malloc
    keep_system_malloc()  # speed here; the memory promise is the runtime's
    from memfit.distill.run import DistillOptions, distill_to

    rep = distill_to(args.teacher, args.student, args.out, DistillOptions(
        data=args.data, steps=args.steps, lr=args.lr, seq_len=args.seq_len, samples=args.samples,
        temperature=args.temperature, optimizer=args.optimizer, batch_size=args.batch_size,
        hidden_mse=args.hidden_mse, overwrite=args.overwrite, device=args.device, bos=args.bos,
        progress=True))
    if args.json:
        print(json.dumps(rep))
        return
    b, a = rep["before"], rep["after"]
    print(f"wrote        {rep['out']}  (weights {human_bytes(rep['bytes_after'])}, "
          f"before {human_bytes(rep['bytes_before'])})")
    if rep.get("kind") == "encoder":
        print(f"distilled    {rep['steps']} steps in {rep['seconds']:.1f} s, loss "
              f"{rep['loss'][0]:.5f} -> {rep['loss'][-1]:.5f}, peak memory "
              f"{human_bytes(rep['peak_memory_bytes'])} ({rep['peak_memory_kind']})")
        print(f"cosine       mean {b['cosine_mean']:.6f} -> {a['cosine_mean']:.6f}, min "
              f"{b['cosine_min']:.6f} -> {a['cosine_min']:.6f} ({rep['protocol']})")
        print(f"neighbours   top-1 agreement {100 * b['neighbour_agreement']:.2f}% -> "
              f"{100 * a['neighbour_agreement']:.2f}% (clear margin: "
              f"{100 * b['neighbour_agreement_clear']:.2f}% -> "
              f"{100 * a['neighbour_agreement_clear']:.2f}% of {a['clear_queries']})")
        _note_if_worse(a["cosine_mean"] < b["cosine_mean"], "mean cosine fell", args.student)
        return
    print(f"distilled    {rep['steps']} steps in {rep['seconds']:.1f} s, loss "
          f"{rep['loss'][0]:.5f} -> {rep['loss'][-1]:.5f}, peak memory "
          f"{human_bytes(rep['peak_memory_bytes'])} ({rep['peak_memory_kind']})")
    print(f"perplexity   {b['perplexity']:.4f} -> {a['perplexity']:.4f} "
          f"(teacher {a['ref_perplexity']:.4f}; {rep['protocol']})")
    print(f"KLD          {b['kld']:.6f} -> {a['kld']:.6f}, top-1 agreement "
          f"{100 * b['top1_agreement']:.2f}% -> {100 * a['top1_agreement']:.2f}%")
    _note_if_worse(a["kld"] > b["kld"], "KLD rose", args.student)


def _note_if_worse(worse: bool, what: str, student: str) -> None:
    if worse:
        print(f"note         the held-out {what}: this run made the student worse, and "
              f"{student} is still the better model; try a lower --lr or more --samples")


def add_distill(sub) -> None:
    d = sub.add_parser("distill", help="heal a compressed model by distilling its teacher into "
                       "it (the format and size stay)")
    d.add_argument("teacher", help="the reference model spec (e.g. the uncompressed model; required)")
    d.add_argument("student", help="the model to train (e.g. a memfit-compressed folder; required)")
    d.add_argument("--out", required=True, help="output folder, written complete or not at all (required)")
    d.add_argument("--data", default="builtin", help="builtin, wikitext2, c4 or a .txt/.jsonl "
                   "file; trains on its calib split, measures on its eval split (default builtin)")
    d.add_argument("--steps", type=number("--steps", 1), default=200, help="optimizer steps (default 200)")
    d.add_argument("--lr", type=number("--lr", 0, kind=float, open_lo=True), default=1e-4, help="learning rate (default 1e-4)")
    d.add_argument("--seq-len", type=number("--seq-len", 2), default=256, help="tokens per window (default 256)")
    d.add_argument("--samples", type=number("--samples", 1), help="training windows (default 128); for encoders "
                   "training sentences (default: every line of the calib split)")
    d.add_argument("--batch-size", type=number("--batch-size", 1), help="windows per step (default 4); for encoders "
                   "sentences per step (default 16)")
    d.add_argument("--temperature", type=number("--temperature", 0, kind=float, open_lo=True),
                   default=1.0, help="softmax temperature of the "
                   "KL loss (default 1.0)")
    d.add_argument("--hidden-mse", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT x a hidden-state MSE between matched blocks (default 0: "
                   "logit KL only); a student whose blocks memfit compress dropped is matched "
                   "through the blocks it kept, others evenly by depth; on encoders every inner "
                   "block's output is matched (the final one always is)")
    d.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit keeps the moments in 8 bits (~1/4 of the state memory; "
                   "default adamw)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    add_bos(d)
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.set_defaults(func=cmd_distill)
