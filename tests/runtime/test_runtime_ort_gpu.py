"""runtime.ort_runner on GPU providers, against a fake ``onnxruntime`` module (no GPU here).

The fake records the provider options, the I/O-binding calls and the profiling switch, and can report a
fallback to the CPU provider, so the CUDA / TensorRT EP path is checked call by call.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from runtime import ort_runner
from runtime.ort_runner import OrtRunner, node_placement, ort_install_problem, placement_lines

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def _events(provider_of: dict[str, str]) -> list[dict]:
    events = [{"cat": "Session", "name": "model_run", "dur": 500}]
    for node, provider in provider_of.items():
        op = node.split("_")[0]
        events.append({"cat": "Node", "name": f"{node}_fence_before", "dur": 0, "args": {}})
        events.append({"cat": "Node", "name": f"{node}_kernel_time", "dur": 100, "args": {"op_name": op, "provider": provider}})  # fmt: skip
    return events


def fake_ort(*, available=(CUDA, TRT, CPU), in_use=None, placement=None):
    """A module with the narrow onnxruntime surface OrtRunner uses; ``mod.calls`` records every call."""
    mod = types.ModuleType("onnxruntime")
    mod.__version__ = "1.20.0-fake"
    calls: list[tuple] = []
    mod.calls = calls
    mod.get_available_providers = lambda: list(available)
    mod.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL="all", ORT_DISABLE_ALL="none")
    mod.SessionOptions = type(
        "SessionOptions",
        (),
        {"add_session_config_entry": lambda self, k, v: calls.append(("config", k, v)), "enable_profiling": False},
    )

    class OrtValue:
        def __init__(self, array, device, device_id):
            self.array, self.device, self.device_id = array.copy(), device, device_id

        @classmethod
        def ortvalue_from_numpy(cls, array, device, device_id):
            calls.append(("ortvalue_from_numpy", array.shape, device, device_id))
            return cls(array, device, device_id)

        def shape(self):
            return list(self.array.shape)

        def update_inplace(self, array):
            calls.append(("update_inplace", array.shape))
            self.array[...] = array

    class Binding:
        def __init__(self):
            self.inputs: dict = {}
            self.result: list = []

        def bind_output(self, name, device, device_id):
            calls.append(("bind_output", name, device, device_id))

        def bind_ortvalue_input(self, name, value):
            calls.append(("bind_ortvalue_input", name, value.device))
            self.inputs[name] = value

        def synchronize_outputs(self):
            calls.append(("synchronize_outputs",))

        def copy_outputs_to_cpu(self):
            calls.append(("copy_outputs_to_cpu",))
            return self.result

    class Node:
        def __init__(self, name, type_, shape):
            self.name, self.type, self.shape = name, type_, shape

    class Session:
        def __init__(self, source, sess_options, providers):
            calls.append(("InferenceSession", source, providers))
            self.options = sess_options
            names = [p if isinstance(p, str) else p[0] for p in providers]
            self._providers = list(in_use) if in_use is not None else [*names, CPU] if CPU not in names else names
            self._binding = Binding()

        def get_providers(self):
            return self._providers

        def get_inputs(self):
            return [Node("input", "tensor(float)", ["N", 3])]

        def get_outputs(self):
            return [Node("output", "tensor(float)", ["N", 3])]

        def io_binding(self):
            calls.append(("io_binding",))
            return self._binding

        def run(self, names, feed):
            calls.append(("run", names))
            return [feed["input"] * 2]

        def run_with_iobinding(self, binding):
            calls.append(("run_with_iobinding",))
            binding.result = [binding.inputs["input"].array * 2]

        def end_profiling(self):
            calls.append(("end_profiling", self.options.enable_profiling))
            if not self.options.enable_profiling:
                return ""
            path = Path(self.options.profile_file_prefix + "_1.json")
            path.write_text(json.dumps(_events(placement or {"Conv_0": CUDA})))
            return str(path)

    mod.OrtValue = OrtValue
    mod.InferenceSession = Session
    capi = types.ModuleType("onnxruntime.capi")
    state = types.ModuleType("onnxruntime.capi.onnxruntime_pybind11_state")
    state.Fail = type("Fail", (Exception,), {})
    capi.onnxruntime_pybind11_state = state
    mod.capi = capi
    return mod, {"onnxruntime.capi": capi, "onnxruntime.capi.onnxruntime_pybind11_state": state}


@pytest.fixture
def use_ort(monkeypatch, tmp_path):
    """Install a fake onnxruntime (``use_ort(**kw)`` → module) and a one-distribution environment."""

    def install(**kw):
        mod, subs = fake_ort(**kw)
        monkeypatch.setitem(sys.modules, "onnxruntime", mod)
        for name, sub in subs.items():
            monkeypatch.setitem(sys.modules, name, sub)
        monkeypatch.setattr(ort_runner, "installed_ort_distributions", lambda: ["onnxruntime-gpu"])
        return mod

    (tmp_path / "m.onnx").write_bytes(b"fake onnx")
    return install


def _calls(mod, kind):
    return [c for c in mod.calls if c[0] == kind]


def test_tensorrt_provider_options_from_cli(use_ort, tmp_path):
    mod = use_ort()
    options = OrtRunner.cli_options(
        {"device": "tensorrt", "threads": None, "trt_fp16": True, "trt_engine_cache": tmp_path / "cache"}
    )
    assert options["providers"] == ("tensorrt", "cuda")
    runner = OrtRunner(tmp_path / "m.onnx", **options)
    with runner:
        pass
    ((_, source, providers),) = _calls(mod, "InferenceSession")
    assert source == str(tmp_path / "m.onnx")
    cache = str(tmp_path / "cache")
    assert providers == [
        (
            TRT,
            {
                "device_id": "0",
                "trt_fp16_enable": "True",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
            },
        ),
        (CUDA, {"device_id": "0"}),
    ]
    assert (tmp_path / "cache").is_dir()
    assert runner.device == "cuda"
    assert runner.info()["provider_options"][TRT]["trt_fp16_enable"] == "True"


def test_cli_refuses_trt_flags_without_tensorrt_device():
    with pytest.raises(UserInputError, match="--device tensorrt only"):
        OrtRunner.cli_options({"device": "cuda", "trt_fp16": True})
    with pytest.raises(UserInputError, match="tensorrt provider"):
        OrtRunner("m.onnx", providers=("cuda",), trt_fp16=True)
    with pytest.raises(UserInputError, match="GPU provider"):
        OrtRunner("m.onnx", providers=("cpu",), io_binding=True)
    assert OrtRunner.cli_options({"device": "cpu"}) == {"providers": ("cpu",), "intra_op_threads": None, "allow_spinning": False}  # fmt: skip


def test_io_binding_binds_once_and_times_the_device_run(use_ort, tmp_path):
    mod = use_ort(placement={"Conv_0": CUDA, "Gemm_1": CUDA, "Shape_2": CPU})
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with OrtRunner(tmp_path / "m.onnx", providers=("cuda",), device_id=1) as runner:
        assert runner.device == "cuda:1"
        assert _calls(mod, "bind_output") == [("bind_output", "output", "cuda", 1)]
        out1 = runner.infer({"input": x})["output"]
        out2 = runner.infer({"input": x + 1})["output"]
        out3 = runner.infer({"input": np.ones((4, 3), np.float32)})["output"]  # new batch: new device buffer
    np.testing.assert_array_equal(out1, x * 2)
    np.testing.assert_array_equal(out2, (x + 1) * 2)
    assert out3.shape == (4, 3)
    assert _calls(mod, "ortvalue_from_numpy") == [
        ("ortvalue_from_numpy", (2, 3), "cuda", 1),
        ("ortvalue_from_numpy", (4, 3), "cuda", 1),
    ]
    assert _calls(mod, "bind_ortvalue_input") == [("bind_ortvalue_input", "input", "cuda")] * 2
    assert _calls(mod, "update_inplace") == [("update_inplace", (2, 3))]
    assert len(_calls(mod, "run_with_iobinding")) == 3
    assert not _calls(mod, "run")  # session.run (host arrays) is not used with I/O binding
    assert len(runner.gpu_times_s) == 3
    # placement: profiled on the first inference only, then profiling ends
    assert _calls(mod, "end_profiling") == [("end_profiling", True)]
    assert runner.placement[CUDA]["nodes"] == 2
    assert runner.placement[CUDA]["ops"] == {"Conv": 1, "Gemm": 1}
    assert runner.placement[CPU]["node_names"] == ["Shape_2"]
    assert runner.placement[CUDA]["kernel_us"] == 200


def test_cpu_runner_keeps_session_run_and_no_profiling(use_ort, tmp_path):
    mod = use_ort()
    with OrtRunner(tmp_path / "m.onnx") as runner:
        runner.infer({"input": np.zeros((1, 3), np.float32)})
    assert _calls(mod, "run") == [("run", ["output"])]
    assert not _calls(mod, "io_binding")
    assert not _calls(mod, "end_profiling")
    assert runner.gpu_times_s == []
    assert runner.placement is None
    assert "provider_options" not in runner.info()


def test_provider_fallback_at_load_is_refused(use_ort, tmp_path):
    use_ort(in_use=[CPU])
    runner = OrtRunner(tmp_path / "m.onnx", providers=("cuda",))
    with pytest.raises(RuntimeUnavailableError, match=r"could not initialise CUDAExecutionProvider.*fell back to CPU"):
        runner.activate()
    assert not runner.is_active


def test_every_node_on_cpu_is_refused_at_first_inference(use_ort, tmp_path):
    use_ort(placement={"Conv_0": CPU, "Gemm_1": CPU})
    runner = OrtRunner(tmp_path / "m.onnx", providers=("cuda",))
    with runner, pytest.raises(RuntimeUnavailableError, match="silent CPU fallback"):
        runner.infer({"input": np.zeros((1, 3), np.float32)})


def test_no_cpu_nodes_sets_the_session_entry(use_ort, tmp_path):
    mod = use_ort()
    options = OrtRunner.cli_options({"device": "cuda", "no_cpu_nodes": True, "no_io_binding": True})
    with OrtRunner(tmp_path / "m.onnx", **options) as runner:
        runner.infer({"input": np.zeros((1, 3), np.float32)})
    assert ("config", "session.disable_cpu_ep_fallback", "1") in mod.calls
    assert _calls(mod, "run")  # --no-io-binding: host arrays through session.run
    assert not _calls(mod, "io_binding")


def test_missing_gpu_provider_names_the_package(use_ort, tmp_path):
    use_ort(available=(CPU,))
    with pytest.raises(RuntimeUnavailableError, match="install onnxruntime-gpu"):
        OrtRunner(tmp_path / "m.onnx", providers=("cuda",)).activate()


def test_both_distributions_installed_is_reported(use_ort, monkeypatch, tmp_path):
    use_ort()
    both = ["onnxruntime", "onnxruntime-gpu"]
    problem = ort_install_problem(both)
    assert problem == (
        "onnxruntime and onnxruntime-gpu are all installed and overwrite each other's files; keep one: "
        "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`"
    )
    assert ort_install_problem(["onnxruntime"]) is None
    monkeypatch.setattr(ort_runner, "installed_ort_distributions", lambda: both)
    with pytest.raises(RuntimeUnavailableError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        OrtRunner(tmp_path / "m.onnx", providers=("cuda",)).activate()
    with pytest.warns(RuntimeWarning, match="overwrite each other"), OrtRunner(tmp_path / "m.onnx"):
        pass  # CPU keeps working, with a warning


def test_node_placement_and_lines():
    placement = node_placement(_events({"TensorrtExecutionProvider_TRTKernel_graph_0": TRT, "Shape_1": CPU}))
    assert placement == {
        TRT: {
            "nodes": 1,
            "ops": {"TensorrtExecutionProvider": 1},
            "kernel_us": 100,
            "node_names": ["TensorrtExecutionProvider_TRTKernel_graph_0"],
        },
        CPU: {"nodes": 1, "ops": {"Shape": 1}, "kernel_us": 100, "node_names": ["Shape_1"]},
    }
    assert placement_lines(placement) == [
        f"{TRT}: 1 node(s) (TensorrtExecutionProvider 1), 0.100 ms",
        f"{CPU}: 1 node(s) (Shape 1), 0.100 ms",
    ]


def test_real_cpu_profiling_gives_placement(tiny_onnx):
    """The profiling parser on a real ONNX Runtime trace (CPU provider, placement switched on)."""
    with OrtRunner(tiny_onnx.path, placement=True) as runner:
        runner.infer({"input": np.zeros((1, 3, 8, 8), np.float32)})
        runner.infer({"input": np.zeros((1, 3, 8, 8), np.float32)})
    assert list(runner.placement) == [CPU]
    assert runner.placement[CPU]["nodes"] >= 3
    assert "Gemm" in runner.placement[CPU]["ops"]
