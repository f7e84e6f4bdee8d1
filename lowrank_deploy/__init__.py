"""lowrank-deploy: the chain on top of the three stages (``compress`` → ``export`` → ``runtime``).

:mod:`lowrank_deploy.pipeline` plans and runs the stages of ``lowrank-deploy export`` (and ``train``,
``finetune``, ``engine``), :mod:`lowrank_deploy.compare` runs several methods side by side, and
:mod:`lowrank_deploy.__main__` is the ``lowrank-deploy`` command. The foundation every floor shares (errors,
atomic I/O, run-directory records, integrity) is :mod:`lowrank_core`; the error types are re-exported here.
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
