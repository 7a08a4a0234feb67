"""The `memfit` command line: one module per subcommand family, `main` in memfit.cli.main."""

from memfit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
