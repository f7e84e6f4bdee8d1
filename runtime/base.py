"""The ``Runner`` contract and the registry that picks a runner by backend name.

A runner wraps one inference backend (eager PyTorch, ONNX Runtime, later TensorRT) behind the same
context-manager interface, as Polygraphy's ``BaseRunner`` does: public ``activate`` / ``infer`` /
``deactivate`` check state and inputs, subclasses implement the ``*_impl`` hooks. Benchmarks and
parity checks only ever see :class:`Runner`.

Adding a backend is one new module named ``runtime/<something>_runner.py`` whose class carries
``@register_runner("<name>")``: the registry imports every ``*_runner`` module of this package the
first time a name is looked up (backend modules found by file convention, as tinygrad does with
``runtime/ops_<name>.py``). Runner modules must import their heavy dependencies lazily, inside methods.

Each class also says how it is built from files: :meth:`Runner.from_path` (one model file),
:meth:`Runner.from_run_dir` (the dense or compressed model of a run directory), and
:meth:`Runner.cli_options` / :meth:`Runner.cli_env` (which command-line arguments it reads), so the
``python -m runtime`` CLI builds every backend through this registry without knowing any of them.
"""

from __future__ import annotations

import abc
import importlib
import os
import pkgutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from lowrank_core.errors import UserInputError
from lowrank_core.rundir import MODELS, RunDir, model_key

Dim = int | str | None
"""One dimension of an input: a fixed size, or a symbolic name / ``None`` for a dynamic dimension."""


@dataclass(frozen=True)
class TensorMeta:
    """Name-independent description of one input tensor.

    Attributes:
        dtype: the exact numpy dtype the runner expects.
        shape: one entry per axis, an ``int`` for a fixed size, a ``str`` or ``None`` (or a negative
            int) for a dynamic one; ``None`` for the whole shape means "any rank".
    """

    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def is_dynamic(self, axis: int) -> bool:
        """Whether ``axis`` accepts any size."""
        if self.shape is None:
            return True
        dim = self.shape[axis]
        return not isinstance(dim, int) or dim < 0

    def describe(self) -> str:
        """Short text such as ``float32[N,3,224,224]``."""
        if self.shape is None:
            return f"{self.dtype}[...]"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


Feed = Mapping[str, np.ndarray]
"""One inference request: input name → array."""


