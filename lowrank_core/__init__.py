"""The foundation every floor imports: errors, atomic I/O, run-directory records, integrity checks.

Error types (:mod:`lowrank_core.errors`), atomic file I/O (:mod:`lowrank_core.io`), the command-line
plumbing (:mod:`lowrank_core.cli`), every run-directory file name and record (:mod:`lowrank_core.rundir`),
the integrity chain (:mod:`lowrank_core.integrity`), input checks (:mod:`lowrank_core.checks`) and the GPU
identity (:mod:`lowrank_core.device`). It imports nothing of ``compress``, ``export``, ``runtime`` or the
chain (:mod:`lowrank_deploy`), and no torch: ``runtime`` runs on a device with numpy + onnxruntime alone.
"""

from __future__ import annotations

from lowrank_core.errors import (
    CompressionError,
    ExportError,
    LowrankDeployError,
    ParityError,
    RuntimeUnavailableError,
    UserInputError,
)

__all__ = [
    "CompressionError",
    "ExportError",
    "LowrankDeployError",
    "ParityError",
    "RuntimeUnavailableError",
    "UserInputError",
]
