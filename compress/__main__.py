"""``python -m compress``: see :mod:`compress.cli`."""

from __future__ import annotations

import sys

from compress.cli import PROG, build_parser, main
from lowrank_core.cli import run_main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
