"""Run-directory integrity: what each file was made from, one writer at a time, no leftovers, clean signals.

Every stage records the SHA-256 digests of the files it read or wrote, so a later stage (and the report)
can tell files of one run from files of another, an interrupted run, or a hand edit:

* ``compress.json`` → ``"digests"``: ``plan.json``, ``dense.safetensors``, ``model.safetensors`` as written;
* ``parity.json`` → ``"inputs"``: the plan and weights the export read; ``"digests"``: the ONNX files it wrote
  and checked (``dense.onnx``, ``model.onnx``, ``model.sparse.onnx``);
* ``latency.json`` → ``"inputs"``: the model files it timed (ONNX files, weights or engines).

:func:`verify_chain` checks those links for a stage and raises one line naming the stale file and the
stage to re-run; a record without digests (an older run directory) is trusted as before.

:func:`run_lock` excludes concurrent writers of one run directory (``fcntl.flock`` on ``RUN_DIR/.lock``,
re-entrant within a process) and, once held, removes the orphaned temporary files of earlier killed
runs (:func:`clean_orphans`). :func:`install_signal_handlers` turns SIGTERM into an exception like
Ctrl-C, so the atomic writers of :mod:`lowrank_core.io` remove their temporary files on the way out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lowrank_core.errors import UserInputError

__all__ = [
    "DIGESTS",
    "INPUTS",
    "LOCK_FILE",
    "STAGES",
    "STAGE_OUTPUTS",
    "Terminated",
    "clean_orphans",
    "clear_downstream",
    "downstream",
    "file_digests",
    "install_signal_handlers",
    "is_orphan",
    "run_dir_file_names",
    "run_lock",
    "sha256_file",
    "stale_sparse_onnx",
    "verify_chain",
]

DIGESTS = "digests"
"""Key of the files a stage wrote (name → sha256) in its JSON record."""
INPUTS = "inputs"
"""Key of the files a stage read (name → sha256) in its JSON record."""
LOCK_FILE = ".lock"

PLAN = "plan.json"
WEIGHTS = ("dense.safetensors", "model.safetensors")
ONNX = ("dense.onnx", "model.onnx")
SPARSE = "model.sparse.onnx"
ENGINES = ("dense.plan", "model.plan")
COMPRESS_OUTPUTS = (PLAN, *WEIGHTS)


def _stages() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    from lowrank_core import rundir as rd

    sidecars = tuple(n + rd.ENGINE_SIDECAR_SUFFIX for n in (rd.DENSE_ENGINE, rd.MODEL_ENGINE))
    return {  # stage: (the files it writes, the stages whose files it reads)
        "compress": ((rd.PLAN_JSON, rd.DENSE_WEIGHTS, rd.MODEL_WEIGHTS, rd.RAW_WEIGHTS, rd.COMPRESS_JSON), ()),
        "export": ((rd.DENSE_ONNX, rd.MODEL_ONNX, rd.SPARSE_ONNX, rd.PARITY_JSON), ("compress",)),
        "quantize": (rd.QUANTIZED_FILES, ("export",)),
        "engine": ((rd.DENSE_ENGINE, rd.MODEL_ENGINE, *sidecars), ("export", "quantize")),
        "profile": (("profile.json", "profile.md"), ("export",)),
        # an ORT benchmark and its report stay valid when TensorRT engines are built beside them; a trt
        # latency.json of older engines is refused by the report (its inputs' digests, verify_chain)
        "bench": ((rd.LATENCY_JSON, rd.LATENCY_MD, rd.LATENCY_PNG), ("compress", "export", "quantize")),
        "report": ((rd.REPORT_JSON, rd.REPORT_MD), ("compress", "export", "quantize", "bench")),
    }


STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = _stages()
"""The one stage table of a run directory: stage → (the files it writes, the stages whose files it reads)."""
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {stage: outputs for stage, (outputs, _) in STAGES.items()}
"""Stage → the files it writes in a run directory (from :data:`STAGES`)."""


def downstream(stage: str) -> list[str]:
    """The stages made, directly or not, from ``stage``'s files (``export`` → quantize, engine, profile, bench, report).

    Raises:
        KeyError: ``stage`` is not in :data:`STAGES`.
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    found: list[str] = []
    for name, (_, reads) in STAGES.items():  # the table is in chain order: readers come after what they read
        if stage in reads or any(r in found for r in reads):
            found.append(name)
    return found


