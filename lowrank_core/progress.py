"""What a long stage is doing, on stderr: one helper for every stage (planning, training, calibration, export, bench).

It lives in the foundation (standard library only; tqdm lazily) so ``runtime`` uses it without compress or torch.

On a terminal a :class:`Progress` is a tqdm bar (count, rate, ETA). Anywhere else — ``2>log``, a pipe,
CI — it writes plain lines, at most one per ``interval`` seconds plus a final line once the stage has
run that long, so a log is never silent for long and a short stage stays quiet::

    [progress] cc sensitivity: 7/20 layers (35%), 12 s elapsed, ETA 23 s
    [progress] cc sensitivity: done, 20/20 layers in 35 s

:func:`heartbeat` does the same for one opaque call (an ONNX export, a timing run): a background
thread writes ``still running`` lines until it returns.

Environment: ``LOWRANK_DEPLOY_PROGRESS_INTERVAL`` (seconds between lines, default 5) and
``LOWRANK_DEPLOY_PROGRESS`` (``lines``: plain lines even on a terminal; ``off``: nothing).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["ENV_INTERVAL", "ENV_MODE", "Progress", "duration", "heartbeat", "progress_interval", "say"]

ENV_INTERVAL = "LOWRANK_DEPLOY_PROGRESS_INTERVAL"
ENV_MODE = "LOWRANK_DEPLOY_PROGRESS"
DEFAULT_INTERVAL = 5.0
PREFIX = "[progress]"
RECENT_UNITS = 3  # the ETA's rate is measured over the last quarter of the updates, at least this many
_LAST_LINE = [0.0]  # perf_counter of the last progress line any stage wrote (a heartbeat stays quiet after one)


def progress_interval() -> float:
    """Seconds between two progress lines (``LOWRANK_DEPLOY_PROGRESS_INTERVAL``, default 5; bad values: default)."""
    try:
        value = float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 and value == value else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _mode(enabled: bool | None, stream: TextIO) -> str:
    """``off``, ``bar`` or ``lines``."""
    env = os.environ.get(ENV_MODE, "").strip().lower()
    if enabled is False or env in ("0", "off", "none", "false"):
        return "off"
    if env == "lines":
        return "lines"
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


class Progress:
    """Progress of one stage with a known (or unknown) number of units; see the module doc.

    Use as a context manager or call :meth:`close`; :meth:`update` after each unit, with an optional
    ``note`` (``loss 0.412``) shown in the line.

    Args:
        total: Units in the stage (``None``: unknown, no ETA).
        desc: What is running (``cc sensitivity``).
        unit: Name of one unit (``layer``, ``batch``, ``step``).
        enabled: ``False``: silent; ``None``/``True``: a bar on a terminal, plain lines elsewhere.
        interval: Seconds between lines (default :func:`progress_interval`).
        stream: Where to write (default ``sys.stderr`` at creation).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "step",
        enabled: bool | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = progress_interval() if interval is None else float(interval)
        self.mode = _mode(enabled, self.stream)
        self.done = 0
        self.note_text = ""
        self.start = self._last = time.perf_counter()
        self._marks: list[tuple[float, int]] = [(self.start, 0)]  # (time, units done) of the last updates
        self.lines = 0
        self._closed = False
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        """Seconds since the stage began."""
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        """Seconds left at the rate of the last quarter (at least 3) of the units (``None`` before the first unit).

        The recent rate, not the mean since the start: a first unit that also filled a cache (the latency
        solver's first knob value) would otherwise inflate every later ETA.
        """
        if not self.total or self.done <= 0:
            return None
        window = max(RECENT_UNITS, self.done // 4)
        (t0, n0), (t1, n1) = self._marks[max(0, len(self._marks) - 1 - window)], self._marks[-1]
        rate = (t1 - t0) / (n1 - n0) if n1 > n0 else self.elapsed / self.done
        return rate * max(0, self.total - self.done)

    def update(self, n: int = 1, note: str | None = None, *, force: bool = False) -> None:
        """``n`` more units done; ``note`` replaces the line's detail; ``force`` writes a line now (not throttled)."""
        self.done += n
        if n > 0:
            self._marks.append((time.perf_counter(), self.done))
        if note is not None:
            self.note_text = note
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and (force or time.perf_counter() - self._last >= self.interval):
            self._write(self._line())

    def note(self, text: str) -> None:
        """Set the detail shown with the next line, without counting a unit."""
        self.update(0, text)

    def set_postfix(self, **fields: Any) -> None:
        """tqdm-style detail: ``set_postfix(loss="0.41")``."""
        self.note(", ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self, note: str | None = None) -> None:
        """End the stage: a final line when any line was written or the stage ran for ``interval`` or more."""
        if self._closed:
            return
        self._closed = True
        if note is not None:
            self.note_text = note
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and (self.lines or self.elapsed >= self.interval):
            count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
            detail = f"; {self.note_text}" if self.note_text else ""
            self._write(f"{self.desc}: done, {count} {_plural(self.unit)} in {duration(self.elapsed)}{detail}")

    def _line(self) -> str:
        if self.total:
            pct = 100.0 * self.done / self.total
            count = f"{self.done}/{self.total} {_plural(self.unit)} ({pct:.0f}%)"
        else:
            count = f"{self.done} {_plural(self.unit)}"
        eta = self.eta()
        left = f", ETA {duration(eta)}" if eta is not None else ", ETA unknown"
        detail = f"; {self.note_text}" if self.note_text else ""
        return f"{self.desc}: {count}, {duration(self.elapsed)} elapsed{left}{detail}"

    def _write(self, text: str) -> None:
        self._last = time.perf_counter()
        self.lines += 1
        _emit(text, self.stream)


def _emit(text: str, stream: TextIO) -> None:
    _LAST_LINE[0] = time.perf_counter()
    with contextlib.suppress(OSError, ValueError):  # a closed pipe must not end the stage
        print(f"{PREFIX} {text}", file=stream, flush=True)


def say(text: str, *, enabled: bool | None = None, stream: TextIO | None = None) -> None:
    """One progress line now (a stage's milestone), on a terminal too; nothing when progress is off."""
    out = stream if stream is not None else sys.stderr
    if _mode(enabled, out) != "off":
        _emit(text, out)


@contextlib.contextmanager
def heartbeat(
    desc: str,
    *,
    expected: float | None = None,
    enabled: bool | None = None,
    interval: float | None = None,
    stream: TextIO | None = None,
) -> Iterator[None]:
    """Write ``desc: still running, N s elapsed`` every ``interval`` s while the block runs (not on a terminal).

    For one opaque call that cannot count its own units (an ONNX export, a parity run, a timing run);
    ``expected`` (seconds the call should take) adds an ETA. A beat is skipped while another stage's
    progress lines are being written (a stage with its own lines needs no heartbeat). A final ``done in``
    line follows when at least one beat was written.
    """
    out = stream if stream is not None else sys.stderr
    every = progress_interval() if interval is None else float(interval)
    if _mode(enabled, out) != "lines":
        yield
        return
    start = time.perf_counter()
    stop = threading.Event()
    written = [0]

    def beat() -> None:
        while not stop.wait(max(every, 0.01)):
            now = time.perf_counter()
            if now - _LAST_LINE[0] < every:
                continue
            elapsed = now - start
            eta = "" if expected is None or elapsed >= expected else f", ETA ≈{duration(expected - elapsed)}"
            written[0] += 1
            _emit(f"{desc}: still running, {duration(elapsed)} elapsed{eta}", out)

    thread = threading.Thread(target=beat, name=f"heartbeat: {desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if written[0]:
            _emit(f"{desc}: done in {duration(time.perf_counter() - start)}", out)
