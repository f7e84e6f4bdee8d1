"""CI check of the README's first command: its report.json exists, has parity, and reports a speedup above 1.

Usage: ``python .ci/check_report.py artifacts/resnet34/tucker2/report.json``
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def check(path: Path) -> str:
    """Return a one-line summary of ``path``, or raise ``SystemExit`` naming what is wrong."""
    if not path.is_file():
        raise SystemExit(f"ci: {path} is missing: `make export MODEL=resnet34` did not write its report")
    report = json.loads(path.read_text())
    ratios = report.get("ratios") or {}
    speedup = ratios.get("speedup_p50")
    if not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 1.0:
        raise SystemExit(f"ci: {path} reports speedup_p50={speedup!r}; the compressed model must be faster than dense")
    parity = report.get("parity") or {}
    if parity.get("passed") is False:
        raise SystemExit(f"ci: {path} records a failed parity check: {parity}")
    interval = ratios.get("speedup_ci95") or []
    ci = "-".join(f"{v:.2f}" for v in interval) or "n/a"
    return f"ci: {path}: speedup p50 {speedup:.2f}x (95% CI {ci}), params x{ratios.get('params', 0):.2f}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python .ci/check_report.py path/to/report.json")
    print(check(Path(sys.argv[1])))
