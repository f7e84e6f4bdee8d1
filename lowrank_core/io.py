"""Artifact I/O shared by the three packages: atomic writes and JSON with stable formatting.

Nothing is ever half-written: every artifact goes to a temporary name in the destination folder and is
renamed into place only once it is complete, so an interrupted run leaves the previous file (or none).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lowrank_core.errors import ExportError, UserInputError

TEMP_MARKER = ".lrd-tmp"
"""What :func:`atomic_path` puts between the random part and the suffix: ``.model.<8 random>.lrd-tmp.onnx``."""
WRITE_TEST_PREFIX = ".write-test-"
_RANDOM = "[a-z0-9_]{8}"  # tempfile's random part: exactly 8 characters of this alphabet
_TEMP_NAME = re.compile(rf"\.(?P<stem>.+)\.{_RANDOM}(?P<marker>\.lrd-tmp|\.tmp)(?P<suffix>\.[^.]+)?")


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) and check that files can be written in it.

    Raises:
        UserInputError: if the folder cannot be created or written.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=WRITE_TEST_PREFIX):
            pass
    except OSError as exc:
        raise UserInputError(
            f"output folder {str(folder)!r} is not writable ({exc.strerror or exc}); choose another OUT=/--out"
        ) from None
    return folder


_first_write: dict[Path, Callable[[Path], object]] = {}


@contextlib.contextmanager
def before_first_write(folder: str | os.PathLike[str], action: Callable[[Path], object]) -> Iterator[None]:
    """Run ``action`` once, as soon as :func:`atomic_path` has put the block's first file into ``folder``.

    A stage that fails before a file is in place (a refused input, a full disk) leaves the folder untouched;
    one that writes runs ``action(first_file)`` (:func:`lowrank_core.integrity.clear_downstream`) right after
    its first rename, before anything else.
    """
    key = Path(folder).resolve()
    _first_write[key] = action
    try:
        yield
    finally:
        if _first_write.get(key) is action:
            del _first_write[key]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file is ``.<stem>.<8 random>.lrd-tmp<suffix>`` (:func:`temporary_target` recognises
    exactly that form): it keeps the destination's suffix, so writers that pick a format from the suffix
    (safetensors, ONNX, PNG) still work. On error the temporary file is removed.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=f"{TEMP_MARKER}{dest.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; artifacts get the usual permissions (0644 under the default umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
        if _first_write:
            action = _first_write.pop(dest.parent.resolve(), None)
            if action is not None:
                action(dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_target(name: str) -> str | None:
    """The file a temporary file of :func:`atomic_path` named ``name`` was to become, else ``None``.

    Matches only the writer's exact form, ``.<stem>.<8 random>.lrd-tmp<suffix>``, and the form of earlier
    versions, ``.<stem>.<8 random>.tmp<suffix>`` (``.notes.2024.tmp.txt`` is neither: ``2024`` is not
    8 characters).
    """
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return None
    return match["stem"] + (match["suffix"] or "")


def is_write_test(name: str) -> bool:
    """Whether ``name`` is the probe file of :func:`ensure_writable_dir` (``.write-test-<8 random>``)."""
    return re.fullmatch(rf"{re.escape(WRITE_TEST_PREFIX)}{_RANDOM}", name) is not None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


MAX_PROTO_BYTES = 2**31 - 1
"""A single-file ONNX model (one protobuf) must stay under 2 GiB."""


def atomic_write_onnx(model_proto: Any, path: str | os.PathLike[str]) -> Path:
    """Write an ONNX ``ModelProto`` to ``path`` as one self-contained file, atomically; return ``path``.

    Needs no ``onnx`` import: the proto serializes itself. :func:`export.onnx.save_onnx` is this function.

    Raises:
        ExportError: if the model does not fit in one protobuf file (2 GB).
    """
    size = model_proto.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise ExportError(
            f"ONNX model is {size / 2**30:.2f} GiB; a single-file ONNX model must stay under 2 GiB "
            "(compress the model further or export a smaller variant)"
        )
    dest = Path(path)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(model_proto.SerializeToString())
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line :class:`UserInputError`."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"{what} {str(p)!r} does not exist; run the stage that writes it first")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{what} {str(p)!r} is not valid JSON ({exc}); delete it and re-run") from None
    except RecursionError:
        raise UserInputError(
            f"{what} {str(p)!r} is nested too deeply to be a valid file; delete it and re-run"
        ) from None


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays, paths and tuples that ``json`` does not know."""
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", 1) == 0:
        return item()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
