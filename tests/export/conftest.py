"""Fixtures shared by the export tests: cached exports (the slow part) reused across test modules."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import pytest
import torch
from export_helpers import tv_model
from torch import nn

from export import onnx_from_torch, optimize

# ------------------------------------------------------------------------------------------------
# Cached exports (exports are the slow part; share them across tests)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportCase:
    model: nn.Module
    input_shape: tuple[int, ...]
    raw: onnx.ModelProto
    optimized: onnx.ModelProto


@pytest.fixture(scope="session")
def resnet18_case() -> ExportCase:
    model = tv_model("resnet18")
    shape = (1, 3, 64, 64)
    raw = onnx_from_torch(model, torch.zeros(shape))
    return ExportCase(model, shape, raw, optimize(raw))
