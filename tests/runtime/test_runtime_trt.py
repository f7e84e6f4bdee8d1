"""runtime.trt_runner: registration, I/O enumeration with a fake engine, clean refusals on CPU.

A real
engine run marked ``trt``/``gpu``.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from runtime.base import runner_class
from runtime.trt_runner import TrtRunner, engine_device_memory_bytes, io_tensors


def _fake_trt_module():
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.3.0"
    mod.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    mod.nptype = lambda dt: {"FLOAT": np.float32, "HALF": np.float16}[dt]
    return mod


class FakeEngine:
    num_io_tensors = 2
    _tensors = (("input", "in", "FLOAT", (-1, 3, 224, 224)), ("logits", "out", "HALF", (-1, 1000)))

    def get_tensor_name(self, i):
        return self._tensors[i][0]

    def _find(self, name):
        return next(t for t in self._tensors if t[0] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_dtype(self, name):
        return self._find(name)[2]

    def get_tensor_shape(self, name):
        return self._find(name)[3]


def test_registered_as_trt():
    assert runner_class("trt") is TrtRunner


def test_io_tensors_by_name():
    io = io_tensors(FakeEngine(), _fake_trt_module())
    assert io == [
        {"name": "input", "is_input": True, "dtype": np.dtype("float32"), "shape": (-1, 3, 224, 224)},
        {"name": "logits", "is_input": False, "dtype": np.dtype("float16"), "shape": (-1, 1000)},
    ]


def test_device_memory_prefers_v2():
    assert engine_device_memory_bytes(types.SimpleNamespace(device_memory_size_v2=123, device_memory_size=456)) == 123
    assert engine_device_memory_bytes(types.SimpleNamespace(device_memory_size=456)) == 456
    assert engine_device_memory_bytes(types.SimpleNamespace()) is None


def test_cpu_device_refused():
    with pytest.raises(UserInputError, match="CUDA devices only"):
        TrtRunner("model.plan", device="cpu")


def test_activation_without_tensorrt_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    runner = TrtRunner(tmp_path / "model.plan")
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed"), runner:
        pass
    assert not runner.is_active


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-3), ("fp16", 3e-2)])
def test_real_engine_matches_onnxruntime(tmp_path, precision, tol):
    import onnx
    import onnxruntime as ort
    import tensorrt
    from onnx import TensorProto, helper, numpy_helper

    if not hasattr(tensorrt, "__version__"):
        pytest.skip("only TensorRT type stubs are importable")
    from export.tensorrt import engine_from_onnx, save_engine

    w = np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16, 16, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    plan = save_engine(engine_from_onnx(path, precision=precision, batch=(1, 2, 4)), tmp_path / "model.plan")
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with TrtRunner(plan) as runner:
        out = runner.infer({"input": x})["output"]
        assert len(runner.gpu_times_s) == 1
        assert runner.gpu_times_s[0] > 0
        mem = runner.memory()
        assert mem["engine_file_bytes"] == plan.stat().st_size
        assert mem["trt_context_device_memory_bytes"] is not None
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=tol, rtol=tol)
