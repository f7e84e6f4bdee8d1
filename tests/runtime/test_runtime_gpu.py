"""runtime.gpu with a fake pynvml and fake CUDA events; CUDA-only torch runner options on CPU.

Real GPU
checks marked ``gpu``.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from runtime import gpu
from runtime.torch_runner import TorchRunner


def _fake_pynvml(fail_init: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.calls = []

    class NVMLError(Exception):
        pass

    def init():
        mod.calls.append("init")
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    mod.NVMLError = NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: mod.calls.append("shutdown")
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30, used=3 << 30, free=77 << 30)
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    mod.nvmlSystemGetDriverVersion = lambda: "570.86.15"
    return mod


def test_nvml_device_reads_name_driver_memory(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = gpu.nvml_device(0)
    assert info == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "driver": "570.86.15",
        "compute_capability": "9.0",
        "memory_total_bytes": 80 << 30,
        "memory_used_bytes": 3 << 30,
        "memory_free_bytes": 77 << 30,
    }
    assert fake.calls == ["init", "shutdown"]


def test_nvml_unavailable_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    with pytest.raises(RuntimeUnavailableError, match="Driver Not Loaded"):
        gpu.nvml_device()
    info, reason = gpu.try_nvml_device()
    assert info is None
    assert "NVML could not initialise" in reason
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(RuntimeUnavailableError, match="nvidia-ml-py"):
        gpu.nvml_device()


def test_device_identity_falls_back_to_nvml(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    assert gpu.device_identity() == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "source": "nvml"}
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(RuntimeUnavailableError, match="no CUDA GPU 0"):
        gpu.device_identity()


def test_cuda_event_timer_converts_ms_to_s():
    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.stream = None

        def record(self, stream=None):
            self.stream = stream

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 2.5  # ms, like torch.cuda.Event

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(Event=Event))
    timer = gpu.CudaEventTimer(fake_torch)
    with pytest.raises(RuntimeError, match="start"):
        timer.elapsed_s()
    timer.start("s1")
    timer.stop("s1")
    assert timer.elapsed_s() == pytest.approx(0.0025)


@pytest.mark.parametrize("kwargs", [{"cuda_graph": True}, {"autocast": "fp16"}, {"autocast": "bf16"}])
def test_cuda_only_torch_options_refused_on_cpu(kwargs):
    with pytest.raises(RuntimeUnavailableError, match="need\\(s\\) a CUDA device"):
        TorchRunner(torch.nn.Identity(), device="cpu", **kwargs)


def test_unknown_autocast_and_channels_last_on_cpu():
    with pytest.raises(UserInputError, match="autocast"):
        TorchRunner(torch.nn.Identity(), autocast="fp8")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    with TorchRunner(model, channels_last=True) as runner:
        out = runner.infer({"input": x})["output"]
        assert runner.info()["channels_last"] is True
        assert runner.gpu_times_s == []  # CPU: no CUDA events
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert model[0].weight.is_contiguous()  # memory format restored on deactivate


@pytest.mark.gpu
@pytest.mark.parametrize(("graph", "autocast"), [(False, None), (True, None), (True, "fp16"), (False, "bf16")])
def test_cuda_torch_runner_options_match_cpu(graph, autocast):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    with TorchRunner(model, device="cuda", cuda_graph=graph, channels_last=True, autocast=autocast) as runner:
        for _ in range(3):
            out = runner.infer({"input": x})["output"]
        assert len(runner.gpu_times_s) == 3
        assert all(t > 0 for t in runner.gpu_times_s)
        assert runner.graph_captures == (1 if graph else 0)
        mem = gpu.torch_cuda_memory()
        assert mem["cuda_max_allocated_bytes"] > 0
    tol = 1e-4 if autocast is None else 5e-2
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
