"""TensorRT import check and serialized engines on disk: ``model.plan`` plus its JSON sidecar.

:func:`require_tensorrt` imports ``tensorrt`` (lazily) and names the container when it is missing.
:func:`save_engine` writes plan and sidecar atomically (the export's engine build); :func:`load_engine`
refuses a plan built with another TensorRT version or on another GPU (engines are not portable), for the
``trt`` runner. Both live in ``runtime`` so the runner needs nothing of ``export``. The GPU identity comes from
:func:`lowrank_core.device.device_identity`, imported when a plan is loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from lowrank_core.io import atomic_write_bytes, atomic_write_json, read_json
from lowrank_core.rundir import ENGINE_SIDECAR_SUFFIX, MODEL_ENGINE

SIDECAR_SUFFIX = ENGINE_SIDECAR_SUFFIX
"""The sidecar of ``model.plan`` is ``model.plan.json``."""
_INSTALL_HINT = (
    "use the NVIDIA TensorRT container (docker/Dockerfile.x86) or JetPack on a Jetson (docker/Dockerfile.jetson)"
)


def require_tensorrt() -> str:
    """Import ``tensorrt`` and return its version string.

    Raises:
        RuntimeUnavailableError: if TensorRT is not installed, or older than 10.0.
    """
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailableError(f"TensorRT is not installed: {_INSTALL_HINT}") from None
    version = getattr(tensorrt, "__version__", None)
    if version is None:  # e.g. only tensorrt-stubs' .pyi files: a namespace package without the library
        raise RuntimeUnavailableError(
            f"the importable 'tensorrt' is not the TensorRT library (no __version__; only type stubs?): {_INSTALL_HINT}"
        )
    api_generation(str(version))
    return str(version)


def api_generation(version: str) -> int:
    """API generation of a TensorRT version string: ``10`` for 10.x, ``11`` for 11.x and newer.

    Raises:
        RuntimeUnavailableError: for a version older than 10 or an unparsable one.
    """
    match = re.match(r"^(\d+)\.", version)
    if match is None:
        raise RuntimeUnavailableError(f"cannot parse the TensorRT version {version!r}")
    major = int(match.group(1))
    if major < 10:
        raise RuntimeUnavailableError(f"TensorRT {version} is too old; this project needs TensorRT 10.x or 11.x")
    return 10 if major == 10 else 11


@dataclass
class BuiltEngine:
    """A serialized engine and what went into it.

    Attributes:
        plan: the serialized engine (``model.plan`` bytes).
        metadata: the sidecar fields (see :func:`save_engine`), ``engine_bytes`` included.
        layer_info: the engine inspector's JSON text, or ``None`` when unavailable.
    """

    plan: bytes
    metadata: dict[str, Any]
    layer_info: str | None = None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` → ``model.plan.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_engine(
    plan: bytes | BuiltEngine, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``path`` (the plan) and ``path.json`` (the sidecar) atomically; return ``path``.

    Sidecar keys: ``tensorrt_version``, ``api_generation``, ``gpu_name``, ``compute_capability``,
    ``precision``, ``profile``, ``build_flags``, ``workspace_mib``, ``opt_level``, ``onnx_sha256``,
    ``engine_bytes``, ``built_utc`` (plus ``engine_sha256``, ``precision_check`` and notes when built
    by :class:`EngineFromOnnx`). ``engine_bytes`` and ``engine_sha256`` are recomputed from the plan.

    Args:
        plan: the serialized engine or a :class:`BuiltEngine` (whose metadata is used).
        path: destination, conventionally ``DIR/model.plan``.
        metadata: sidecar fields when ``plan`` is raw bytes (merged over the built engine's otherwise).

    Raises:
        UserInputError: if no metadata is available.
    """
    if isinstance(plan, BuiltEngine):
        meta = {**plan.metadata, **(metadata or {})}
        data = plan.plan
    else:
        if metadata is None:
            raise UserInputError("save_engine needs the sidecar metadata for raw plan bytes")
        meta, data = dict(metadata), bytes(plan)
    meta["engine_bytes"] = len(data)
    meta["engine_sha256"] = hashlib.sha256(data).hexdigest()
    dest = Path(path)
    atomic_write_bytes(dest, data)
    atomic_write_json(sidecar_path(dest), meta)
    return dest


def check_sidecar(
    meta: Mapping[str, Any],
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    engine_path: str | os.PathLike[str] = MODEL_ENGINE,
) -> None:
    """Refuse an engine built for another TensorRT or GPU.

    Raises:
        RuntimeUnavailableError: one line naming the mismatch and telling to rebuild on the target.
    """
    name = Path(engine_path).name
    rebuild = f"rebuild it on the target with `python -m export engine --run-dir {Path(engine_path).parent}`"
    built_trt = meta.get("tensorrt_version")
    if built_trt != tensorrt_version:
        raise RuntimeUnavailableError(
            f"{name} was built with TensorRT {built_trt} but TensorRT {tensorrt_version} is installed; "
            f"engines are not portable across versions: {rebuild}"
        )
    built_cc = str(meta.get("compute_capability"))
    built_gpu = meta.get("gpu_name")
    if built_cc != str(compute_capability) or built_gpu != gpu_name:
        raise RuntimeUnavailableError(
            f"{name} was built on {built_gpu} (compute capability {built_cc}) but this GPU is {gpu_name} "
            f"(compute capability {compute_capability}); {rebuild}"
        )


def load_engine(path: str | os.PathLike[str], *, check: bool = True) -> bytes:
    """Read a plan after checking its sidecar against the running TensorRT and GPU.

    Args:
        path: the ``.plan`` file.
        check: compare the sidecar with this machine (``False`` skips it — at your own risk).

    Raises:
        UserInputError: the plan or its sidecar is missing, or the sidecar describes another file.
        RuntimeUnavailableError: TensorRT is missing, or the engine was built for another TensorRT/GPU.
    """
    plan_path = Path(path)
    if not plan_path.is_file():
        raise UserInputError(f"engine {str(plan_path)!r} does not exist; build it with `python -m export engine`")
    data = plan_path.read_bytes()
    if not check:
        return data
    side = sidecar_path(plan_path)
    if not side.is_file():
        raise UserInputError(
            f"{side.name} is missing, so {plan_path.name} cannot be checked against this TensorRT and GPU; "
            "rebuild it with `python -m export engine` (or pass check=False)"
        )
    meta = read_json(side, what="engine sidecar")
    if meta.get("engine_bytes") != len(data):
        raise UserInputError(
            f"{side.name} describes a {meta.get('engine_bytes')}-byte engine but {plan_path.name} has {len(data)} "
            "bytes; rebuild it with `python -m export engine`"
        )
    version = require_tensorrt()
    from lowrank_core.device import device_identity

    gpu = device_identity()
    check_sidecar(
        meta,
        tensorrt_version=version,
        gpu_name=gpu["name"],
        compute_capability=gpu["compute_capability"],
        engine_path=plan_path,
    )
    return data
