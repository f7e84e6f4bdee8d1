"""Compression passes over a ``torch.nn.Module``: plan → inspect → apply → record.

The public names are loaded on first use (PEP 562), so ``import compress`` — and the ``export`` and
``runtime`` packages that share its error types and I/O helpers — do not import torch until needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lowrank_core.errors import CompressionError, LowrankDeployError, UserInputError

if TYPE_CHECKING:
    from compress.api import (
        LowRankConfig,
        apply_plan_,
        compress_,
        get_method,
        method_config,
        method_names,
        plan_compression,
        register,
    )
    from compress.plan import LayerPlan, Plan
    from compress.targets import Target

_LAZY = {
    "LowRankConfig": "compress.api",
    "Target": "compress.targets",
    "get_method": "compress.api",
    "method_names": "compress.api",
    "apply_plan_": "compress.api",
    "compress_": "compress.api",
    "method_config": "compress.api",
    "plan_compression": "compress.api",
    "register": "compress.api",
    "LayerPlan": "compress.plan",
    "Plan": "compress.plan",
}

__all__ = ["CompressionError", "LowrankDeployError", "UserInputError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
