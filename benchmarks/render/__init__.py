"""Every generated part of the documentation, rendered from the committed JSON and from the code.

``python -m benchmarks.render`` rewrites, in ``README.md`` and every page under ``docs/``, the text between
a pair of markers::

    <!-- render:results.speedup-sweep -->
    ...generated Markdown...
    <!-- /render:results.speedup-sweep -->

with what :data:`BLOCKS` makes of it (a results table from ``benchmarks/results/*.json``, the CLI reference
from the argparse parsers, the make variables from the Makefile), and copies the committed plots into
``docs/results/plots/``. ``python -m benchmarks.render --check`` writes nothing and exits 1 naming every page
(and block) that differs from what it would render, so no figure in the docs can drift from its JSON and no
option from ``--help``. Text outside the markers is prose, written by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.render import cli_reference, results

__all__ = ["BLOCKS", "PLOTS", "ROOT", "Difference", "differences", "pages", "render_page", "write"]

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (``README.md``, ``docs/``, ``benchmarks/results/``)."""

BLOCKS: dict[str, Callable[[], str]] = {**results.BLOCKS, **cli_reference.BLOCKS}
"""Block name → a function returning its Markdown (no trailing newline needed)."""

PLOTS: dict[str, str] = {
    "docs/results/plots/jsvd_claims.png": "benchmarks/results/jsvd_claims.png",
    "docs/results/plots/latency_accuracy_fmnist.png": "benchmarks/results/latency_accuracy_fmnist.png",
}
"""Copied plot (relative to the root) → its committed source."""

_MARKER = re.compile(r"(<!-- render:(?P<name>[\w.:-]+) -->\n)(?P<body>.*?)(<!-- /render:(?P=name) -->)", re.DOTALL)


@dataclass(frozen=True)
class Difference:
    """A page (or plot) whose committed content differs from what would be rendered."""

    path: str
    blocks: tuple[str, ...]

    def __str__(self) -> str:
        what = f" (blocks: {', '.join(self.blocks)})" if self.blocks else ""
        return f"{self.path}{what} differs from `python -m benchmarks.render`"


def pages(root: Path = ROOT) -> list[Path]:
    """``README.md`` and every Markdown page under ``docs/``, sorted."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render_page(text: str, cache: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """``text`` with every marked block re-rendered, and the names of the blocks that changed.

    Raises:
        KeyError: a marker names a block that :data:`BLOCKS` does not know.
    """
    cache = {} if cache is None else cache
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown render block {name!r} (known: {', '.join(sorted(BLOCKS))})")
        if name not in cache:
            cache[name] = BLOCKS[name]().strip("\n") + "\n"
        if cache[name] != match["body"]:
            changed.append(name)
        return match.group(1) + cache[name] + match.group(4)

    return _MARKER.sub(replace, text), changed


def differences(root: Path = ROOT) -> list[Difference]:
    """Every page and plot that differs from what would be rendered (nothing is written)."""
    found: list[Difference] = []
    cache: dict[str, str] = {}
    for page in pages(root):
        _, changed = render_page(page.read_text(encoding="utf-8"), cache)
        if changed:
            found.append(Difference(page.relative_to(root).as_posix(), tuple(changed)))
    for target, source in PLOTS.items():
        path = root / target
        if not path.exists() or path.read_bytes() != (root / source).read_bytes():
            found.append(Difference(target, ()))
    return found


def write(root: Path = ROOT) -> list[str]:
    """Re-render every page and copy every plot; return the paths that changed."""
    written: list[str] = []
    cache: dict[str, str] = {}
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        new, changed = render_page(text, cache)
        if changed:
            page.write_text(new, encoding="utf-8")
            written.append(page.relative_to(root).as_posix())
    for target, source in PLOTS.items():
        path, data = root / target, (root / source).read_bytes()
        if not path.exists() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(target)
    return written
