"""`memfit compress`: options and printing only; the work is memfit.compress.compress_to."""

from __future__ import annotations

from memfit.eval.memory import human_bytes

import json

from memfit.cli.common import add_bos, add_dtype_device, number


def _describe_quant(q) -> str:
    f = q.format
    zero = "symmetric" if f.symmetric else f"{f.zero_point} zero"
    clip = getattr(q, "clip", None)  # RTN and GPTQ
    return (f"{q.algo} {f.bits}-bit, group {f.group_size or 'channel'}, {zero}"
            + (f", clip {clip}" if clip else "")
            + (", act-order" if getattr(q, "act_order", False) else "")  # GPTQ only
            + (", AWQ scales" if getattr(q, "awq", False) else "")
            + (f", int{q.act_bits} activations" if getattr(q, "act_bits", None) else "")
            + (f", SmoothQuant {q.smoothquant}" if getattr(q, "smoothquant", None) else "")
            + (", GGUF-exact scales" if f.gguf_exact else ""))


def list_presets() -> None:
    from memfit.recipe import PRESETS
    for name, r in PRESETS.items():
        parts = []
        if r.prune:
            p = r.prune
            parts.append(f"{p.method} pruning, "
                         + (f"{p.nm} pattern" if p.nm else f"{p.sparsity:.0%} sparse")
                         + (", OWL per-block sparsity" if p.owl else ""))
        if r.lowrank:
            parts.append(f"{r.lowrank.method} low-rank, {r.lowrank.keep:.0%} of parameters kept")
        if r.quant:
            parts.append(("kept values: " if r.prune else "factors: " if r.lowrank else "")
                         + _describe_quant(r.quant))
        for table in ("embeddings", "head"):
            f = getattr(r, table)
            if f is not None:
                parts.append(f"{table} int{f.bits}, group {f.group_size or 'channel'}")
        if r.structured:
            parts.append(f"structured: drop the {r.structured.drop_blocks} least influential blocks")
        print(f"{name:<22}{'; '.join(parts)}" + ("; needs calibration data" if r.needs_data else ""))


def cmd_compress(args) -> None:
    from memfit.eval.memory import keep_system_malloc
    keep_system_malloc()  # speed here; the memory promise is the runtime's
    from memfit.compress import CompressOptions, compress_to

    if args.list_presets:
        list_presets()
        return
    if not args.out:
        from memfit.errors import UserError
        raise UserError("--out is required: the folder to write the compressed model to")
    rep = compress_to(args.model, args.recipe, args.out, CompressOptions(
        data=args.data, samples=args.samples, seq_len=args.seq_len, offload=args.offload,
        bos=args.bos, overwrite=args.overwrite, max_kld=args.max_kld, min_cosine=args.min_cosine,
        keep_partial=args.keep_partial, dtype=args.dtype, device=args.device,
        progress=not args.json, format=args.format,
        low_memory={"auto": None, "on": True, "off": False}[args.low_memory]))
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "layers"}))
        return
    s = rep["smoke"]
    print(f"wrote        {rep['out']}  ({human_bytes(rep['artifact_bytes'])} on disk, "
          f"{rep['format']} format)")
    if rep["format_note"]:
        print(f"format       {rep['format_note']}")
    print(f"weights      {human_bytes(rep['bytes_before'])} -> {human_bytes(rep['bytes_after'])} "
          f"({rep['bytes_after'] / rep['bytes_before']:.3f}x) in {rep['compress_seconds']:.1f} s, "
          f"peak RSS {human_bytes(rep['peak_rss_bytes'])}"
          + (f", resumed {rep['resumed_blocks']} blocks" if rep["resumed_blocks"] else ""))
    if "cosine_mean" in s:  # an encoder
        print(f"smoke check  embedding cosine mean {s['cosine_mean']:.6f}, min "
              f"{s['cosine_min']:.6f} (limit {s['min_cosine']}; {s['data']}, {s['sentences']} "
              "sentences, mean pooling)")
        return
    print(f"smoke check  perplexity {s['perplexity']:.4f} vs {s['ref_perplexity']:.4f}, "
          f"KLD {s['kld']:.5f} (limit {s['max_kld']}; {s['data']}, {s['windows']} x {s['seq_len']} tokens)")


def add_compress(sub) -> None:
    c = sub.add_parser("compress", help="quantize, prune or factorize a model and write it as a folder every "
                       "command accepts")
    c.add_argument("model", nargs="?", default="default", help="model spec (default: the "
                   "embedded SmolLM2-135M-Instruct)")
    c.add_argument("--recipe", default="w4g64-gptq", help="a preset (see --list-presets) or a "
                   "YAML/JSON recipe file (default w4g64-gptq)")
    c.add_argument("--out", help="output folder, written complete or not at all (required)")
    c.add_argument("--data", help="calibration text: builtin, wikitext2, c4 or a .txt/.jsonl file "
                   "(default: the recipe's, builtin)")
    c.add_argument("--samples", type=number("--samples", 1), help="calibration windows (default: the recipe's, 64)")
    c.add_argument("--seq-len", type=number("--seq-len", 2), help="calibration window length (default 512; for an "
                   "encoder the recipe's, capped at the length the model is used at)")
    c.add_argument("--offload", choices=["memory", "disk"], help="keep calibration activations "
                   "in memory (default) or on disk")
    add_bos(c, default=None)
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--format", choices=["auto", "compressed-tensors", "memfit"], default="auto",
                   help="folder format: compressed-tensors (loads in plain transformers/vLLM), "
                   "memfit's own, or auto (default: compressed-tensors when it can represent "
                   "every compressed module, else memfit, saying why)")
    c.add_argument("--max-kld", type=number("--max-kld", 0, kind=float), default=1.0, help="refuse to write when the smoke "
                   "check's KL divergence exceeds this (default 1.0)")
    c.add_argument("--min-cosine", type=number("--min-cosine", -1, 1, float),
                   default=0.8, help="encoders: refuse to write "
                   "when the smoke check's mean embedding cosine is below this (default 0.8)")
    c.add_argument("--keep-partial", action="store_true", help="after a failed smoke check, keep "
                   "the finished blocks in OUT.partial (default: removed)")
    c.add_argument("--low-memory", choices=["auto", "on", "off"], default="auto",
                   help="compress one block at a time, read from the safetensors files, for a "
                   "model larger than RAM (memfit's format, CPU, no resume); default auto: on "
                   "when the weights exceed 60%% of the memory available")
    c.add_argument("--list-presets", action="store_true", help="list the named recipes and exit")
    add_dtype_device(c)
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_compress)
