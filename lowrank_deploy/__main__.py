"""``python -m lowrank_deploy`` / ``lowrank-deploy``: see :mod:`lowrank_deploy.pipeline`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lowrank_deploy.cli import run_main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: run the chain and return the exit code (errors are one stderr line)."""
    from lowrank_deploy.pipeline import PROG
    from lowrank_deploy.pipeline import main as pipeline_main

    return run_main(PROG, pipeline_main, argv)


if __name__ == "__main__":
    sys.exit(main())
