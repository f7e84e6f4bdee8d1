"""The latency lookup table: block times persisted as JSON, keyed by backend, device, threads, precision, geometry.

One file per backend and device (default ``~/.cache/lowrank-deploy/latency-<backend>-<device-id>.json``,
``$LOWRANK_DEPLOY_CACHE`` moves the folder), holding one section per timing context
(``backend|device|threads|precision|runtime version``) and, inside it, one record per block key (a hash of
the block's structure plus its input shape). The table is reused across runs and models: a block already
timed in the same context is never timed again. Writes merge with what is on disk (another run may have
added entries meanwhile) and are atomic.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from lowrank_deploy.io import atomic_write_json, read_json

__all__ = ["TABLE_VERSION", "LatencyTable", "cpu_identity", "default_table_path", "device_id"]

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


def default_table_path(backend: str = "ort-cpu", device: str | None = None) -> Path:
    """``~/.cache/lowrank-deploy/latency-<backend>-<device-id>.json`` (folder from ``$LOWRANK_DEPLOY_CACHE``)."""
    root = os.environ.get("LOWRANK_DEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowrank-deploy")
    return Path(root) / f"latency-{backend}-{device or device_id()}.json"


class LatencyTable:
    """Block latencies (ms) on disk, one section per timing context.

    Args:
        path: The JSON file (created on the first :meth:`save`); ``None`` keeps the table in memory only.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.sections: dict[str, dict[str, dict[str, Any]]] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            self.sections = self._read()

    def _read(self) -> dict[str, dict[str, dict[str, Any]]]:
        assert self.path is not None
        try:
            data = read_json(self.path, what="latency table")
        except Exception:  # a corrupt cache is re-timed, never fatal
            return {}
        if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
            return {}
        sections = data.get("sections", {})
        return sections if isinstance(sections, dict) else {}

    def get(self, context: str, key: str) -> float | None:
        """The stored time of ``key`` in ``context`` (ms), or ``None``."""
        record = self.sections.get(context, {}).get(key)
        return None if record is None else float(record["ms"])

    def put(self, context: str, key: str, ms: float, **facts: Any) -> None:
        """Store a time (ms) and what it was measured on (``facts``: module, input shape, repeats)."""
        self.sections.setdefault(context, {})[key] = {"ms": float(ms), **facts}
        self.dirty = True

    def __len__(self) -> int:
        return sum(len(s) for s in self.sections.values())

    def save(self) -> None:
        """Merge into the file on disk (other runs' entries are kept) and write it atomically."""
        if self.path is None or not self.dirty:
            return
        merged = self._read() if self.path.is_file() else {}
        for context, entries in self.sections.items():
            merged.setdefault(context, {}).update(entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"version": TABLE_VERSION, "sections": merged})
        self.sections = merged
        self.dirty = False

    def to_dict(self) -> dict[str, Any]:
        """What a report records: the file and its size."""
        return {"path": None if self.path is None else str(self.path), "entries": len(self)}