class Runner(abc.ABC):
    """Base class of every inference backend, used as a context manager.

    ``with runner:`` calls :meth:`activate` and, on leaving (also after an error),
    :meth:`deactivate`. :meth:`infer` validates the feed against :meth:`get_input_metadata` (names,
    dtypes, ranks and fixed dimensions; dynamic dimensions take any size) and then calls
    :meth:`infer_impl`.

    Subclasses set :attr:`device` in ``__init__`` and implement :meth:`activate_impl`,
    :meth:`infer_impl`, :meth:`deactivate_impl` and :meth:`get_input_metadata_impl`; they may extend
    :meth:`memory` and :meth:`info`.

    Attributes:
        backend: registry name of the class (``"torch"``, ``"ort"``, ...), set by :func:`register_runner`.
        name: human-readable name of this instance (file stem, model class, ...).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        is_active: whether the runner is between :meth:`activate` and :meth:`deactivate`.
        last_inference_time_s: duration of the last :meth:`infer_impl` call (``time.perf_counter``).
    """

    backend: ClassVar[str] = "base"

    def __init__(self, *, name: str | None = None, device: str = "cpu") -> None:
        self.name = name if name is not None else self.backend
        self.device = device
        self.is_active = False
        self.last_inference_time_s: float | None = None
        self._input_metadata: dict[str, TensorMeta] | None = None

    # Public template methods -------------------------------------------------------------------------

    def activate(self) -> None:
        """Load the model and allocate what inference needs; does nothing if already active."""
        if self.is_active:
            return
        self.activate_impl()
        self.is_active = True
        self._input_metadata = None

    def deactivate(self) -> None:
        """Release what :meth:`activate` acquired; does nothing if not active."""
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False
            self._input_metadata = None

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        """Return input name → :class:`TensorMeta`, in the order the model takes its inputs.

        Raises:
            RuntimeError: if the runner is not active.
        """
        self._require_active("get_input_metadata")
        if self._input_metadata is None:
            self._input_metadata = dict(self.get_input_metadata_impl())
        return self._input_metadata

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Validate ``feed`` and run one inference; returns output name → host array.

        Runners on an asynchronous device synchronise before returning, so a host timer around this
        call measures the whole inference.

        Raises:
            UserInputError: if input names, dtypes or shapes do not match the model.
            RuntimeError: if the runner is not active.
        """
        self._require_active("infer")
        self._check_feed(feed)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_inference_time_s = time.perf_counter() - start
        return outputs

    def memory(self) -> dict[str, Any]:
        """Memory this runner can report, in bytes; the base class gives the process RSS."""
        return {"rss_bytes": process_rss_bytes()}

    def info(self) -> dict[str, Any]:
        """JSON-ready description of the runner (backend, device, name, backend-specific settings)."""
        return {"name": self.name, "backend": self.backend, "device": self.device}

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r}, {state})"

    # Construction from files (what `python -m runtime bench` uses) ------------------------------------

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **options: Any) -> Runner:
        """Build a runner for one model file (ONNX, engine, ...); ``options`` go to the constructor.

        Raises:
            UserInputError: this backend does not run single files.
        """
        raise UserInputError(f"the {cls.backend} backend does not run a model file; use from_run_dir")

    @classmethod
    def run_dir_file(cls, run_dir: RunDir, which: str) -> Path:
        """The file of ``run_dir`` this backend runs for ``which`` (``"dense"`` or ``"model"``).

        Raises:
            UserInputError: this backend reads no file of a run directory.
        """
        raise UserInputError(f"the {cls.backend} backend cannot run a model of a run directory")

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike[str], which: str = "model", **options: Any) -> Runner:
        """Build a runner for the dense (``which="dense"``) or compressed (``"model"``) model of a run.

        The default checks :meth:`run_dir_file` exists (naming the stage that writes it) and calls
        :meth:`from_path` with ``name`` set to the record key (``"dense"`` / ``"compressed"``).

        Raises:
            UserInputError: unknown ``which``, or the file is missing.
        """
        rd = RunDir(run_dir)
        key = model_key(which)
        path = rd.require(cls.run_dir_file(rd, key))
        return cls.from_path(path, **{"name": key, **options})

    @classmethod
    def bench_runners(cls, run_dir: str | os.PathLike[str], **options: Any) -> dict[str, Runner]:
        """``{"dense": ..., "compressed": ...}`` runners for ``python -m runtime bench``.

        Raises:
            UserInputError: a file of the run directory is missing.
        """
        return {key: cls.from_run_dir(run_dir, key, **options) for key in MODELS}

    @classmethod
    def cli_options(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor options from parsed CLI arguments (``vars(namespace)``); validates the ones it reads.

        The base class reads nothing; backends pick the arguments they understand.
        """
        return {}

    @classmethod
    def cli_env(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """Run settings from the CLI arguments to record in ``latency.json``'s ``env``."""
        return {}

    # Hooks for subclasses ----------------------------------------------------------------------------

    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Load the model; raise ``RuntimeUnavailableError`` if the backend or device is missing."""

    @abc.abstractmethod
    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        """Describe the inputs of the activated model."""

    @abc.abstractmethod
    def infer_impl(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run one inference on a validated feed and return host arrays (synchronised)."""

    @abc.abstractmethod
    def deactivate_impl(self) -> None:
        """Release the model and any device memory."""

    # Internals --------------------------------------------------------------------------------------

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise RuntimeError(f"{self!r}: {what}() needs an active runner; use `with runner:` or activate()")

    def _check_feed(self, feed: Feed) -> None:
        if not isinstance(feed, Mapping):
            raise UserInputError(
                f"runner {self.name!r}: feed must map input names to arrays, got {type(feed).__name__}"
            )
        meta = self.get_input_metadata()
        problems = []
        missing = [n for n in meta if n not in feed]
        extra = [n for n in feed if n not in meta]
        if missing:
            problems.append(f"missing input(s) {missing}")
        if extra:
            problems.append(f"unexpected input(s) {extra}")
        for input_name, spec in meta.items():
            if input_name not in feed:
                continue
            problem = _check_array(feed[input_name], spec)
            if problem:
                problems.append(f"input {input_name!r} {problem}")
        if problems:
            expected = ", ".join(f"{n}: {m.describe()}" for n, m in meta.items())
            raise UserInputError(f"runner {self.name!r}: {'; '.join(problems)} (model expects {expected})")


def _check_array(value: object, spec: TensorMeta) -> str | None:
    """Return why ``value`` does not fit ``spec``, or ``None`` when it does."""
    if not isinstance(value, np.ndarray):
        return f"must be a numpy array, got {type(value).__name__}"
    if value.dtype != spec.dtype:
        return f"has dtype {value.dtype}, expected {spec.dtype}"
    if spec.shape is None:
        return None
    if value.ndim != len(spec.shape):
        return f"has shape {list(value.shape)} (rank {value.ndim}), expected rank {len(spec.shape)}"
    wrong = [
        f"axis {axis} is {size}, expected {spec.shape[axis]}"
        for axis, size in enumerate(value.shape)
        if not spec.is_dynamic(axis) and size != spec.shape[axis]
    ]
    if wrong:
        return f"has shape {list(value.shape)}: {', '.join(wrong)}"
    return None


def process_rss_bytes() -> int | None:
    """Resident set size of this process in bytes, or ``None`` when psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


# Registry ---------------------------------------------------------------------------------------------

_RUNNERS: dict[str, type[Runner]] = {}
_DISCOVERED: set[str] = set()

R = TypeVar("R", bound=type[Runner])


def register_runner(name: str) -> Callable[[R], R]:
    """Class decorator registering a :class:`Runner` subclass under ``name`` and setting its ``backend``.

    Raises:
        ValueError: if ``name`` is already taken by another class.
    """

    def decorator(cls: R) -> R:
        existing = _RUNNERS.get(name)
        if existing is not None and _qualname(existing) != _qualname(cls):
            raise ValueError(f"runner name {name!r} is already registered by {_qualname(existing)}")
        cls.backend = name
        _RUNNERS[name] = cls
        return cls

    return decorator


def runner_class(name: str) -> type[Runner]:
    """Return the runner class registered as ``name``.

    Raises:
        UserInputError: for an unknown name, listing the known ones.
    """
    _discover_runner_modules()
    try:
        return _RUNNERS[name]
    except KeyError:
        known = ", ".join(sorted(_RUNNERS)) or "none"
        raise UserInputError(f"unknown backend {name!r}; known backends: {known}") from None


def available_backends() -> tuple[str, ...]:
    """Names of all registered runners, sorted.

    A name being listed means its module imports; whether its hardware or package is usable shows
    on :meth:`Runner.activate`, which raises :class:`~lowrank_core.errors.RuntimeUnavailableError`.
    """
    _discover_runner_modules()
    return tuple(sorted(_RUNNERS))


def _discover_runner_modules(package: str = "runtime") -> None:
    """Import every ``*_runner`` module of ``package`` once, so their decorators fill the registry."""
    if package in _DISCOVERED:
        return
    pkg = importlib.import_module(package)
    for module in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if module.name.endswith("_runner"):
            importlib.import_module(f"{package}.{module.name}")
    _DISCOVERED.add(package)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
