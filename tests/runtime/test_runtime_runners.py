"""OrtRunner and TorchRunner on a tiny ONNX model built with onnx.helper (no exporter involved)."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from runtime.base import TensorMeta
from runtime.harness import BenchmarkConfig, benchmark

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from runtime.ort_runner import PROVIDERS, OrtRunner, resolve_provider  # noqa: E402
from runtime.torch_runner import TorchRunner  # noqa: E402

ATOL = RTOL = 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _input(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, 8, 8), dtype=np.float32)}


# OrtRunner -------------------------------------------------------------------------------------------


def test_ort_metadata_and_providers(tiny_onnx):
    with OrtRunner(tiny_onnx.path) as runner:
        meta = runner.get_input_metadata()
        assert list(meta) == ["input"]
        assert meta["input"].dtype == np.float32
        assert meta["input"].shape == ("N", 3, 8, 8)
        assert runner.providers_in_use == ("CPUExecutionProvider",)
        info = runner.info()
    assert info["backend"] == "ort"
    assert info["device"] == "cpu"
    assert info["name"] == "tiny"
    assert info["providers_in_use"] == ["CPUExecutionProvider"]
    assert info["graph_optimization_level"] == "all"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("level", ["disable", "all"])
def test_ort_matches_torch(tiny_onnx, batch, level):
    feed = _input(batch)
    with OrtRunner(tiny_onnx.path, graph_optimization_level=level, intra_op_threads=1) as runner:
        got = runner.infer(feed)
    with TorchRunner(tiny_onnx.torch_module(), input_shapes={"input": (None, 3, 8, 8)}) as ref:
        want = ref.infer(feed)
    assert list(got) == ["output"]
    assert got["output"].shape == (batch, 5)
    np.testing.assert_allclose(got["output"], want["output"], atol=ATOL, rtol=RTOL)


def test_ort_rejects_wrong_shape(tiny_onnx):
    with OrtRunner(tiny_onnx.path) as runner, pytest.raises(UserInputError, match="axis 2 is 9, expected 8"):
        runner.infer({"input": np.zeros((1, 3, 9, 8), np.float32)})


def test_provider_names():
    assert resolve_provider("cpu") == "CPUExecutionProvider"
    assert resolve_provider("tensorrt") == "TensorrtExecutionProvider"
    assert resolve_provider("CUDAExecutionProvider") == "CUDAExecutionProvider"
    assert set(PROVIDERS) == {"cpu", "cuda", "tensorrt"}
    with pytest.raises(UserInputError, match=r"unknown ONNX Runtime provider 'rocm'.*cpu, cuda, tensorrt"):
        OrtRunner("x.onnx", providers=("rocm",))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"graph_optimization_level": "max"}, "graph_optimization_level"),
        ({"intra_op_threads": 0}, "intra_op_threads"),
        ({"providers": ()}, "at least one provider"),
    ],
)
def test_ort_rejects_bad_settings(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        OrtRunner("x.onnx", **kwargs)


@pytest.mark.parametrize("short", ["cuda", "tensorrt"])
def test_unavailable_provider_names_the_package(tiny_onnx, short):
    if PROVIDERS[short] in ort.get_available_providers():
        pytest.skip(f"{PROVIDERS[short]} is installed here")
    runner = OrtRunner(tiny_onnx.path, providers=(short,))
    assert runner.device == "cuda"
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime-gpu") as info:
        runner.activate()
    assert PROVIDERS[short] in str(info.value)
    assert "\n" not in str(info.value)
    assert not runner.is_active


def test_missing_and_corrupt_onnx(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        OrtRunner(tmp_path / "nope.onnx").activate()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserInputError, match="ONNX Runtime cannot load") as info:
        OrtRunner(bad).activate()
    assert "\n" not in str(info.value)


def test_ort_in_benchmark(tiny_onnx, onnx_factory):
    small = onnx_factory("small", channels=2, seed=5)
    runners = {"dense": OrtRunner(tiny_onnx.path), "compressed": OrtRunner(small.path)}
    result = benchmark(runners, _input(2), BenchmarkConfig(warmup_iters=2, warmup_s=0.0, iters=5, batch=2))
    assert result.stats["dense"].n == result.stats["compressed"].n == 5
    assert result.runners["compressed"]["providers_in_use"] == ["CPUExecutionProvider"]
    assert result.memory["runners"]["dense"]["rss_after_activate_bytes"] > 0
    assert not any(r.is_active for r in runners.values())


# TorchRunner -----------------------------------------------------------------------------------------


def test_torch_runner_restores_the_module(tiny_onnx):
    model = tiny_onnx.torch_module().train()
    with TorchRunner(model, input_shapes={"input": ("N", 3, 8, 8)}) as runner:
        assert not model.training
        assert runner.name == "Sequential"
        assert runner.get_input_metadata()["input"] == TensorMeta(np.dtype("float32"), ("N", 3, 8, 8))
        out = runner.infer(_input(2))
    assert model.training
    assert out["output"].shape == (2, 5)
    assert out["output"].dtype == np.float32


def test_torch_runner_output_naming():
    class TwoOut(torch.nn.Module):
        def forward(self, x):
            return x + 1, {"inner": x}

    class DictOut(torch.nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": x.sum(dim=1)}

    x = {"input": np.ones((2, 3), np.float32)}
    with TorchRunner(DictOut()) as runner:
        out = runner.infer(x)
    assert set(out) == {"a", "b"}
    np.testing.assert_array_equal(out["b"], np.full(2, 3.0, np.float32))
    with TorchRunner(TwoOut(), output_names=("plus", "raw")) as runner, pytest.raises(UserInputError):
        runner.infer(x)  # a dict inside a tuple is not a tensor


def test_torch_runner_tuple_outputs():
    class Pair(torch.nn.Module):
        def forward(self, x, y):
            return x + y, x - y

    feed = {"x": np.ones((2, 2), np.float32), "y": np.full((2, 2), 3.0, np.float32)}
    with TorchRunner(Pair(), input_shapes={"x": (2, 2), "y": (2, 2)}) as runner:
        out = runner.infer(feed)
    np.testing.assert_array_equal(out["output_0"], np.full((2, 2), 4.0, np.float32))
    np.testing.assert_array_equal(out["output_1"], np.full((2, 2), -2.0, np.float32))


def test_torch_runner_runs_in_inference_mode():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return x

    with TorchRunner(Probe()) as runner:
        runner.infer({"input": np.zeros(1, np.float32)})
    assert seen == [True]


def test_torch_runner_rejects_bad_device():
    with pytest.raises(UserInputError, match="'cpu', 'cuda' or 'cuda:N'"):
        TorchRunner(torch.nn.Identity(), device="gpu")


def test_torch_cuda_unavailable_is_one_line(tiny_onnx):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    runner = TorchRunner(tiny_onnx.torch_module(), device="cuda")
    with pytest.raises(RuntimeUnavailableError, match=r"torch\.cuda\.is_available\(\) is False") as info:
        runner.activate()
    assert "\n" not in str(info.value)
    assert not runner.is_active


def test_torch_memory_on_cpu_has_no_cuda_keys(tiny_onnx):
    with TorchRunner(tiny_onnx.torch_module()) as runner:
        mem = runner.memory()
    assert mem["rss_bytes"] > 0
    assert not any(k.startswith("cuda") for k in mem)


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_matches_cpu_and_reports_memory(tiny_onnx):
    feed = _input(4)
    with TorchRunner(tiny_onnx.torch_module(), input_shapes={"input": (None, 3, 8, 8)}) as cpu:
        want = cpu.infer(feed)
    model = tiny_onnx.torch_module()
    with TorchRunner(model, input_shapes={"input": (None, 3, 8, 8)}, device="cuda") as gpu:
        assert next(model.parameters()).is_cuda
        got = gpu.infer(feed)
        mem = gpu.memory()
    assert not next(model.parameters()).is_cuda  # moved back on deactivate
    np.testing.assert_allclose(got["output"], want["output"], atol=1e-4, rtol=1e-4)
    assert mem["cuda_weights_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert mem["cuda_max_allocated_bytes"] >= mem["cuda_weights_bytes"]
    assert mem["cuda_max_reserved_bytes"] >= mem["cuda_max_allocated_bytes"]


@pytest.mark.gpu
@needs_cuda
def test_ort_cuda_matches_cpu(tiny_onnx):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    feed = _input(2)
    with OrtRunner(tiny_onnx.path) as cpu:
        want = cpu.infer(feed)
    with OrtRunner(tiny_onnx.path, providers=("cuda",)) as gpu:
        assert gpu.providers_in_use[0] == "CUDAExecutionProvider"
        got = gpu.infer(feed)
    np.testing.assert_allclose(got["output"], want["output"], atol=1e-4, rtol=1e-4)