_RERUN = {
    "compress": "re-run the compress stage (`lowrank-deploy export` or `python -m compress run`)",
    "export": "re-run the export stage (`python -m export onnx --run-dir {run_dir}`)",
    "bench": "re-run the benchmark (`python -m runtime bench --run-dir {run_dir}`)",
}


# Digests ----------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | os.PathLike[str], names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files among ``names`` that exist in ``folder`` (in the given order)."""
    base = Path(folder)
    return {name: sha256_file(base / name) for name in names if (base / name).is_file()}


def _recorded(record: Mapping[str, Any] | None, key: str) -> dict[str, str]:
    value = (record or {}).get(key)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from lowrank_core.io import read_json

    data = read_json(path, what=path.name)
    return data if isinstance(data, dict) else None


def _stale(folder: Path, name: str, record: str, stage: str) -> UserInputError:
    hint = _RERUN[stage].format(run_dir=folder)
    state = "is missing" if not (folder / name).is_file() else "differs from the one"
    what = f"{name} in {str(folder)!r} {state}"
    if state == "is missing":
        return UserInputError(f"{what} but {record} was made from it (a mixed or interrupted run); {hint}")
    return UserInputError(f"{what} {record} was made from (stale: another or an interrupted run); {hint}")


def _check(folder: Path, expected: Mapping[str, str], record: str, stage: str, actual: dict[str, str]) -> None:
    for name, digest in expected.items():
        if name not in actual:
            actual[name] = sha256_file(folder / name) if (folder / name).is_file() else ""
        if actual[name] != digest:
            raise _stale(folder, name, record, stage)


def verify_chain(run_dir: str | os.PathLike[str], stage: str) -> None:
    """Check that the files ``stage`` reads belong to one run; raise naming the stale file otherwise.

    Args:
        run_dir: The run directory.
        stage: ``"export"`` (plan and weights match ``compress.json``), ``"bench"`` (also: ``parity.json``
            was made from those weights and the ONNX files are the ones it checked) or ``"report"``
            (also: ``latency.json`` timed the current model files).

    Raises:
        UserInputError: one line naming the stale file and the stage to re-run.
    """
    folder = Path(run_dir)
    actual: dict[str, str] = {}
    compress = _read(folder / "compress.json")
    made = _recorded(compress, DIGESTS)
    _check(folder, made, "compress.json", "compress", actual)
    if stage == "export":
        return
    parity = _read(folder / "parity.json")
    inputs = _recorded(parity, INPUTS)
    for name, digest in inputs.items():
        if name in made and made[name] != digest:
            raise UserInputError(
                f"parity.json in {str(folder)!r} was made from another {name} than compress.json describes "
                f"(stale export); {_RERUN['export'].format(run_dir=folder)}"
            )
    _check(folder, inputs, "parity.json", "export", actual)
    written = {k: v for k, v in _recorded(parity, DIGESTS).items() if k != SPARSE}
    _check(folder, written, "parity.json", "export", actual)
    if stage == "bench":
        return
    latency = _read(folder / "latency.json")
    _check(folder, _recorded(latency, INPUTS), "latency.json", "bench", actual)


def clear_downstream(run_dir: str | os.PathLike[str], stage: str, *, keep: Iterable[str] = ()) -> list[str]:
    """Remove the files of every stage made from ``stage``'s (:func:`downstream`), as ``stage`` rewrites its own.

    An interrupted re-run then leaves the new upstream files and nothing downstream, never a report or
    latency of the previous run beside a new plan. Call it holding :func:`run_lock`.

    Args:
        run_dir: The run directory.
        stage: The stage that rewrites its files (a key of :data:`STAGES`).
        keep: Names never removed (the file the stage has just written).

    Returns:
        The names removed.

    Raises:
        KeyError: ``stage`` is not in :data:`STAGES`.
    """
    kept = set(keep)  # the file the stage itself just wrote (a compress stage may write an ONNX file)
    later = [name for after in downstream(stage) for name in STAGE_OUTPUTS[after] if name not in kept]
    removed = []
    folder = Path(run_dir)
    for name in later:
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


