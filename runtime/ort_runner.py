"""ONNX Runtime runner (``"ort"``).

``onnxruntime`` is imported inside the methods, so importing this module (and ``runtime``) stays cheap
and works where ONNX Runtime is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_deploy.errors import RuntimeUnavailableError, UserInputError
from runtime.base import Feed, Runner, TensorMeta, register_runner

if TYPE_CHECKING:
    from lowrank_deploy.rundir import RunDir

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
"""Short provider names accepted by :class:`OrtRunner` → ONNX Runtime execution provider."""

DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    "tensorrt": ("tensorrt", "cuda"),
}
"""The CLI's ``--device`` → providers in priority order."""

_PROVIDER_PACKAGES: dict[str, str] = {
    "CPUExecutionProvider": "onnxruntime",
    "CUDAExecutionProvider": "onnxruntime-gpu (with CUDA and cuDNN libraries matching it)",
    "TensorrtExecutionProvider": "onnxruntime-gpu (with TensorRT libraries matching it)",
}

_OPT_LEVELS: dict[str, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

_ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError(
            "the ort backend needs ONNX Runtime; install `onnxruntime` (CPU) or `onnxruntime-gpu` (CUDA/TensorRT)"
        ) from None
    return onnxruntime


def resolve_provider(name: str) -> str:
    """Map a short name (``cpu``, ``cuda``, ``tensorrt``) or a full provider name to the full name.

    Raises:
        UserInputError: for an unknown name.
    """
    if name in PROVIDERS:
        return PROVIDERS[name]
    if name in PROVIDERS.values():
        return name
    known = ", ".join(PROVIDERS)
    raise UserInputError(f"unknown ONNX Runtime provider {name!r}; use one of: {known}")


@register_runner("ort")
class OrtRunner(Runner):
    """Run an ONNX file with ONNX Runtime.

    Args:
        onnx_path: the model file, or a serialized model (``ModelProto.SerializeToString()``).
        providers: execution providers in priority order, short (``cpu``, ``cuda``, ``tensorrt``) or full
            names. ONNX Runtime always adds CPU as the fallback for nodes other providers reject.
        intra_op_threads: threads inside one operator; ``None`` lets ONNX Runtime choose (all cores).
        graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
        allow_spinning: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off by
            default here: when two sessions are timed interleaved, the spinning pool of the one that just
            ran steals cores from the other (seen on this project's 2-core machine as a bimodal dense
            latency, 37 ms alone vs 40/70 ms interleaved), which biases every A/B comparison.
        name: instance name; default the file stem.

    Attributes:
        providers: the requested providers (full names).
        providers_in_use: the providers of the live session, recorded at activation.

    Raises:
        UserInputError: for an unknown provider or optimisation level, or ``intra_op_threads`` < 1.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str] | bytes,
        *,
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool = False,
        name: str | None = None,
    ) -> None:
        if isinstance(providers, str):
            providers = (providers,)
        if not providers:
            raise UserInputError("OrtRunner needs at least one provider, e.g. providers=('cpu',)")
        resolved = tuple(resolve_provider(p) for p in providers)
        if graph_optimization_level not in _OPT_LEVELS:
            raise UserInputError(
                f"unknown graph_optimization_level {graph_optimization_level!r}; use one of: {', '.join(_OPT_LEVELS)}"
            )
        if intra_op_threads is not None and intra_op_threads < 1:
            raise UserInputError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self._model_bytes = bytes(onnx_path) if isinstance(onnx_path, bytes) else None
        self.onnx_path = Path("in-memory.onnx") if self._model_bytes is not None else Path(onnx_path)
        device = "cuda" if any(p != "CPUExecutionProvider" for p in resolved) else "cpu"
        super().__init__(name=name if name is not None else self.onnx_path.stem, device=device)
        self.providers = resolved
        self.intra_op_threads = intra_op_threads
        self.graph_optimization_level = graph_optimization_level
        self.allow_spinning = allow_spinning
        self.providers_in_use: tuple[str, ...] = ()
        self._session: Any = None
        self._output_names: list[str] = []

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **options: Any) -> OrtRunner:
        """``OrtRunner(path, **options)``."""
        return cls(path, **options)

    @classmethod
    def run_dir_file(cls, run_dir: RunDir, which: str) -> Path:
        """``dense.onnx`` or ``model.onnx``."""
        return run_dir.onnx(which)

    @classmethod
    def cli_options(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """``--device`` (cpu, cuda, tensorrt) → providers, ``--threads`` → intra-op threads, ``--spin``.

        Raises:
            UserInputError: for an unknown device.
        """
        device = str(args.get("device") or "cpu")
        if device not in DEVICE_PROVIDERS:
            raise UserInputError(f"unknown --device {device!r} for ort; use one of: {', '.join(DEVICE_PROVIDERS)}")
        return {
            "providers": DEVICE_PROVIDERS[device],
            "intra_op_threads": args.get("threads"),
            "allow_spinning": bool(args.get("spin", False)),
        }

    @classmethod
    def cli_env(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """The intra-op thread setting."""
        return {"ort_intra_op_threads": args.get("threads")}

    def activate_impl(self) -> None:
        """Check the providers against the installed onnxruntime and create the session."""
        ort = _import_ort()
        available = ort.get_available_providers()
        for provider in self.providers:
            if provider not in available:
                raise RuntimeUnavailableError(
                    f"ONNX Runtime provider {provider} is not available in the installed onnxruntime "
                    f"{ort.__version__} (available: {', '.join(available)}); "
                    f"install {_PROVIDER_PACKAGES[provider]} instead of the CPU-only package"
                )
        if self._model_bytes is None and not self.onnx_path.is_file():
            raise UserInputError(f"ONNX file {str(self.onnx_path)!r} does not exist")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization_level]
        )
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        options.log_severity_level = 3
        errors = _ort_errors()
        try:
            source = self._model_bytes if self._model_bytes is not None else str(self.onnx_path)
            session = ort.InferenceSession(source, sess_options=options, providers=list(self.providers))
        except errors as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"ONNX Runtime cannot load {str(self.onnx_path)!r}: {first_line}") from None
        in_use = tuple(session.get_providers())
        fell_back = [p for p in self.providers if p not in in_use]
        if fell_back:
            raise RuntimeUnavailableError(
                f"ONNX Runtime could not initialise {', '.join(fell_back)} for {self.onnx_path.name} "
                f"and fell back to {', '.join(in_use)}; check that the CUDA/cuDNN/TensorRT libraries "
                f"match onnxruntime-gpu {ort.__version__}"
            )
        self._session = session
        self.providers_in_use = in_use
        self._output_names = [o.name for o in session.get_outputs()]

    @property
    def output_names(self) -> list[str]:
        """Output names of the active session, in model order (empty before :meth:`activate`)."""
        return list(self._output_names)

    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        """Read names, dtypes and shapes (symbolic dims as strings or ``None``) from the session."""
        meta = {}
        for node in self._session.get_inputs():
            dtype = _ORT_TYPES.get(node.type)
            if dtype is None:
                raise UserInputError(
                    f"input {node.name!r} of {self.onnx_path.name} has type {node.type}, which this runner "
                    "does not feed"
                )
            shape = None if node.shape is None else tuple(node.shape)
            meta[node.name] = TensorMeta(np.dtype(dtype), shape)
        return meta

    def infer_impl(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run the session; ``session.run`` returns host arrays, so no extra synchronisation is needed."""
        outputs = self._session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, outputs, strict=True))

    def deactivate_impl(self) -> None:
        """Drop the session."""
        self._session = None

    def info(self) -> dict[str, Any]:
        """Backend, device, file, requested and active providers, threads and optimisation level."""
        out = super().info()
        out.update(
            onnx_path=str(self.onnx_path),
            providers_requested=list(self.providers),
            providers_in_use=list(self.providers_in_use),
            intra_op_threads=self.intra_op_threads,
            graph_optimization_level=self.graph_optimization_level,
            allow_spinning=self.allow_spinning,
        )
        return out


def _ort_errors() -> tuple[type[BaseException], ...]:
    """Exception types ONNX Runtime raises for unreadable or invalid models."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
