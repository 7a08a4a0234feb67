"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse


def add_bos(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--bos; default None means "the recipe's calib.bos" (compress)."""
    p.add_argument("--bos", choices=["auto", "always", "never"], default=default,
                   help="start every window with the beginning-of-sequence token: auto (as the "
                   "tokenizer does for plain text), always or never (default "
                   + ("auto" if default else "the recipe's calib.bos, auto") + ")")


def add_dtype_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), "
                   "float32, bfloat16 or float16 (default auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")


def add_kv(p) -> None:
    from memfit.kvcache import KV_FORMATS

    p.add_argument("--kv", choices=["none", *KV_FORMATS], default="none",
                   help="quantized KV cache (memfit.kvcache): keys per channel and values per "
                        "token in groups of 64 for int4 (int4-g32/-g128: 32/128; int8, int2: 32), "
                        "the 128 most recent tokens kept dense (default none: the model's own "
                        "cache)")


def add_place(p, context: bool = True) -> None:
    """--place (memfit.parallel.place); with `context`, also the --context/--batch it plans for."""
    p.add_argument("--place", help="split the model over devices, in order, e.g. "
                   "cuda:0=20GB,cuda:1=20GB,cpu or cpu=2GB,disk: blocks go to the first device "
                   "with room (weights + KV cache + activations); those on cpu (beside a GPU) or "
                   "disk are offloaded and computed on the first GPU, or the CPU (default: one device, --device)")
    if context:
        p.add_argument("--context", type=int, default=2048,
                       help="with --place: the tokens the KV cache is planned for (default 2048)")
        p.add_argument("--batch", type=int, default=1,
                       help="with --place: sequences at once the plan makes room for (default 1)")
