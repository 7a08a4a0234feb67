"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse


def add_bos(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--bos; default None means "the recipe's calib.bos" (compress)."""
    p.add_argument("--bos", choices=["auto", "always", "never"], default=default,
                   help="start every window with the beginning-of-sequence token: auto (as the "
                   "tokenizer does for plain text), always or never (default "
                   + ("auto" if default else "the recipe's calib.bos, auto") + ")")
