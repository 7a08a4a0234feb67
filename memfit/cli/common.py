"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse
import math


def number(name: str, lo: float, hi: float = math.inf, kind=int, open_lo: bool = False):
    """An argparse `type`: `kind` in [lo, hi] ((lo, hi] with open_lo), else a one-line error
    naming the flag and its range, before any model is read."""
    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None
        if not (lo < x if open_lo else lo <= x) or x > hi or (kind is float and math.isnan(x)):
            if hi == math.inf:
                want = f"above {lo:g}" if open_lo else f"at least {lo:g}"
            else:
                want = f"in {'(' if open_lo else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"{name} must be {want}, got {v}")
        return x
    return parse


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
        p.add_argument("--context", type=number("--context", 1), default=2048,
                       help="with --place: the tokens the KV cache is planned for (default 2048)")
        p.add_argument("--batch", type=number("--batch", 1), default=1,
                       help="with --place: sequences at once the plan makes room for (default 1)")
