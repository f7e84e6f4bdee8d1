"""Jetson measurement helpers: a tegrastats parser and sampler, and the power mode / clock state.

Formats (all one line per sample; fields appear only when the board has them):

* Xavier / Nano / TX2, L4T 32.x — documented in the L4T 32.5 Development Guide, "tegrastats Utility"
  (https://docs.nvidia.com/jetson/archives/l4t-archived/l4t-325/Tegra%20Linux%20Driver%20Package%20Development%20Guide/AppendixTegraStats.html):
  ``RAM X/YMB (lfb NxZMB) SWAP X/YMB (cached ZMB) CPU [X%@Z,...|off] EMC_FREQ X%@Y GR3D_FREQ X%@Y``,
  temperatures ``NAME@T C`` and power rails without a unit, ``NAME cur/avg`` in mW
  (``GPU 0/0 CPU 310/310 SOC 1241/1241`` on Xavier, ``POM_5V_GPU 0/0`` on Nano/TX2).
* Orin, Jetson Linux r35/r36 (JetPack 5/6): the same fields, rails with a unit
  (``VDD_GPU_SOC 2390mW/2390mW VDD_CPU_CV 797mW/797mW VIN_SYS_5V0 3125mW/3125mW`` on AGX Orin,
  ``VDD_IN``/``VDD_CPU_GPU_CV``/``VDD_SOC`` on Orin NX/Nano) and ``GR3D_FREQ X%@[Y,Y]`` with one
  frequency per GPC (DRIVE OS 6 "Reported Statistics" table, which documents ``GR3D_FREQ X%@[Y,Y,...]``).

Everything that probes the board returns ``None`` plus a reason where it is unavailable.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_core.errors import RuntimeUnavailableError, UserInputError

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB(?: \(lfb (\d+)x(\d+)MB\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"(?<![\w@/])([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}
_SENSOR_OFF = -256.0  # tegrastats prints -256C for a sensor that is powered off


@dataclass
class TegrastatsSample:
    """One parsed tegrastats line; ``None`` where the line lacks the field.

    Attributes:
        ram_used_mb, ram_total_mb: RAM in use / total (MB).
        lfb_blocks, lfb_block_mb: largest free block count and size.
        swap_used_mb, swap_total_mb, swap_cached_mb: swap.
        cpu_load_pct: per core; ``None`` for a core that is ``off``.
        cpu_freq_mhz: per core; ``None`` for an offline core or when not printed.
        emc_load_pct, emc_freq_mhz: external memory controller.
        gpu_load_pct: GR3D load; ``gpu_freq_mhz`` one entry per GPC (one on older boards).
        temps_c: sensor → °C (sensors reported off, -256C, are left out).
        power_mw: rail → (current, average) mW.
    """

    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    lfb_blocks: int | None = None
    lfb_block_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    swap_cached_mb: int | None = None
    cpu_load_pct: list[int | None] = field(default_factory=list)
    cpu_freq_mhz: list[int | None] = field(default_factory=list)
    emc_load_pct: int | None = None
    emc_freq_mhz: int | None = None
    gpu_load_pct: int | None = None
    gpu_freq_mhz: list[int] = field(default_factory=list)
    temps_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, tuple[int, int]] = field(default_factory=dict)


def parse_tegrastats_line(line: str) -> TegrastatsSample:
    """Parse one tegrastats line (Orin or Xavier/Nano format; an optional timestamp prefix is fine).

    Raises:
        UserInputError: if the line has no ``RAM`` field (not tegrastats output).
    """
    ram = _RAM.search(line)
    if ram is None:
        raise UserInputError(f"not a tegrastats line (no RAM field): {line[:80]!r}")
    s = TegrastatsSample(
        ram_used_mb=int(ram.group(1)),
        ram_total_mb=int(ram.group(2)),
        lfb_blocks=int(ram.group(3)) if ram.group(3) else None,
        lfb_block_mb=int(ram.group(4)) if ram.group(4) else None,
    )
    swap = _SWAP.search(line)
    if swap:
        s.swap_used_mb, s.swap_total_mb = int(swap.group(1)), int(swap.group(2))
        s.swap_cached_mb = int(swap.group(3)) if swap.group(3) else None
    cpu = _CPU.search(line)
    if cpu:
        for core in cpu.group(1).split(","):
            load, _, freq = core.strip().partition("@")
            if load == "off" or not load:
                s.cpu_load_pct.append(None)
                s.cpu_freq_mhz.append(None)
            else:
                s.cpu_load_pct.append(int(load.rstrip("%")))
                s.cpu_freq_mhz.append(int(freq) if freq else None)
    emc = _EMC.search(line)
    if emc:
        s.emc_load_pct = int(emc.group(1))
        s.emc_freq_mhz = int(emc.group(2)) if emc.group(2) else None
    gr3d = _GR3D.search(line)
    if gr3d:
        s.gpu_load_pct = int(gr3d.group(1))
        s.gpu_freq_mhz = [int(f) for f in gr3d.group(2).split(",") if f] if gr3d.group(2) else []
    for name, value in _TEMP.findall(line):
        if float(value) > _SENSOR_OFF:
            s.temps_c[name] = float(value)
    for name, cur, avg in _RAIL.findall(line):
        if name not in _NOT_RAILS:
            s.power_mw[name] = (int(cur), int(avg))
    return s


def summarize(samples: Sequence[TegrastatsSample]) -> dict[str, Any] | None:
    """Mean/max GPU load, peak RAM, max GPU frequency, mean power per rail, max temperatures.

    Returns ``None`` for no samples. Power means are of the instantaneous (first) value of each sample.
    """
    if not samples:
        return None
    loads = [s.gpu_load_pct for s in samples if s.gpu_load_pct is not None]
    rails: dict[str, list[int]] = collections.defaultdict(list)
    temps: dict[str, float] = {}
    for s in samples:
        for rail, (cur, _) in s.power_mw.items():
            rails[rail].append(cur)
        for sensor, value in s.temps_c.items():
            temps[sensor] = max(value, temps.get(sensor, value))
    freqs = [f for s in samples for f in s.gpu_freq_mhz]
    rams = [s.ram_used_mb for s in samples if s.ram_used_mb is not None]
    emc = [s.emc_freq_mhz for s in samples if s.emc_freq_mhz is not None]
    cpu = [f for s in samples for f in s.cpu_freq_mhz if f is not None]
    return {
        "samples": len(samples),
        "gpu_load_mean_pct": sum(loads) / len(loads) if loads else None,
        "gpu_load_max_pct": max(loads) if loads else None,
        "gpu_freq_max_mhz": max(freqs) if freqs else None,
        "gpu_freq_min_mhz": min(freqs) if freqs else None,
        "emc_freq_max_mhz": max(emc) if emc else None,
        "cpu_freq_max_mhz": max(cpu) if cpu else None,
        "ram_used_peak_mb": max(rams) if rams else None,
        "ram_total_mb": samples[-1].ram_total_mb,
        "power_mean_mw": {rail: sum(v) / len(v) for rail, v in rails.items()},
        "power_max_mw": {rail: max(v) for rail, v in rails.items()},
        "temps_max_c": temps,
    }


class TegrastatsSampler:
    """Run ``tegrastats --interval N`` beside a benchmark and summarise what it printed.

    ``with TegrastatsSampler(interval_ms=100) as sampler: ...`` starts the process, a reader thread
    keeps at most ``max_samples`` parsed lines, and leaving the block terminates the process (kill
    after ``stop_timeout_s``). Where tegrastats is missing the sampler does nothing, ``reason`` says
    why and :meth:`summary` is ``None`` — unless ``required`` is set.

    Args:
        interval_ms: sampling interval passed to ``--interval``.
        executable: the tegrastats binary (name on PATH or path).
        max_samples: ring-buffer size (oldest samples are dropped).
        stop_timeout_s: how long to wait for the process after terminating it.
        required: raise :class:`RuntimeUnavailableError` when tegrastats is missing.

    Raises:
        UserInputError: for an interval < 1 ms or ``max_samples`` < 1.
    """

    def __init__(
        self,
        interval_ms: int = 100,
        *,
        executable: str = "tegrastats",
        max_samples: int = 100_000,
        stop_timeout_s: float = 2.0,
        required: bool = False,
    ) -> None:
        if interval_ms < 1:
            raise UserInputError(f"tegrastats interval must be >= 1 ms, got {interval_ms}")
        if max_samples < 1:
            raise UserInputError(f"max_samples must be >= 1, got {max_samples}")
        self.interval_ms = interval_ms
        self.executable = executable
        self.stop_timeout_s = stop_timeout_s
        self.required = required
        self.samples: collections.deque[TegrastatsSample] = collections.deque(maxlen=max_samples)
        self.unparsed_lines = 0
        self.reason: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TegrastatsSampler:
        exe = shutil.which(self.executable)
        if exe is None:
            self.reason = f"{self.executable} not found on PATH (not a Jetson, or JetPack tools not installed)"
            if self.required:
                raise RuntimeUnavailableError(self.reason)
            return self
        self._proc = subprocess.Popen(
            [exe, "--interval", str(self.interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate tegrastats (kill if it does not exit in time) and join the reader."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout_s)
        if self._thread is not None:
            self._thread.join(timeout=self.stop_timeout_s)
        if proc.stdout is not None:
            proc.stdout.close()

    def summary(self) -> dict[str, Any] | None:
        """:func:`summarize` of the collected samples, ``None`` when there are none."""
        out = summarize(list(self.samples))
        if out is not None:
            out["interval_ms"] = self.interval_ms
            out["unparsed_lines"] = self.unparsed_lines
        return out

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            if not line.strip():
                continue
            try:
                self.samples.append(parse_tegrastats_line(line))
            except UserInputError:
                self.unparsed_lines += 1


# Power mode and clocks -------------------------------------------------------------------------------

_GPU_DEVFREQ_GLOBS = (
    "sys/devices/gpu.0/devfreq/*",  # Xavier / Nano / TX2
    "sys/devices/platform/gpu.0/devfreq/*",
    "sys/devices/17000000.ga10b/devfreq/*",  # Orin, JetPack 5
    "sys/devices/platform/17000000.ga10b/devfreq/*",
    "sys/devices/platform/bus@0/17000000.gpu/devfreq/*",  # Orin, JetPack 6
)


def parse_nvpmodel(output: str) -> dict[str, Any] | None:
    """Parse ``nvpmodel -q`` output (``NV Power Mode: MAXN`` then the mode id) into ``{"name", "id"}``."""
    match = re.search(r"NV Power Mode:\s*(\S+)", output)
    if match is None:
        return None
    rest = output[match.end() :].split()
    mode_id = int(rest[0]) if rest and rest[0].isdigit() else None
    return {"name": match.group(1), "id": mode_id}


def gpu_clock_state(root: str | os.PathLike[str] = "/") -> tuple[dict[str, Any] | None, str | None]:
    """GPU devfreq ``min_freq``/``max_freq``/``cur_freq`` (Hz) and whether min == max (clocks pinned).

    ``jetson_clocks`` pins the GPU's devfreq minimum to its maximum, so min == max is the sign that it
    ran. Returns ``(state, None)`` or ``(None, reason)``.
    """
    base = Path(root)
    for pattern in _GPU_DEVFREQ_GLOBS:
        for folder in sorted(glob.glob(str(base / pattern))):
            path = Path(folder)
            try:
                values = {k: int((path / k).read_text().strip()) for k in ("min_freq", "max_freq", "cur_freq")}
            except (OSError, ValueError):
                continue
            return {**values, "path": str(path), "clocks_maxed": values["min_freq"] == values["max_freq"]}, None
    return None, "no GPU devfreq node found under /sys (not a Jetson?)"


def jetson_state(root: str | os.PathLike[str] = "/", nvpmodel: str = "nvpmodel") -> dict[str, Any]:
    """Record the power mode and clock state of a Jetson.

    Returns:
        ``{"nvpmodel": {"name", "id"} | None, "nvpmodel_reason", "gpu_clocks": {...} | None,
        "clocks_maxed": bool | None, "clocks_reason"}``; each part is ``None`` with a reason where it
        cannot be read (``nvpmodel -q`` needs no root; reading devfreq needs none either).
    """
    out: dict[str, Any] = {"nvpmodel": None, "nvpmodel_reason": None}
    exe = shutil.which(nvpmodel)
    if exe is None:
        out["nvpmodel_reason"] = f"{nvpmodel} not found on PATH"
    else:
        try:
            proc = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10, check=False)
            out["nvpmodel"] = parse_nvpmodel(proc.stdout)
            if out["nvpmodel"] is None:
                out["nvpmodel_reason"] = f"unexpected `nvpmodel -q` output (exit {proc.returncode})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["nvpmodel_reason"] = f"`nvpmodel -q` failed: {exc}"
    clocks, reason = gpu_clock_state(root)
    out["gpu_clocks"] = clocks
    out["clocks_maxed"] = clocks["clocks_maxed"] if clocks else None
    out["clocks_reason"] = reason
    return out


# Wiring into `python -m runtime bench` ----------------------------------------------------------------

TEGRA_RELEASE = "etc/nv_tegra_release"
"""Present on every Jetson (L4T); its existence turns tegrastats sampling on by default."""


def is_jetson(root: str | os.PathLike[str] = "/") -> bool:
    """Whether ``root/etc/nv_tegra_release`` exists (an L4T / JetPack system)."""
    return (Path(root) / TEGRA_RELEASE).is_file()


def bench_sampler(
    mode: bool | None, *, interval_ms: int = 100, root: str | os.PathLike[str] = "/"
) -> TegrastatsSampler | None:
    """The tegrastats sampler for a benchmark, or ``None`` when sampling is off.

    ``mode`` True (``--tegrastats``: tegrastats required), False (off), or ``None`` (automatic: on a
    Jetson, tolerating a missing binary).

    Raises:
        UserInputError: for an interval < 1 ms.
    """
    if mode is False or (mode is None and not is_jetson(root)):
        return None
    return TegrastatsSampler(interval_ms, required=bool(mode))


def jetson_record(
    sampler: TegrastatsSampler | None, state: dict[str, Any] | None = None, *, root: str | os.PathLike[str] = "/"
) -> dict[str, Any] | None:
    """``latency.json``'s ``jetson`` entry: tegrastats summary over the timed runs, power mode and clocks.

    Returns ``None`` when no sampler ran. ``state`` defaults to :func:`jetson_state` read now.
    """
    if sampler is None:
        return None
    return {
        "tegrastats": sampler.summary(),
        "tegrastats_reason": sampler.reason,
        "state": state if state is not None else jetson_state(root),
    }


def jetson_markdown(record: dict[str, Any] | None) -> list[str]:
    """Markdown bullets for a ``jetson`` entry (power per rail, RAM, GPU load, clocks, power mode)."""
    if not record:
        return []
    lines: list[str] = []
    stats = record.get("tegrastats")
    if stats:
        rails = stats.get("power_mean_mw") or {}
        power = ", ".join(f"{rail} {mw / 1e3:.2f} W" for rail, mw in rails.items()) or "no rails"
        lines += [
            f"Power (mean over {stats.get('samples')} tegrastats samples, {stats.get('interval_ms')} ms): {power}",
            f"RAM peak {stats.get('ram_used_peak_mb')} / {stats.get('ram_total_mb')} MB; GPU load mean "
            f"{_num(stats.get('gpu_load_mean_pct'))} %, max {stats.get('gpu_load_max_pct')} %",
            f"Clocks: GPU {stats.get('gpu_freq_min_mhz')}–{stats.get('gpu_freq_max_mhz')} MHz, EMC max "
            f"{stats.get('emc_freq_max_mhz')} MHz, CPU max {stats.get('cpu_freq_max_mhz')} MHz",
        ]
    else:
        lines.append(f"tegrastats: no samples ({record.get('tegrastats_reason') or 'nothing parsed'})")
    state = record.get("state") or {}
    mode = state.get("nvpmodel")
    mode_text = f"{mode['name']} (id {mode['id']})" if mode else f"unknown ({state.get('nvpmodel_reason')})"
    maxed = state.get("clocks_maxed")
    clocks = (
        "unknown (" + str(state.get("clocks_reason")) + ")"
        if maxed is None
        else ("pinned at max (jetson_clocks)" if maxed else "not pinned (jetson_clocks not run)")
    )
    lines.append(f"Power mode: {mode_text}; GPU clocks {clocks}")
    return lines


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1f}"