def stale_sparse_onnx(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model.sparse.onnx`` exists but is not the copy the last export wrote and checked."""
    folder = Path(run_dir)
    path = folder / SPARSE
    if not path.is_file():
        return False
    parity = _read(folder / "parity.json")
    if parity is None or not parity.get("sparse_onnx"):
        return True
    recorded = _recorded(parity, DIGESTS)
    if SPARSE not in recorded:  # an older parity.json: trusted when it describes a sparse copy
        return False
    return recorded[SPARSE] != sha256_file(path)


# Lock -------------------------------------------------------------------------------------------------

_held: dict[str, list[Any]] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(
    run_dir: str | os.PathLike[str], *, create: bool = False, stage: str | None = None
) -> Iterator[Path | None]:
    """Hold the exclusive lock of a run directory (``RUN_DIR/.lock``) for the block.

    With ``stage`` (a key of :data:`STAGES`), the files of every stage made from its files are removed as soon as
    the block has put its first file in place (:func:`clear_downstream`, via
    :func:`lowrank_core.io.before_first_write`): a re-run killed mid-way leaves no report of the run before.

    Re-entrant within one process (the chained command holds it while its stages take it again). Once
    acquired, orphaned temporary files of earlier killed runs are removed (:func:`clean_orphans`); the
    lock file is removed again on release. A directory that does not exist is created only with
    ``create``; otherwise the block runs unlocked (there is nothing in it to protect).

    Raises:
        UserInputError: another process holds the lock (the message names it and the pid).
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        if not create:
            yield None
            return
        from lowrank_core.io import ensure_writable_dir

        ensure_writable_dir(folder)
    with _locked(folder) as lock, _clearing(folder, stage):
        yield lock


@contextlib.contextmanager
def _clearing(folder: Path, stage: str | None) -> Iterator[None]:
    if stage is None:
        yield
        return
    from lowrank_core.io import before_first_write

    downstream(stage)  # an unknown stage fails now, not at the first write
    with before_first_write(folder, lambda first: clear_downstream(folder, stage, keep=(first.name,))):
        yield


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[Path]:
    key = str(folder.resolve())
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield folder / LOCK_FILE
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    fd = _acquire(folder)
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        clean_orphans(folder)
        yield folder / LOCK_FILE
    finally:
        with _held_guard:
            _held.pop(key, None)
        _release(folder, fd)


def _acquire(folder: Path) -> int:
    import fcntl

    path = folder / LOCK_FILE
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserInputError(
                f"cannot create the lock file {str(path)!r} ({exc.strerror}); make the folder writable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = _lock_owner(path)
            raise UserInputError(
                f"run directory {str(folder)!r} is in use by another process{pid} (lock {LOCK_FILE}); "
                "wait for it to finish or choose another OUT"
            ) from None
        try:  # the holder may have removed the file between our open and our lock: lock the live one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise UserInputError(f"could not lock run directory {str(folder)!r}; try again")


def _lock_owner(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _release(folder: Path, fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        (folder / LOCK_FILE).unlink()
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# Orphans ----------------------------------------------------------------------------------------------


def run_dir_file_names() -> frozenset[str]:
    """Every file name the stages write into a run directory.

    :mod:`lowrank_core.rundir`'s constants, the engine sidecars and ``profile.json``/``profile.md``.
    """
    from lowrank_core import rundir

    names = {v for k, v in vars(rundir).items() if k.isupper() and isinstance(v, str) and "." in v[1:]}
    names.discard(rundir.ENGINE_SIDECAR_SUFFIX)
    names |= {n + rundir.ENGINE_SIDECAR_SUFFIX for n in (rundir.DENSE_ENGINE, rundir.MODEL_ENGINE)}
    return frozenset(names | {"profile.json", "profile.md"})


def is_orphan(name: str) -> bool:
    """Whether ``name`` is a temporary file this project's writers create in a run directory.

    Exactly two forms, nothing looser: :func:`lowrank_core.io.atomic_path`'s
    ``.<stem>.<8 random>.lrd-tmp<suffix>`` (or the ``.tmp<suffix>`` form of earlier versions) for one
    of the run directory's own files (``.model.k3j9x_qa.lrd-tmp.onnx``), and ``ensure_writable_dir``'s
    ``.write-test-<8 random>``. A user's ``.notes.2024.tmp.txt`` or ``.backup.v1.tmpl`` is neither.
    """
    from lowrank_core.io import is_write_test, temporary_target

    if is_write_test(name):
        return True
    target = temporary_target(name)
    return target is not None and target in run_dir_file_names()


def clean_orphans(folder: str | os.PathLike[str]) -> list[str]:
    """Remove temporary files that killed runs left in ``folder`` (call it holding :func:`run_lock`).

    Returns:
        The names removed.
    """
    removed = []
    base = Path(folder)
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        if is_orphan(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry.name)
    return sorted(removed)


# Signals ----------------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP, so cleanup runs as for Ctrl-C.

    Attributes:
        signum: The signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """Handle SIGTERM (and SIGHUP) like SIGINT: raise :class:`Terminated` in the main thread.

    Does nothing outside the main thread or where a handler other than the default is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_terminated)
