"""``python -m benchmarks.render [--check]``: re-render the generated parts of README.md and docs/."""

from __future__ import annotations

import argparse
import sys

from benchmarks.render import ROOT, differences, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming every page that differs from what would be rendered",
    )
    args = parser.parse_args(argv)
    if args.check:
        found = differences(ROOT)
        for difference in found:
            print(f"error: {difference}", file=sys.stderr)
        if found:
            print("run `python -m benchmarks.render` and commit the result", file=sys.stderr)
        return 1 if found else 0
    for path in write(ROOT):
        print(f"rendered {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
