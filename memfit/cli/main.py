"""The `memfit` command: a thin shell over the Python API.

Exit codes: 0 success, 2 user error (one line naming the problem and the fix), 3 a compressed
model failed its smoke check (nothing written), 1 internal error.
Every command takes a model spec (default: the embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

from memfit.eval.memory import human_bytes

import argparse
import json
import os
import sys

from memfit.cli.common import add_bos, add_dtype_device, add_kv, add_place, number
from memfit.cli.compress import add_compress
from memfit.cli.distill import add_distill
from memfit.cli.fit import add_fit
from memfit.cli.train import add_train
from memfit.cli.export import add_export
from memfit.errors import UserError

_MODEL_HELP = ("model: 'default' (SmolLM2-135M-Instruct, embedded), 'default-encoder' "
               "(all-MiniLM-L6-v2, embedded), a local folder, a .gguf file or a hub id")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default", help=_MODEL_HELP)
    add_dtype_device(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code to run (off by default)")


def _load(args, need_tokenizer: bool = True):
    from memfit.models import load_model
    if getattr(args, "place", None):
        return _load_placed(args)
    return load_model(args.model, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code, need_tokenizer=need_tokenizer)


def _load_placed(args, dispatch: bool = True):
    """--place: plan the split, print what each device will hold, and (unless only
    inspecting) load the model that way (memfit.parallel.place)."""
    from memfit.eval.memory import reset_peak_rss, rss_peak_bytes
    from memfit.kvcache import kv_format
    from memfit.parallel.place import load_placed, parse_devices

    if args.device != "cpu":
        raise UserError("--place chooses the devices itself; drop --device")
    m, placement = load_placed(args.model, parse_devices(args.place), dtype=args.dtype,
                               context=args.context, batch=args.batch, kv_format=kv_format(args.kv),
                               trust_remote_code=args.trust_remote_code, dispatch=dispatch)
    print(placement.table(), file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    if m is not None:
        m.model.memfit_load_peak = rss_peak_bytes()
    reset_peak_rss()  # the run's peak from here: what stays resident, not the load's
    return m


def cmd_eval(args) -> None:
    from memfit.eval.run import run_eval
    from memfit.models import load_model

    ref = None
    if args.ref:
        ref = load_model(args.ref, dtype=args.dtype, device=args.device,
                         trust_remote_code=args.trust_remote_code)
    m = _load(args)
    res = run_eval(m, ref=ref, data=args.data, split=args.split, seq_len=args.seq_len,
                   max_tokens=args.max_tokens, batch_size=args.batch_size, bos=args.bos,
                   kv=args.kv, progress=not args.json)
    res["model"] = args.model  # what the user typed; model_path holds what it resolved to
    placement = getattr(m.model, "memfit_placement", None) if args.place else None
    if placement is not None:
        from memfit.parallel.place import measured_peaks
        res["placement"], res["placement_peaks"] = placement.to_dict(), measured_peaks(placement)
        res["load_peak_rss"] = m.model.memfit_load_peak
        if res["peak_memory_kind"] == "process_peak_rss":
            res["peak_memory_kind"] = "process_peak_rss after loading"
    if args.ref:
        res["ref"] = args.ref
    if args.json:
        print(json.dumps(res))
        return
    if res["kind"] == "encoder":
        print(f"embeddings   {res['sentences']} sentences, dim {res['embedding_dim']}  "
              f"({res['protocol']})")
        if "cosine_mean" in res:
            print(f"cosine       mean {res['cosine_mean']:.6f}, min {res['cosine_min']:.6f} vs {args.ref}; "
                  f"nearest-neighbour agreement {100 * res['neighbour_agreement']:.2f}% "
                  f"({100 * res['neighbour_agreement_clear']:.2f}% of the "
                  f"{res['clear_queries']} with a reference margin >= {res['neighbour_margin']})")
    else:
        print(f"perplexity   {res['perplexity']:.4f}  ({res['protocol']})")
        if "kld" in res:
            print(f"vs reference KLD {res['kld']:.6f}, top-1 agreement {100 * res['top1_agreement']:.2f}%, "
                  f"reference perplexity {res['ref_perplexity']:.4f}  ({args.ref})")
    print(f"speed        {res['tokens_per_second']:.0f} tokens/s    "
          f"peak memory {human_bytes(res['peak_memory_bytes'])} ({res['peak_memory_kind']})")
    for dev, peak in res.get("placement_peaks", {}).items():
        print(f"measured     {dev}: peak {human_bytes(peak)}")
    if "load_peak_rss" in res:
        print(f"loading      process peak RSS {human_bytes(res['load_peak_rss'])} (before the run)")


def cmd_inspect(args) -> None:
    from memfit.eval.memory import inspect_model
    from memfit.io.checkpoint import DTYPES

    kv_dtype = DTYPES.get(args.kv_dtype) if args.kv_dtype else None
    if args.kv_dtype and kv_dtype is None:
        raise UserError(f"unknown --kv-dtype {args.kv_dtype!r}; use one of {', '.join(DTYPES)}")
    from memfit.kvcache import kv_format
    if args.place:
        _load_placed(args, dispatch=False)  # prints what each device will hold
        return
    loaded = _load(args, need_tokenizer=False)  # inspect reads no text
    encoder = loaded.kind == "encoder"
    context = args.context
    if encoder:
        from memfit.encoders import used_length
        if args.kv != "none":
            raise UserError("--kv quantizes a decoder's KV cache; an encoder has none (drop --kv)")
        context = min(context, used_length(loaded))  # an encoder never sees more
    else:  # inspect still counts past the model's positions (what such a cache would hold)
        from memfit.archs import text_config
        limit = getattr(text_config(loaded.model.config), "max_position_embeddings", None)
        if limit and context > limit:
            print(f"memfit: note: --context {context} is past the model's {limit} positions "
                  "(max_position_embeddings); the figures are what such a cache would hold",
                  file=sys.stderr)
    info = inspect_model(loaded.model, context=context, batch=args.batch, kv_dtype=kv_dtype,
                         kv_format=kv_format(args.kv), encoder=encoder)
    if args.json:
        print(json.dumps(info))
        return
    print(f"{'module kind':<28}{'dtype':<10}{'tensors':>8}{'elements':>14}{'bytes':>14}")
    for r in info["rows"]:
        print(f"{r['kind']:<28}{r['dtype']:<10}{r['tensors']:>8}{r['numel']:>14,}{r['bytes']:>14,}")
    for f in info["packed"]:
        print(f"  packed: {f['format']:<44}{f['modules']:>4} modules {f['weights']:>12,} weights "
              f"{f['bits_per_weight']:.3f} bits/weight")
        if f.get("decode_widen_bytes"):
            print(f"    on CUDA `memfit generate` holds these as 4-bit codes while it decodes: "
                  f"+{human_bytes(f['decode_widen_bytes'])} (only while 20% of the GPU's memory "
                  "stays free besides)")
    print(f"{'total':<46}{info['parameters']:>14,}{info['weight_bytes']:>14,}  "
          f"({human_bytes(info['weight_bytes'])}, {info['bits_per_weight']:.2f} bits/weight)")
    if info["cpu_layout_bytes"]:
        print(f"kernels      {human_bytes(info['cpu_layout_bytes'])} of CPU kernel layouts the "
              "packed linears prepare at their first forward and keep (torch's int4/int8 decode "
              "kernels)")
    windowed = (f"; {info['kv_layers_windowed']} sliding-window layers keep "
                f"{min(t for t in info['kv_tokens_per_layer'] if t) if any(info['kv_tokens_per_layer']) else 0} tokens"
                if info["kv_layers_windowed"] else "")
    kind = info.get("kv_format", info["kv_dtype"])
    if encoder:
        print(f"KV cache     none (an encoder); inputs of {info['context']} tokens x batch "
              f"{info['batch']}")
    else:
        print(f"KV cache     {info['kv_bytes_per_token']:,} bytes/token on all layers at "
              f"{info['kv_dtype']}; {info['kv_bytes']:,} bytes ({human_bytes(info['kv_bytes'])}, "
              f"{kind}) at context {info['context']} x batch {info['batch']}" + windowed)
    if info["kv_prefill_peak_bytes"] > info["kv_bytes"]:
        print(f"KV at prefill {info['kv_prefill_peak_bytes']:,} bytes right after a one-shot prefill of "
              f"{info['context']} tokens (every layer holds the whole prompt until the first decode step)")
    if info.get("experts"):
        x = info["experts"]
        print(f"experts      {x['layers']} mixture-of-experts layers of {x['experts']} experts, "
              f"{x['top_k']} a token: {human_bytes(x['expert_bytes'])} of the weights; without "
              f"the experts a token is not routed to: {human_bytes(x['bytes_read_per_token'])}")
    print(f"activations  ~{human_bytes(info['activation_bytes_estimate'])} peak for one "
          f"{'forward' if encoder else 'prefill'} (estimate)")
    print(f"total        ~{human_bytes(info['total_bytes_estimate'])}")


def cmd_generate(args) -> None:
    from memfit.generate import check_args, generate
    from memfit.parallel.tp import tp_session

    check_args(args.prompt, args.max_new_tokens, args.temperature, args.top_p)  # before loading
    if args.place and args.tp > 1:
        raise UserError("--place splits the model by blocks in one process; --tp splits every "
                        "layer across ranks: use one of them")
    with tp_session(args.tp, args.device) as tp:  # --tp N: one torchrun rank per shard
        args.device = tp.device
        m = tp.load(args.model, args.dtype, lambda: _load(args))
        if m.kind != "decoder":
            raise UserError(f"{args.model} is an encoder; generate needs a decoder model")
        generate(m.model, m.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                 chat=False if args.no_chat else None, kv=args.kv, stream=tp.stream())
        if tp.rank == 0:
            print()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("memfit")
    except PackageNotFoundError:
        from memfit import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memfit", description="Make language models fit the memory "
                                "you have, and measure it.")
    p.add_argument("--version", action="version", version=f"memfit {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity (or embedding similarity), KLD vs a reference, "
                       "speed and peak memory")
    _add_model(e)
    e.add_argument("--ref", help="reference model spec for KL divergence / top-1 agreement / "
                   "cosine (default: none)")
    e.add_argument("--data", default="builtin", help="builtin, wikitext2, c4 or a .txt/.jsonl "
                   "file (default builtin)")
    e.add_argument("--split", choices=["calib", "eval", "all"], help="default: eval for named "
                   "sets, all for a file")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-tokens", type=number("--max-tokens", 1), help="evaluate at most this many tokens (default: every window)")
    e.add_argument("--batch-size", type=number("--batch-size", 1), default=1,
                   help="windows per forward pass (default 1)")
    add_bos(e)
    add_kv(e)
    add_place(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="where the memory goes: weights, KV cache, activations")
    _add_model(i)
    i.add_argument("--context", type=number("--context", 1), default=2048,
                   help="tokens held in the KV cache (default 2048)")
    i.add_argument("--batch", type=number("--batch", 1), default=1,
                   help="sequences at once (default 1)")
    i.add_argument("--kv-dtype", help="KV cache dtype (default: the model's)")
    add_kv(i)
    add_place(i, context=False)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", help="generate text, streamed")
    _add_model(g)
    g.add_argument("--prompt", default="What is a Python list comprehension?",
                   help="the text to continue (default: a question about Python)")
    g.add_argument("--max-new-tokens", type=number("--max-new-tokens", 1), default=64,
                   help="(default 64)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy, else sampling (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_kv(g)
    add_place(g)
    g.add_argument("--tp", type=number("--tp", 1), default=1,
                   help="tensor-parallel ranks; run under `torchrun --nproc-per-node N` with "
                   "--tp N (rank 0 prints; default 1)")
    g.set_defaults(func=cmd_generate)

    add_compress(sub)
    add_distill(sub)
    add_fit(sub)
    add_train(sub)
    add_export(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from memfit.compress import SmokeCheckFailed
    from memfit.plan import FitFailed
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        args.func(args)
    except (SmokeCheckFailed, FitFailed) as e:
        print(f"memfit: error: {e}", file=sys.stderr)
        return 3
    except UserError as e:
        print(f"memfit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memfit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
