"""`memfit train [MODEL] --out DIR`: options and printing; the work is memfit.train.run.train_to.

Runs plainly (a world of one) or under `torchrun --nproc-per-node N -m memfit train ...`; only
rank 0 prints and writes."""

from __future__ import annotations

import json

from memfit.cli.common import add_bos
from memfit.eval.memory import human_bytes


def _print(rep: dict) -> None:
    o, p = rep["options"], rep["predicted"]
    loss = rep["loss"]
    print(f"trained      {len(loss)} steps x {o['batch_size']} x {o['seq_len']} tokens on "
          f"{rep['world_size']} rank(s) ({rep['engine']}, {rep['device']}, compute "
          f"{rep['compute_dtype']}), loss {loss[0]:.5f} -> {loss[-1]:.5f}, "
          f"{rep['tokens_per_second']:.0f} tokens/s")
    print(f"setup        AC {o['ac']} (blocks {rep['ac_blocks']}), optimizer {o['optim']} "
          f"({human_bytes(rep['optimizer_state_bytes'])} state on rank 0), grad comm "
          f"{o['grad_comm']} ({rep['reduce_dtype']})")
    comm = rep["grad_comm_per_step"][-1]
    print(f"grad comm    {comm['payload_bytes']:,} bytes handed to collectives per step per rank, "
          f"~{comm['wire_bytes']:,} sent to other ranks")
    measured = human_bytes(rep["peak_memory_bytes"])
    if rep["peak_memory_kind"] == "process_peak_rss":
        rise = rep["peak_memory_bytes"] - rep["rss_before_training_bytes"]
        measured += (f" process peak RSS over the steps; it rose {human_bytes(rise)}, predicted "
                     f"{human_bytes(p['total_bytes'] - p['weights_bytes'])} (all but the "
                     f"resident weights)")
    else:
        measured += " cuda max_memory_allocated"
    residual = f" + residual {human_bytes(p['residual_bytes'])}" if p["residual_bytes"] else ""
    print(f"memory/rank  predicted {human_bytes(p['total_bytes'])} = states "
          f"{human_bytes(p['states_bytes'])} + gathered {human_bytes(p['working_bytes'])} + "
          f"activations {human_bytes(p['activation_bytes'])}{residual}; measured {measured}")
    if rep["out"]:
        print(f"wrote        {rep['out']}")


def cmd_train(args) -> None:
    from memfit.eval.memory import keep_system_malloc
    keep_system_malloc()  # speed here; the memory promise is the runtime's
    from memfit.train.run import TrainOptions, train_to

    rep = train_to(args.model, args.out, TrainOptions(
        steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size,
        samples=args.samples, data=args.data, split=args.split, ac=args.ac, optim=args.optim,
        offload_optimizer=args.offload_optimizer, grad_comm=args.grad_comm,
        powersgd_rank=args.powersgd_rank, precision=args.precision, weights=args.weights,
        step_in_backward=args.step_in_backward, teacher=args.teacher,
        temperature=args.temperature, device=args.device, seed=args.seed, bos=args.bos,
        overwrite=args.overwrite, progress=not args.json))
    if rep["rank"] != 0:
        return
    if args.json:
        print(json.dumps(rep))
    else:
        _print(rep)


def add_train(sub) -> None:
    t = sub.add_parser("train", help="fine-tune (or distill into) a model on FSDP2, memory-lean; "
                       "run under torchrun for several ranks")
    t.add_argument("model", nargs="?", default="default", help="the model to train (default: "
                   "the embedded SmolLM2-135M-Instruct)")
    t.add_argument("--out", help="output folder, written by rank 0 complete or not at all "
                   "(default: do not save)")
    t.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    t.add_argument("--batch-size", type=int, default=4, help="global windows per step, split "
                   "across ranks (default 4)")
    t.add_argument("--samples", type=int, help="training windows drawn from the split (default all)")
    t.add_argument("--data", default="builtin", help="builtin, wikitext2, c4 or a .txt/.jsonl "
                   "file (default builtin)")
    t.add_argument("--split", choices=["calib", "eval", "all"], default="calib",
                   help="text to train on (default calib)")
    t.add_argument("--ac", choices=["none", "full", "selective"], default="none",
                   help="activation checkpointing: every block, every other block, or none "
                   "(default none)")
    t.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit keeps m and v block-wise in 8 bits (~1/4 of the state) (default adamw)")
    t.add_argument("--offload-optimizer", action="store_true", help="on CUDA: FSDP2 CPU "
                   "offload (weights, gradients and optimizer state on the host, the step on "
                   "the CPU); on the CPU it changes nothing")
    t.add_argument("--grad-comm", choices=["fp32", "bf16", "int8", "powersgd"], default="fp32",
                   help="gradient communication: FSDP2 reduce-scatter in fp32, bf16 or int8 "
                   "with error feedback, or PowerSGD on a DDP replica (default fp32)")
    t.add_argument("--powersgd-rank", type=int, default=4, help="rank of PowerSGD's "
                   "approximation (default 4)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute dtype (FSDP2 param_dtype); auto: bf16 on CUDA, fp32 on CPU (default auto)")
    t.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="trained weights kept in float32 (master copy), or in bfloat16 with "
                   "stochastically rounded updates (2 bytes per weight; needs --optim adamw8bit; "
                   "default fp32)")
    t.add_argument("--step-in-backward", action="store_true",
                   help="one rank: step each parameter as soon as its gradient is complete and "
                   "free the gradient, so no full set of gradients is ever held (default off)")
    t.add_argument("--teacher", help="distill this model into MODEL (KL on logits) instead of "
                   "plain next-token loss (default: none)")
    t.add_argument("--temperature", type=float, default=1.0, help="KL temperature with --teacher "
                   "(default 1.0)")
    t.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes cuda:LOCAL_RANK; "
                   "default cpu)")
    t.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    add_bos(t)
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--json", action="store_true", help="print rank 0's report as one JSON object")
    t.set_defaults(func=cmd_train)
