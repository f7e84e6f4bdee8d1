"""Wall time of the documented one-command run, ``make export MODEL=resnet34`` (README "The two commands").

Runs ``make -s export`` with the given variables into a fresh temporary ``OUT`` ``--repeats`` times (the venv
must already exist: its creation is not timed) and records each run's wall time, the compress stage's own
``wall_s`` (load / plan / apply, from ``compress.json``), the weights the run used and the environment.

Usage:
    python -m benchmarks.make_export_timing --repeats 2 --out benchmarks/results/make_export_timing.json \
        MODEL=resnet34
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lowrank_core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def one_run(variables: list[str]) -> dict[str, Any]:
    """Time one ``make -s export`` into a fresh OUT; return its wall time and the compress stage's record."""
    with tempfile.TemporaryDirectory() as out:
        cmd = ["make", "-s", "export", *variables, f"OUT={out}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"make export failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        (compress_json,) = Path(out).glob("*/*/compress.json")
        info = json.loads(compress_json.read_text())
    return {
        "wall_s": wall,
        "compress_wall_s": info.get("wall_s"),
        "weights": info.get("weights"),
        "weights_warning": info.get("weights_warning"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("variables", nargs="*", default=["MODEL=resnet34"], help="make variables, e.g. MODEL=resnet34")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    runs = [one_run(args.variables) for _ in range(args.repeats)]
    from runtime import capture_environment

    walls = [r["wall_s"] for r in runs]
    result = {
        "command": "time make export " + " ".join(args.variables),
        "script": "python -m benchmarks.make_export_timing " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": runs,
        "wall_s_min": min(walls),
        "wall_s_max": max(walls),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "env": capture_environment(),
    }
    atomic_write_json(args.out, result)
    print(json.dumps({"wall_s": walls}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
