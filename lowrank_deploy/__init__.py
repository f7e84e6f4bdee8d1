"""lowrank-deploy: the pieces shared by the ``compress``, ``export`` and ``runtime`` packages.

Error types (:mod:`lowrank_deploy.errors`), atomic file I/O (:mod:`lowrank_deploy.io`) and the command-line
plumbing (:mod:`lowrank_deploy.cli`) live here so that each stage package depends on this one and on
nothing of the others: ``runtime`` runs on a device with numpy + onnxruntime alone.
"""

from __future__ import annotations

from lowrank_deploy.errors import (
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
