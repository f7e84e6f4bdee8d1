"""``python -m lowrank_deploy`` / ``lowrank-deploy``: the chain's commands (:mod:`lowrank_deploy.pipeline`).

``export``, ``train``, ``finetune`` and ``engine`` run through :mod:`lowrank_deploy.pipeline`; ``compare`` runs
:mod:`lowrank_deploy.compare`, which sits on the pipeline. This module is the only one that imports both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lowrank_core.cli import run_main

__all__ = ["dispatch", "main"]


def dispatch(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Parse ``argv`` and run its command; return the exit code (errors raise, see :func:`main`)."""
    from lowrank_deploy.compare import run_compare
    from lowrank_deploy.pipeline import build_parser, commands, plan_export, resolve, run_stages

    args = build_parser().parse_args(argv)
    values = resolve(args, os.environ if environ is None else environ)
    if args.command == "export":
        run_dir, stages = plan_export(values)
        code = run_stages(run_dir, stages)
        print(f"report: {run_dir / 'report.md'}")
        return code
    if args.command == "compare":
        run_compare(values)
        return 0
    return commands()[args.command](values)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: run the chain and return the exit code (errors are one stderr line)."""
    from lowrank_deploy.pipeline import PROG

    return run_main(PROG, dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
