"""Fixtures for the runtime tests: tiny ONNX models, a fake run directory, fake runners and a fake clock."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import base, harness
from runtime.base import Runner, TensorMeta

REPO_ROOT = Path(__file__).resolve().parents[2]


# Tiny ONNX models ------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """Weights of ``Conv(3→C, 3×3, pad 1) → Relu → GlobalAveragePool → Flatten → Gemm(C→5)``."""

    path: Path
    conv_w: np.ndarray
    conv_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray

    def torch_module(self) -> Any:
        """The same network as a torch ``nn.Sequential`` with identical weights."""
        import torch
        from torch import nn

        channels = self.conv_w.shape[0]
        model = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 5),
        )
        with torch.no_grad():
            model[0].weight.copy_(torch.from_numpy(self.conv_w))
            model[0].bias.copy_(torch.from_numpy(self.conv_b))
            model[4].weight.copy_(torch.from_numpy(self.fc_w))
            model[4].bias.copy_(torch.from_numpy(self.fc_b))
        return model.eval()


def make_tiny_onnx(
    path: Path,
    *,
    channels: int = 4,
    seed: int = 0,
    batch: int | str = "N",
    spatial: tuple[int | str, int | str] = (8, 8),
) -> TinyModel:
    """Write a tiny CNN built with ``onnx.helper`` (no exporter involved) and return its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((channels, 3, 3, 3), dtype=np.float32) * 0.3
    conv_b = rng.standard_normal(channels, dtype=np.float32) * 0.1
    fc_w = rng.standard_normal((5, channels), dtype=np.float32) * 0.3
    fc_b = rng.standard_normal(5, dtype=np.float32) * 0.1
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv_b, "conv_b"),
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(fc_b, "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, *spatial])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 5])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return TinyModel(path, conv_w, conv_b, fc_w, fc_b)


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> TinyModel:
    """A tiny ONNX CNN with a dynamic batch axis ``N``: ``input`` [N,3,8,8] → ``output`` [N,5]."""
    return make_tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def onnx_factory(tmp_path: Path) -> Callable[..., TinyModel]:
    """Build more tiny ONNX models: ``onnx_factory("name", channels=..., batch=..., spatial=...)``."""

    def build(name: str, **kwargs: Any) -> TinyModel:
        return make_tiny_onnx(tmp_path / f"{name}.onnx", **kwargs)

    return build


# Fake run directory ----------------------------------------------------------------------------------

COMPRESS_JSON = {
    "model": "tiny",
    "method": "tucker2",
    "weights": "random",
    "weights_warning": "random weights: accuracy numbers are meaningless",
    "input_shape": [1, 3, 8, 8],
    "dense": {"params": 8 * 3 * 9 + 8 + 5 * 8 + 5, "macs": 8 * 27 * 64 + 40},
    "compressed": {"params": 4 * 3 * 9 + 4 + 5 * 4 + 5, "macs": 4 * 27 * 64 + 20},
    "agreement": {"top1": 0.98, "rel_l2": 0.012},
}

PARITY_JSON = {
    "dense": {"max_abs": 1.0e-6, "max_rel": 2.0e-6, "mean_abs": 1.0e-7, "onnx_bytes": 1},
    "compressed": {"max_abs": 3.0e-6, "max_rel": 4.0e-6, "mean_abs": 2.0e-7, "onnx_bytes": 1},
    "atol": 1e-5,
    "rtol": 1e-5,
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as the compress and export stages leave it: JSON records and two ONNX files."""
    folder = tmp_path / "run"
    folder.mkdir()
    make_tiny_onnx(folder / "dense.onnx", channels=8, seed=1)
    make_tiny_onnx(folder / "model.onnx", channels=4, seed=2)
    (folder / "compress.json").write_text(json.dumps(COMPRESS_JSON), encoding="utf-8")
    (folder / "parity.json").write_text(json.dumps(PARITY_JSON), encoding="utf-8")
    return folder


# Fake runners and clock ------------------------------------------------------------------------------


class FakeClock:
    """A clock that only moves when a fake runner "spends" time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class CallLog:
    """Shared record of (runner name, phase) per inference, in call order."""

    calls: list[str] = field(default_factory=list)


class FakeRunner(Runner):
    """A runner that returns ``2 * x`` and logs each call; with a clock, each call costs ``cost_s``."""

    backend = "fake"

    def __init__(
        self,
        name: str,
        *,
        log: CallLog | None = None,
        clock: FakeClock | None = None,
        cost_s: float = 0.0,
        shape: tuple[int | str | None, ...] | None = ("N", 3),
    ) -> None:
        super().__init__(name=name, device="cpu")
        self.log = log if log is not None else CallLog()
        self.clock = clock
        self.cost_s = cost_s
        self.shape = shape
        self.activations = 0
        self.deactivations = 0

    def activate_impl(self) -> None:
        self.activations += 1

    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        return {"x": TensorMeta(np.dtype("float32"), self.shape)}

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log.calls.append(self.name)
        if self.clock is not None:
            self.clock.advance(self.cost_s)
        return {"y": feed["x"] * 2}

    def deactivate_impl(self) -> None:
        self.deactivations += 1

    def memory(self) -> dict[str, Any]:
        mem = super().memory()
        mem["fake_device_bytes"] = 1234
        return mem


@pytest.fixture
def fake_runner_cls() -> type[FakeRunner]:
    """The :class:`FakeRunner` class (not registered in the runner registry)."""
    return FakeRunner


@pytest.fixture
def call_log() -> CallLog:
    """An empty shared call log."""
    return CallLog()


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock installed as the harness timer for this test."""
    clock = FakeClock()
    monkeypatch.setattr(harness, "_now", clock)
    return clock


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, type[Runner]]:
    """A copy of the runner registry that the test may change freely."""
    base.available_backends()  # discover the built-in runners first
    registry = dict(base._RUNNERS)
    monkeypatch.setattr(base, "_RUNNERS", registry)
    return registry


@pytest.fixture
def x_feed() -> dict[str, np.ndarray]:
    """A feed for :class:`FakeRunner`: ``x`` of shape (2, 3), float32."""
    return {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


# Subprocess helper -----------------------------------------------------------------------------------


@pytest.fixture
def run_cli() -> Callable[..., Any]:
    """Run ``python -m runtime ARGS`` from the repository root; returns the CompletedProcess."""
    import subprocess

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.run(
            [sys.executable, "-m", "runtime", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(autouse=True)
def _restore_numpy_rng() -> Iterator[None]:
    """Keep numpy's legacy global RNG untouched across tests (torchvision's prevent_leaking_rng)."""
    state = np.random.get_state()
    yield
    np.random.set_state(state)
