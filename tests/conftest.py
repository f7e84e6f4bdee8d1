"""Shared test configuration: deterministic RNG per test, hardware markers skipped where absent."""

from __future__ import annotations

import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _restore_rng():
    """Seed every test and restore the global RNG state afterwards (torchvision's prevent_leaking_rng)."""
    import torch

    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    np.random.set_state(np_state)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip gpu/trt/jetson tests with a reason on machines without that hardware or library."""
    import os

    skips = {
        "gpu": (not _has_cuda(), "needs a CUDA device (none visible to torch)"),
        "trt": (not _has_tensorrt(), "needs TensorRT (the tensorrt Python package is not installed)"),
        "jetson": (
            not os.path.exists("/etc/nv_tegra_release"),
            "needs a Jetson board (/etc/nv_tegra_release absent)",
        ),
    }
    for item in items:
        for marker, (skip, reason) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
