"""`memfit export DIR --format compressed-tensors --out OUT`: rewrite a memfit folder in a format
other tools load (memfit.io.export_ct). Options and printing only."""

from __future__ import annotations

from pathlib import Path

from memfit.errors import UserError

EXPORT_FORMATS = ("compressed-tensors",)


def export_folder(src, out, fmt: str = "compressed-tensors", overwrite: bool = False) -> Path:
    """Write the memfit folder `src` as `fmt` into `out`; nothing is written when a module
    cannot be represented (the error names it and why)."""
    from memfit.encoders import side_files
    from memfit.io.export_ct import check_representable, save_ct
    from memfit.io.save import META, check_output, load, read_meta

    src = Path(src).expanduser()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if not (src / META).exists():
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


def cmd_export(args) -> None:
    out = export_folder(args.model, args.out, args.format, args.overwrite)
    print(f"wrote        {out}  ({args.format}; loads with transformers' "
          "AutoModelForCausalLM.from_pretrained and the compressed-tensors package)")


def add_export(sub) -> None:
    e = sub.add_parser("export", help="rewrite a memfit folder in another format "
                       "(compressed-tensors)")
    e.add_argument("model", help="a folder written by memfit compress --format memfit")
    e.add_argument("--format", choices=EXPORT_FORMATS, default="compressed-tensors",
                   help="the output format (default compressed-tensors)")
    e.add_argument("--out", required=True, help="output folder, written complete or not at all")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_export)
