"""`memfit export DIR --format compressed-tensors --out OUT` and `memfit export MODEL --format gguf
--type Q8_0 --out OUT.gguf`: rewrite a model in a format other tools load (memfit.io.export_ct,
memfit.io.export_gguf). Options and printing only."""

from __future__ import annotations

from pathlib import Path

from memfit.errors import UserError

EXPORT_FORMATS = ("compressed-tensors", "gguf")


def export_folder(src, out, fmt: str = "compressed-tensors", overwrite: bool = False) -> Path:
    """Write the memfit folder `src` as `fmt` into `out`; nothing is written when a module
    cannot be represented (the error names it and why)."""
    from memfit.compress import quant_method
    from memfit.encoders import side_files
    from memfit.io.export_ct import check_representable, save_ct
    from memfit.io.folders import check_output
    from memfit.io.save import META, load, read_meta

    src = Path(src).expanduser()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if not (src / META).exists():
        if quant_method(str(src)) == "compressed-tensors":
            raise UserError(f"{src} is already a compressed-tensors folder: it loads as it is, "
                            "nothing to export; export reads what `memfit compress --format "
                            "memfit` wrote")
        raise UserError(f"{src} is not a memfit folder (no {META}); export reads what "
                        "`memfit compress --format memfit` wrote")
    check_output(Path(out).expanduser(), overwrite, (src,))
    meta = read_meta(src)
    loaded = load(src)
    check_representable(loaded.model)
    side = side_files(src)  # an encoder's sentence-transformers files, as compress copied them
    return save_ct(loaded.model, loaded.tokenizer, Path(out).expanduser(),
                   recipe=meta.get("recipe"), overwrite=overwrite, side_files=side,
                   extra={"source": meta.get("source"), "exported_from": str(src)})


def export_gguf_file(spec: str, out, qtype: str, overwrite: bool = False,
                     exact: bool = False) -> tuple[Path, str]:
    """Any model memfit loads -> (a GGUF file, the model's family) (packed weights on a GGUF
    block grid keep their codes, the rest is quantized to `qtype`; `exact`: refuse unless
    nothing is rounded). A Mixtral is written as llama.cpp's `llama` with experts, which
    transformers' GGUF loader does not read."""
    from memfit.io.export_gguf import GGUF_TYPES, export_gguf
    from memfit.io.folders import check_output_file
    from memfit.models import load_model

    if qtype not in GGUF_TYPES:  # before loading anything
        raise UserError(f"GGUF type {qtype!r} is not supported; use one of {', '.join(GGUF_TYPES)}")
    check_output_file(Path(out), overwrite)
    loaded = load_model(spec, dtype="float32", need_tokenizer=False)  # none: the file says so
    path = export_gguf(loaded.model, out, qtype, tokenizer=loaded.tokenizer, overwrite=overwrite,
                       exact=exact)
    return path, loaded.model.config.model_type


def cmd_export(args) -> None:
    if args.format == "gguf":
        out, kind = export_gguf_file(args.model, args.out, args.type, args.overwrite, args.exact)
        readers = "llama.cpp and memfit" if kind == "mixtral" else \
            "llama.cpp, memfit and transformers' from_pretrained(folder, gguf_file=...)"
        print(f"wrote        {out}  (GGUF {args.type} for every matrix that did not keep "
              f"memfit's own block codes, as noted above; loads with {readers})")
        return
    out = export_folder(args.model, args.out, args.format, args.overwrite)
    print(f"wrote        {out}  ({args.format}; loads with transformers' "
          "AutoModelForCausalLM.from_pretrained and the compressed-tensors package)")


def add_export(sub) -> None:
    e = sub.add_parser("export", help="rewrite a model in another format (compressed-tensors, "
                       "gguf)")
    e.add_argument("model", help="compressed-tensors: a folder written by memfit compress "
                   "--format memfit; gguf: any model spec memfit loads")
    e.add_argument("--format", choices=EXPORT_FORMATS, default="compressed-tensors",
                   help="the output format (default compressed-tensors)")
    e.add_argument("--type", default="Q8_0", help="gguf: the llama.cpp type (Q8_0, Q4_0, Q4_1, "
                   "Q5_0, Q5_1, Q4_K, F16, BF16, F32; default Q8_0; Q4_K stores rows that are not "
                   "a multiple of 256 as Q5_0). Weights memfit quantized to int8 symmetric, int4 "
                   "symmetric or int4 integer-zero groups of 32 keep their codes as Q8_0, Q4_0 or "
                   "Q4_1 blocks whatever --type says")
    e.add_argument("--out", required=True, help="output folder (gguf: file), written complete "
                   "or not at all (required)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--exact", action="store_true", help="gguf: write nothing unless every weight "
                   "of the file is exactly memfit's (no matrix quantized again)")
    e.set_defaults(func=cmd_export)
