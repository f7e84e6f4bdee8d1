"""The latency lookup table: block times persisted as JSON, keyed by backend, device, threads, precision, geometry.

One file per backend and device (``latency-<backend>-<device-id>.json`` in :func:`cache_dir`: ``$LOWRANK_DEPLOY_CACHE``,
else ``$XDG_CACHE_HOME/lowrank-deploy``, else ``~/.cache/lowrank-deploy``), holding one section per timing context
(``backend|device|threads|precision|runtime version``) and, inside it, one record per block key (a hash of
the block's structure plus its input shape). The table is reused across runs and models: a block already
timed in the same context is never timed again. Writes merge with what is on disk (another run may have
added entries meanwhile) and are atomic.

A table entry is a measurement and is checked as one when read: a record whose ``ms`` is not a finite
number > 0 (``-1``, ``NaN``, ``"fast"``, missing), or a section or record of the wrong JSON type, is
dropped with one warning and the block is timed again. A table that cannot be read or written (a folder
where the file should be, a read-only cache folder, a cache "folder" that is a file) costs one warning and
the run keeps its times in memory; it is never fatal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from lowrank_core.io import atomic_write_json

__all__ = [
    "TABLE_VERSION",
    "LatencyTable",
    "cache_dir",
    "cpu_identity",
    "default_table_path",
    "device_id",
    "is_measurement",
]

TABLE_VERSION = 1


def cpu_identity() -> str:
    """The CPU model name and its SIMD level (``Intel(R) Xeon(R) Processor avx512``), from ``/proc/cpuinfo``."""
    model, flags = "unknown-cpu", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown-cpu":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        import platform

        model = platform.processor() or platform.machine() or model
    simd = "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "base"
    vnni = "-vnni" if " avx512_vnni" in flags or " avx_vnni" in flags else ""
    return f"{model} {simd}{vnni}"


def device_id(identity: str | None = None) -> str:
    """A short file-name-safe id of the device: a slug of :func:`cpu_identity` plus an 8-hex hash."""
    identity = identity if identity is not None else cpu_identity()
    slug = re.sub(r"[^a-z0-9]+", "-", identity.lower()).strip("-")[:40]
    return f"{slug}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"


def cache_dir() -> Path:
    """The folder of the lookup tables.

    ``$LOWRANK_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/lowrank-deploy``, else ``~/.cache/lowrank-deploy`` (an
    empty or relative ``XDG_CACHE_HOME`` is ignored, as the XDG Base Directory spec says).
    """
    explicit = os.environ.get("LOWRANK_DEPLOY_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lowrank-deploy"
    return Path(os.path.expanduser("~")) / ".cache" / "lowrank-deploy"


def default_table_path(backend: str = "ort-cpu", device: str | None = None) -> Path:
    """``latency-<backend>-<device-id>.json`` in :func:`cache_dir`."""
    return cache_dir() / f"latency-{backend}-{device or device_id()}.json"


def is_measurement(ms: Any) -> bool:
    """Whether ``ms`` can be a measured time: a real number (not a bool or a string), finite and > 0."""
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms > 0


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


class LatencyTable:
    """Block latencies (ms) on disk, one section per timing context.

    Args:
        path: The JSON file (created on the first :meth:`save`); ``None`` keeps the table in memory only.

    Attributes:
        dropped: Records of the file that were not measurements (dropped when read, re-timed on use).
        unwritable: Why the file cannot be written (the table then lives in memory), or ``None``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.sections: dict[str, dict[str, dict[str, Any]]] = {}
        self.dirty = False
        self.dropped = 0
        self.unwritable: str | None = None
        if self.path is None:
            return
        if self.path.is_dir():
            self._memory_only(f"{str(self.path)!r} is a folder, not a file")
        elif self.path.exists() or self.path.is_symlink():
            self.sections, self.dropped, problem = self._read()
            if problem is not None:
                _warn(f"latency table {str(self.path)!r} {problem}; its blocks are timed again and it is rewritten")
            elif self.dropped:
                _warn(
                    f"latency table {str(self.path)!r}: {self.dropped} entries are not measurements (ms must be a "
                    "finite number > 0); they are dropped, timed again and replaced"
                )

    def _read(self) -> tuple[dict[str, dict[str, dict[str, Any]]], int, str | None]:
        """The valid sections of the file, the number of records dropped, and why the whole file is unusable."""
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}, 0, None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return {}, 0, f"cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
        if not isinstance(data, dict) or not isinstance(data.get("sections"), dict):
            return {}, 0, "is not a latency table (no 'sections' object)"
        if data.get("version") != TABLE_VERSION:
            return {}, 0, f"has version {data.get('version')!r}, not {TABLE_VERSION}"
        sections: dict[str, dict[str, dict[str, Any]]] = {}
        dropped = 0
        for context, entries in data["sections"].items():
            if not isinstance(entries, dict):
                dropped += len(entries) if isinstance(entries, list) else 1
                continue
            kept = {k: r for k, r in entries.items() if isinstance(r, dict) and is_measurement(r.get("ms"))}
            dropped += len(entries) - len(kept)
            if kept:
                sections[context] = kept
        return sections, dropped, None

    def _memory_only(self, why: str) -> None:
        if self.unwritable is None:
            self.unwritable = why
            _warn(f"latency table {why}; block times of this run are kept in memory only (set LOWRANK_DEPLOY_CACHE)")

    def get(self, context: str, key: str) -> float | None:
        """The stored time of ``key`` in ``context`` (ms), or ``None``."""
        record = self.sections.get(context, {}).get(key)
        return None if record is None else float(record["ms"])

    def put(self, context: str, key: str, ms: float, **facts: Any) -> None:
        """Store a time (ms) and what it was measured on (``facts``: module, input shape, repeats).

        Raises:
            ValueError: ``ms`` is not a measurement (not finite or not > 0): a timer must never produce one.
        """
        if not is_measurement(ms):
            raise ValueError(f"latency table: {ms!r} ms for {key} in {context} is not a measured time")
        self.sections.setdefault(context, {})[key] = {"ms": float(ms), **facts}
        self.dirty = True

    def __len__(self) -> int:
        return sum(len(s) for s in self.sections.values())

    def save(self) -> None:
        """Merge into the file on disk (other runs' valid entries are kept) and write it atomically.

        A file that cannot be written (read-only folder, a file where the folder should be) is one warning;
        the table then stays in memory for the rest of the run.
        """
        if self.path is None or self.unwritable is not None or not self.dirty:
            return
        merged = self._read()[0]
        for context, entries in self.sections.items():
            merged.setdefault(context, {}).update(entries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": TABLE_VERSION, "sections": merged})
        except OSError as exc:
            self._memory_only(f"{str(self.path)!r} cannot be written ({exc.strerror or type(exc).__name__})")
            return
        self.sections = merged
        self.dirty = False

    def to_dict(self) -> dict[str, Any]:
        """What a report records: the file (``None`` when the table lived in memory) and its size."""
        path = None if self.path is None or self.unwritable is not None else os.path.abspath(self.path)  # any cwd
        return {"path": path, "entries": len(self), "dropped": self.dropped, "unwritable": self.unwritable}
