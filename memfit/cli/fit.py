"""`memfit fit`: options and printing only; the work is memfit.plan."""

from __future__ import annotations

import json
from pathlib import Path

from memfit.cli.common import add_dtype_device, number
from memfit.eval.memory import human_bytes


def _budget(args):
    """-> (budget bytes or None, kind, device) from the mutually exclusive budget flags."""
    from memfit.plan import parse_size

    if args.gpu:
        return parse_size(args.gpu), "memory", args.device if args.device.startswith("cuda") \
            else "cuda"
    if args.cpu:
        return parse_size(args.cpu), "memory", "cpu"
    if args.weights_budget:
        return parse_size(args.weights_budget), "weights", args.device
    return (parse_size(args.budget) if args.budget else None), "memory", args.device


def _default_out(model: str) -> Path:
    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path.cwd() / f"{name.replace('/', '-')}-fit"


def cmd_fit(args) -> None:
    from memfit.io.checkpoint import check_device
    from memfit.io.folders import check_output
    from memfit.plan import FitOptions, fit

    budget, kind, device = _budget(args)
    check_device(device)
    out = Path(args.out) if args.out else _default_out(args.model)
    check_output(out, args.overwrite, (args.model,))  # refuse before any work
    opts = FitOptions(data=args.data, samples=args.samples, methods=args.methods,
                      max_kld=args.max_kld, eval_windows=args.eval_windows, dtype=args.dtype,
                      device=device, progress=not args.json)
    plan = fit(args.model, budget=budget, kind=kind, context=args.context, batch=args.batch,
               kv=args.kv, options=opts)
    built = plan.build(out, overwrite=args.overwrite)
    report = plan.report(out, curve=not args.no_curve)
    s = plan.summary()
    if args.json:
        print(json.dumps({**s, "report": report}, default=str))
        return
    t = plan.target
    what = "run-time memory" if kind == "memory" else "stored weight bytes"
    print(f"wrote        {out}")
    print(f"budget       {human_bytes(t.budget)} of {what}"
          + (f" on {t.device}, context {t.context} x batch {t.batch}, KV {plan.kv}"
             if kind == "memory" else ""))
    print(f"memory       predicted {human_bytes(built['predicted_bytes'])}, measured "
          f"{human_bytes(built['measured_bytes'])} ({built['memory_error']:+.1%})"
          + (f" [{built['memory']['kind']}, fresh process]" if "memory" in built else ""))
    if plan.loaded.kind == "encoder":
        print(f"quality      1 - cosine {built['measured_kld']:.5f} (predicted "
              f"{built['predicted_kld']:.5f}; proxy model {built['proxy_predicted_kld']:.5f})"
              f" ({built['eval']})")
    else:
        print(f"quality      KLD {built['measured_kld']:.5f} (predicted "
              f"{built['predicted_kld']:.5f}; proxy model {built['proxy_predicted_kld']:.5f}),"
              f" perplexity {built['perplexity']:.3f} vs {built['ref_perplexity']:.3f}"
              f" ({built['eval']})")
    print(f"choices      {plan.choices_line()}")
    secs = sum(v for v in s["timings"].values()) + built["build_s"]
    print(f"time         {secs:.0f} s (plan {sum(s['timings'].values()):.0f} s, build and "
          f"check {built['build_s']:.0f} s)")
    print(f"report       {report['html']}")


def add_fit(sub) -> None:
    f = sub.add_parser("fit", help="the best model that fits a memory budget: plan per layer, "
                       "build, measure, write")
    f.add_argument("model", nargs="?", default="default", help="model spec (default: the "
                   "embedded SmolLM2-135M-Instruct)")
    b = f.add_mutually_exclusive_group()
    b.add_argument("--budget", help="run-time memory on --device: weights, KV cache, "
                   "activations and the runtime itself, e.g. 700MB or 8GiB (default: the "
                   "model's share cut to 40%% of the unmodified model's)")
    b.add_argument("--gpu", help="run-time memory budget on a CUDA device, e.g. 24GiB (default: --budget)")
    b.add_argument("--cpu", help="run-time memory budget on the CPU, e.g. 8GiB (default: --budget)")
    b.add_argument("--weights-budget", help="budget for the stored weight bytes only, e.g. 90MB (default: --budget)")
    f.add_argument("--context", type=number("--context", 1), help="tokens per sequence the budget must hold "
                   "(default: 2048, or the model's limit if smaller)")
    f.add_argument("--batch", type=number("--batch", 1), default=1, help="sequences at once (default 1)")
    f.add_argument("--kv", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="KV-cache precision; auto lets the plan choose (default auto)")
    f.add_argument("--max-kld", type=number("--max-kld", 0, kind=float), help="refuse to write when the measured KL "
                   "divergence exceeds this (default: no limit)")
    f.add_argument("--methods", choices=["gptq", "all", "rtn"], default="gptq",
                   help="candidates for the linears: gptq (int8, GPTQ int4/int3/int2), all (also "
                   "SparseGPT 2:4 + int4 and whitened low-rank, slower) or rtn (fast) "
                   "(default gptq)")
    f.add_argument("--data", default="builtin", help="calibration and evaluation text "
                   "(default builtin)")
    f.add_argument("--samples", type=number("--samples", 1), default=16, help="calibration windows of 512 tokens "
                   "(default 16)")
    f.add_argument("--eval-windows", type=number("--eval-windows", 1), default=16, help="evaluation windows of 512 "
                   "tokens for the final check (default 16)")
    f.add_argument("--out", help="output folder (default: ./<model>-fit)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.add_argument("--no-curve", action="store_true", help="skip the report's Pareto curve "
                   "(saves about a dozen probe measurements)")
    add_dtype_device(f)
    f.add_argument("--json", action="store_true", help="print the plan and checks as JSON")
    f.set_defaults(func=cmd_fit)
