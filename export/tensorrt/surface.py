"""Check the TensorRT 11.x path's API names against a real 11.x bindings wheel (no GPU, no import).

TensorRT 11 ships no type stubs: the ``tensorrt-cu12-bindings`` 11.x wheels hold ``tensorrt.so`` and
``__init__.py`` only, and ``tensorrt-cu12-libs`` (whose ``libnvinfer`` importing the module needs) is a
stub that downloads from NVIDIA's own index at install time, so stubs cannot be generated with
pybind11-stubgen either. ``tensorrt-stubs`` on PyPI stops at 10.13 (what ``make lint`` runs mypy with).

What can be checked without importing: every attribute name the 11.x code path uses must occur as an
identifier in the wheel's ``tensorrt.so`` (pybind11 registers each class, method, property and enum
value by its name) or its ``__init__.py``. A missing name is a certain break; a present one says the
name exists, not that its signature matches (that is the part only the 10.13 stubs check). Usage::

    python -m export.tensorrt.surface tensorrt_cu12_bindings-11.4.0.106-cp311-none-manylinux_2_28_x86_64.whl
"""

from __future__ import annotations

import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

TRT11_NAMES: tuple[str, ...] = (
    # export/tensorrt/build.py, precision.py, sparsity.py (generation 11)
    "Logger", "ILogger", "Severity", "min_severity", "Builder", "create_network", "OnnxParser", "parse",
    "parse_from_file", "num_errors", "get_error", "create_builder_config", "set_memory_pool_limit",
    "MemoryPoolType", "WORKSPACE", "builder_optimization_level", "profiling_verbosity", "ProfilingVerbosity",
    "DETAILED", "set_flag", "BuilderFlag", "SPARSE_WEIGHTS", "num_inputs", "get_input", "create_optimization_profile",
    "set_shape", "add_optimization_profile", "create_timing_cache", "set_timing_cache", "get_timing_cache",
    "serialize", "build_serialized_network", "Runtime", "deserialize_cuda_engine", "create_engine_inspector",
    "get_engine_information", "LayerInformationFormat", "JSON", "num_io_tensors", "get_tensor_name",
    "get_tensor_dtype",
    # runtime/trt_runner.py
    "get_tensor_mode", "TensorIOMode", "INPUT", "get_tensor_shape", "nptype", "create_execution_context",
    "set_input_shape", "set_tensor_address", "execute_async_v3", "device_memory_size_v2",
)  # fmt: skip
"""Every ``tensorrt`` attribute the 11.x code path touches."""

TRT10_ONLY: tuple[str, ...] = (
    "FP16", "INT8", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "int8_calibrator",
    "set_calibration_profile", "device_memory_size",
)  # fmt: skip
"""Names used only when :func:`export.tensorrt.api_generation` is 10 (kept out of the 11.x path)."""

_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


def wheel_identifiers(wheel: str | Path) -> set[str]:
    """Identifier tokens of ``tensorrt_bindings/tensorrt*.so`` and ``__init__.py`` in a bindings wheel.

    Raises:
        FileNotFoundError: the wheel holds no ``tensorrt_bindings`` module.
    """
    tokens: set[str] = set()
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if re.match(r"tensorrt_bindings/(tensorrt[^/]*\.so|__init__\.py)$", n)]
        if not members:
            raise FileNotFoundError(f"{wheel} has no tensorrt_bindings/tensorrt*.so")
        for name in members:
            tokens.update(t.decode() for t in _IDENT.findall(archive.read(name)))
    return tokens


def missing_names(identifiers: set[str], names: Iterable[str] = TRT11_NAMES) -> list[str]:
    """The names that are neither an identifier nor the tail of one, in order.

    Tails count because linkers merge a string literal into the end of a longer one (``INPUT`` is stored
    as the tail of ``CONDITIONAL_INPUT`` in the 11.4 ``tensorrt.so``).
    """
    tails = {ident[i:] for ident in identifiers for i in range(1, len(ident))}
    return [n for n in names if n not in identifiers and n not in tails]


def main(argv: Sequence[str] | None = None) -> int:
    """Check each wheel given; 0 when every 11.x name is present, 1 otherwise."""
    wheels = list(argv if argv is not None else sys.argv[1:])
    if not wheels:
        print("usage: python -m export.tensorrt.surface WHEEL [WHEEL ...]", file=sys.stderr)
        return 2
    status = 0
    for wheel in wheels:
        ids = wheel_identifiers(wheel)
        missing = missing_names(ids)
        absent_10 = missing_names(ids, TRT10_ONLY)
        verdict = "ok" if not missing else f"MISSING {', '.join(missing)}"
        print(f"{Path(wheel).name}: {len(TRT11_NAMES)} names of the 11.x path: {verdict}")
        print(f"  10.x-only names absent from this wheel (expected on 11.x): {', '.join(absent_10) or 'none'}")
        status |= bool(missing)
    return status


if __name__ == "__main__":
    sys.exit(main())
