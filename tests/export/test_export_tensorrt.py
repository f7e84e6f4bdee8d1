"""export.tensorrt on CPU: version dispatch, sidecars, FP16 pass, calibrator batching (fake tensorrt).

The fake
``tensorrt`` module that exposes the 10.x or 11.x surface and records every call. Nothing here builds a
real engine; the ``trt``/``gpu`` tests at the end do, where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import tensorrt as ettrt
from lowrank_core.errors import ExportError, RuntimeUnavailableError, UserInputError

GPU = {"name": "NVIDIA Fake GPU", "compute_capability": "8.9", "source": "test"}


# A small conv net as ONNX (dynamic batch "N") ----------------------------------------------------------


def _tiny_onnx(path: Path, *, qdq: bool = False, batch: int | str = "N") -> Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(8).astype(np.float32) * 0.1
    fc = rng.standard_normal((4, 8)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(fc, "fc")]
    nodes = []
    conv_in = "input"
    if qdq:
        inits += [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z")]
        nodes += [
            helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        ]
        conv_in = "dq"
    nodes += [
        helper.make_node("Conv", [conv_in, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# The fake tensorrt module -------------------------------------------------------------------------------


def _layer_info(dtype_text: str) -> str:
    layers = [
        {"Name": "conv", "Outputs": [{"Name": "c", "Format/Datatype": dtype_text}]},
        {"Name": "gemm", "Outputs": [{"Name": "output", "Format/Datatype": "Row major linear FP32"}]},
    ]
    return json.dumps({"Layers": layers, "Bindings": ["input", "output"]})


def fake_trt(version: str, *, input_shape=(-1, 3, 8, 8), layer_dtype: str | None = None) -> types.ModuleType:
    """A module with the narrow TensorRT surface export.tensorrt uses; ``mod.calls`` records the calls."""
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    calls: list[tuple] = []
    mod.calls = calls
    gen11 = version.startswith("11")
    if layer_dtype is None:
        layer_dtype = "Row major linear FP32"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            calls.append(("Logger", severity))

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor("input", input_shape)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def __init__(self):
            object.__setattr__(self, "_cache", None)

        def __setattr__(self, key, value):
            calls.append(("config." + key, value))
            object.__setattr__(self, key, value)

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile", profile.shapes))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            object.__setattr__(self, "_cache", cache)

        def get_timing_cache(self):
            return self._cache

    if not gen11:

        def set_calibration_profile(self, profile):
            calls.append(("set_calibration_profile", profile.shapes))

        Config.set_calibration_profile = set_calibration_profile

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse(self, data):
            calls.append(("parse", bytes(data)))
            return True

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return True

        def get_error(self, i):
            return "none"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return b"PLAN-" + version.encode()

    class Inspector:
        def get_engine_information(self, fmt):
            return _layer_info(layer_dtype)

    class Engine:
        num_io_tensors = 2

        def create_engine_inspector(self):
            return Inspector()

        def get_tensor_name(self, i):
            return ("input", "output")[i]

        def get_tensor_dtype(self, name):
            return "DataType.FLOAT"

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine()

    mod.Logger, mod.Builder, mod.OnnxParser, mod.Runtime = Logger, Builder, Parser, Runtime
    mod.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    mod.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    mod.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    if gen11:
        mod.BuilderFlag = types.SimpleNamespace(TF32="TF32")  # FP16/INT8 removed in 11.0
    else:
        mod.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")

        class IInt8EntropyCalibrator2:
            def __init__(self):
                calls.append(("calibrator_base_init", "entropy"))

        class IInt8MinMaxCalibrator:
            def __init__(self):
                calls.append(("calibrator_base_init", "minmax"))

        mod.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
        mod.IInt8MinMaxCalibrator = IInt8MinMaxCalibrator
    return mod


@pytest.fixture
def use_trt(monkeypatch):
    """Install a fake tensorrt of the given version and a fake GPU identity; returns the module."""

    def install(version: str, **kw) -> types.ModuleType:
        mod = fake_trt(version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        monkeypatch.setattr("lowrank_core.device.device_identity", lambda index=0: dict(GPU))
        return mod

    return install


def _names(calls, kind):
    return [c for c in calls if c[0] == kind]


# Import and version dispatch ----------------------------------------------------------------------------


def test_missing_tensorrt_names_the_container(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(RuntimeUnavailableError, match=r"TensorRT is not installed: .*docker/Dockerfile\.x86"):
        ettrt.require_tensorrt()


def test_stub_only_namespace_package_is_not_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # no __version__
    with pytest.raises(RuntimeUnavailableError, match="not the TensorRT library"):
        ettrt.require_tensorrt()


@pytest.mark.parametrize(("version", "gen"), [("10.3.0", 10), ("10.13.0.35", 10), ("11.1.0", 11), ("12.0", 11)])
def test_api_generation(version, gen):
    assert ettrt.api_generation(version) == gen


def test_api_generation_rejects_old():
    with pytest.raises(RuntimeUnavailableError, match="too old"):
        ettrt.api_generation("8.6.1")


def test_fp16_on_10_sets_builder_flag_and_parses_the_file(tmp_path, use_trt):
    trt = use_trt("10.3.0", layer_dtype="Channel major FP16 format where channel % 8 == 0")
    path = _tiny_onnx(tmp_path / "m.onnx")
    built = ettrt.engine_from_onnx(path, precision="fp16", batch=(1, 4, 8), workspace_mib=256, opt_level=4)
    assert ("set_flag", "FP16") in trt.calls
    assert _names(trt.calls, "parse_from_file") == [("parse_from_file", str(path))]
    assert not _names(trt.calls, "parse")
    assert _names(trt.calls, "create_network") == [("create_network", 0)]
    assert ("set_memory_pool_limit", "WORKSPACE", 256 << 20) in trt.calls
    assert ("config.builder_optimization_level", 4) in trt.calls
    assert ("config.profiling_verbosity", "DETAILED") in trt.calls
    assert ("set_shape", "input", (1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)) in trt.calls
    meta = built.metadata
    assert meta["api_generation"] == 10
    assert meta["build_flags"] == ["FP16"]
    assert meta["profile"] == {"input": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}
    assert meta["precision_check"]["ok"] is True
    assert meta["precision_check"]["layer_precisions"] == {"fp32": 1, "fp16": 1, "int8": 0, "other": 0}
    assert meta["engine_bytes"] == len(built.plan) == len(b"PLAN-10.3.0")
    assert meta["gpu_name"] == GPU["name"]
    assert meta["compute_capability"] == "8.9"
    assert len(meta["onnx_sha256"]) == 64


def test_fp16_on_11_converts_the_onnx_and_sets_no_flag(tmp_path, use_trt):
    trt = use_trt("11.1.0", layer_dtype="Half")
    path = _tiny_onnx(tmp_path / "m.onnx")
    built = ettrt.EngineFromOnnx(path, precision="fp16")()
    assert not _names(trt.calls, "set_flag")
    assert not _names(trt.calls, "parse_from_file")
    (parsed,) = _names(trt.calls, "parse")
    half = onnx.ModelProto.FromString(parsed[1])
    types_ = {init.name: init.data_type for init in half.graph.initializer}
    assert types_ == {"w": TensorProto.FLOAT16, "b": TensorProto.FLOAT16, "fc": TensorProto.FLOAT16}
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert next(n.op_type for n in half.graph.node) == "Cast"
    assert half.graph.node[-1].op_type == "Cast"
    assert built.metadata["api_generation"] == 11
    assert built.metadata["build_flags"] == []


def test_fp16_request_that_builds_fp32_is_refused(tmp_path, use_trt):
    use_trt("11.1.0", layer_dtype="Row major linear FP32")  # rf-detr#1453
    path = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="asked for fp16"):
        ettrt.engine_from_onnx(path, precision="fp16")


def test_int8_on_11_without_qdq_names_modelopt(tmp_path, use_trt):
    trt = use_trt("11.1.0")
    path = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(UserInputError, match=r"python -m modelopt\.onnx\.quantization"):
        ettrt.engine_from_onnx(path, precision="int8")
    assert not _names(trt.calls, "build")


def test_int8_on_11_with_qdq_builds_strongly_typed(tmp_path, use_trt):
    trt = use_trt("11.1.0", layer_dtype="Four wide channel vectorized row major Int8 format")
    path = _tiny_onnx(tmp_path / "q.onnx", qdq=True)
    built = ettrt.engine_from_onnx(path, precision="int8")
    assert not _names(trt.calls, "set_flag")
    assert built.metadata["precision_check"]["layer_precisions"]["int8"] == 1


def test_int8_on_10_with_calibrator_sets_flag_and_calibration_profile(tmp_path, use_trt):
    trt = use_trt("10.3.0", layer_dtype="Int8")
    path = _tiny_onnx(tmp_path / "m.onnx")
    data = [np.ones((3, 3, 8, 8), np.float32)] * 3
    calib = ettrt.make_calibrator(data, batch_size=4, device_copy=lambda a: 1234)
    calib.core.get_batch(["input"])  # stands in for TensorRT pulling a batch during the build
    ettrt.engine_from_onnx(path, precision="int8", batch=(1, 2, 8), calibrator=calib)
    assert ("set_flag", "INT8") in trt.calls
    assert ("config.int8_calibrator", calib) in trt.calls
    assert ("set_calibration_profile", {"input": ((4, 3, 8, 8),) * 3}) in trt.calls


def test_int8_on_10_without_calibrator_or_qdq_is_refused(tmp_path, use_trt):
    use_trt("10.3.0")
    with pytest.raises(UserInputError, match="calibrator"):
        ettrt.engine_from_onnx(_tiny_onnx(tmp_path / "m.onnx"), precision="int8")


def test_fp32_on_both_generations_sets_no_precision_flag(tmp_path, use_trt):
    for version in ("10.3.0", "11.1.0"):
        trt = use_trt(version)
        built = ettrt.engine_from_onnx(_tiny_onnx(tmp_path / "m.onnx"), precision="fp32")
        assert not _names(trt.calls, "set_flag")
        assert built.metadata["precision"] == "fp32"
        assert built.metadata["precision_check"]["ok"] is True


def test_fixed_batch_onnx_rejects_dynamic_profile(tmp_path, use_trt):
    use_trt("10.3.0", input_shape=(1, 3, 8, 8))
    path = _tiny_onnx(tmp_path / "m.onnx", batch=1)
    with pytest.raises(UserInputError, match="--dynamic-batch"):
        ettrt.engine_from_onnx(path, batch=(1, 4, 8))
    trt = use_trt("10.3.0", input_shape=(1, 3, 8, 8))
    ettrt.engine_from_onnx(path)  # default profile on a fixed-batch model: no profile added
    assert not _names(trt.calls, "add_optimization_profile")


def test_timing_cache_round_trip(tmp_path, use_trt):
    path = _tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    trt = use_trt("10.3.0")
    ettrt.engine_from_onnx(path, timing_cache=cache)
    assert _names(trt.calls, "create_timing_cache") == [("create_timing_cache", b"")]
    assert cache.read_bytes() == b"+tuned"
    trt = use_trt("10.3.0")
    ettrt.engine_from_onnx(path, timing_cache=cache)
    assert _names(trt.calls, "create_timing_cache") == [("create_timing_cache", b"+tuned")]
    assert ("set_timing_cache", False) in trt.calls
    assert cache.read_bytes() == b"+tuned+tuned"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"precision": "fp8"}, "unknown precision"), ({"opt_level": 6}, "0..5"), ({"batch": (4, 2, 8)}, "min <= opt")],
)
def test_loader_validates_arguments(tmp_path, kwargs, match):
    with pytest.raises(UserInputError, match=match):
        ettrt.EngineFromOnnx(tmp_path / "m.onnx", **kwargs)


# Sidecar -------------------------------------------------------------------------------------------------


def test_save_and_load_engine_checks_the_sidecar(tmp_path, use_trt):
    use_trt("10.3.0", layer_dtype="Half")
    built = ettrt.engine_from_onnx(_tiny_onnx(tmp_path / "m.onnx"), precision="fp16")
    plan_path = ettrt.save_engine(built, tmp_path / "model.plan")
    side = json.loads((tmp_path / "model.plan.json").read_text())
    for key in ("tensorrt_version", "api_generation", "gpu_name", "compute_capability", "precision", "profile",
                "build_flags", "workspace_mib", "opt_level", "onnx_sha256", "engine_bytes", "built_utc"):  # fmt: skip
        assert key in side
    assert side["engine_bytes"] == plan_path.stat().st_size == len(built.plan)
    assert ettrt.load_engine(plan_path) == built.plan

    use_trt("10.13.0.35")
    with pytest.raises(
        RuntimeUnavailableError, match=r"built with TensorRT 10\.3\.0 but TensorRT 10\.13\.0\.35.*rebuild"
    ):
        ettrt.load_engine(plan_path)


def test_check_sidecar_refuses_other_gpu():
    meta = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    ettrt.check_sidecar(meta, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(RuntimeUnavailableError, match=r"built on Orin \(compute capability 8\.7\).*H100.*rebuild"):
        ettrt.check_sidecar(meta, tensorrt_version="10.3.0", gpu_name="H100", compute_capability="9.0")


def test_load_engine_missing_or_wrong_sidecar(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"12345")
    with pytest.raises(UserInputError, match=r"model\.plan\.json is missing"):
        ettrt.load_engine(plan)
    assert ettrt.load_engine(plan, check=False) == b"12345"
    (tmp_path / "model.plan.json").write_text(json.dumps({"engine_bytes": 99}))
    with pytest.raises(UserInputError, match="99-byte engine"):
        ettrt.load_engine(plan)


# FP16 pass numerics ---------------------------------------------------------------------------------------


def test_fp16_conversion_matches_fp32_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    path = _tiny_onnx(tmp_path / "m.onnx")
    half = ettrt.convert_onnx_to_fp16(onnx.load(str(path)))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    out = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert out.dtype == np.float32
    assert out.shape == ref.shape == (2, 4)
    # FP16 tolerance: 10-bit mantissa → ~1e-3 relative per value; allow 1e-2 abs + 1e-2 rel over the net.
    np.testing.assert_allclose(out, ref, atol=1e-2, rtol=1e-2)
    assert float(np.abs(out - ref).max()) > 0  # the weights really were rounded


def test_fp16_conversion_clips_out_of_range_and_detects_qdq(tmp_path):
    model = onnx.load(str(_tiny_onnx(tmp_path / "m.onnx")))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(8, 1e6, np.float32), "b"))
    half = ettrt.convert_onnx_to_fp16(model)
    b = numpy_helper.to_array(next(i for i in half.graph.initializer if i.name == "b"))
    assert b.dtype == np.float16
    assert float(b.max()) == 65504.0
    assert not ettrt.has_qdq(model)
    assert ettrt.has_qdq(onnx.load(str(_tiny_onnx(tmp_path / "q.onnx", qdq=True))))


# Calibrator batching ---------------------------------------------------------------------------------------


def test_batcher_rebatches_and_drops_the_partial_tail():
    items = [np.full((3, 2, 4, 4), i, np.float32) for i in range(3)] + [np.full((2, 4, 4), 9, np.float64)]
    batcher = ettrt.CalibrationBatcher(items, batch_size=4)  # 10 samples → 2 batches, 2 dropped
    b1, b2 = batcher.next_batch(), batcher.next_batch()
    assert b1.shape == b2.shape == (4, 2, 4, 4)
    assert b1.dtype == np.float32
    assert [float(v) for v in b1[:, 0, 0, 0]] == [0, 0, 0, 1]
    assert [float(v) for v in b2[:, 0, 0, 0]] == [1, 1, 2, 2]
    assert batcher.next_batch() is None
    assert batcher.next_batch() is None
    assert (batcher.batches_served, batcher.samples_served, batcher.samples_dropped) == (2, 8, 2)


def test_batcher_rejects_mixed_shapes_and_bad_size():
    with pytest.raises(UserInputError, match=">= 1"):
        ettrt.CalibrationBatcher([], batch_size=0)
    batcher = ettrt.CalibrationBatcher([np.zeros((1, 3, 4, 4)), np.zeros((1, 3, 5, 5))], batch_size=2)
    with pytest.raises(UserInputError, match="sample shape"):
        batcher.next_batch()


def test_calibrator_feeds_pointers_and_round_trips_the_cache(tmp_path, use_trt):
    trt = use_trt("10.3.0")
    copied: list[np.ndarray] = []

    def device_copy(batch):
        copied.append(batch.copy())
        return 0xABC0 + len(copied)

    cache = tmp_path / "calib.cache"
    data = (np.full((2, 3, 4, 4), i, np.float32) for i in range(3))  # a generator: 6 samples
    calib = ettrt.make_calibrator(data, batch_size=4, algorithm="minmax", cache_file=cache, device_copy=device_copy)
    assert isinstance(calib, trt.IInt8MinMaxCalibrator)
    assert ("calibrator_base_init", "minmax") in trt.calls
    assert calib.get_batch_size() == 4
    assert calib.read_calibration_cache() is None
    assert calib.get_batch(["input"]) == [0xABC1]
    assert calib.get_batch(["input"]) is None  # 2 samples left: dropped
    assert [float(v) for v in copied[0][:, 0, 0, 0]] == [0, 0, 1, 1]
    calib.write_calibration_cache(b"TRT-10 calib table")
    assert cache.read_bytes() == b"TRT-10 calib table"
    again = ettrt.make_calibrator([], batch_size=4, cache_file=cache, device_copy=device_copy)
    assert isinstance(again, trt.IInt8EntropyCalibrator2)
    assert again.read_calibration_cache() == b"TRT-10 calib table"


def test_calibrator_refused_on_11(use_trt):
    use_trt("11.1.0")
    with pytest.raises(UserInputError, match=r"removed in 11\.0"):
        ettrt.make_calibrator([], batch_size=1)


def test_layer_precisions_counts():
    counts = ettrt.layer_precisions(_layer_info("Half"))
    assert counts == {"fp32": 1, "fp16": 1, "int8": 0, "other": 0}
    assert ettrt.check_precision(counts, "fp16") is True
    assert ettrt.check_precision({"fp32": 2, "fp16": 0, "int8": 0, "other": 0}, "int8") is False
    assert ettrt.check_precision({"fp32": 0, "fp16": 0, "int8": 0, "other": 0}, "fp16") is None


# Real TensorRT (skipped without it) ---------------------------------------------------------------------------


def _real_tensorrt() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "__version__")


@pytest.mark.trt
@pytest.mark.gpu
def test_real_fp16_engine_build_and_sidecar(tmp_path):
    if not _real_tensorrt():
        pytest.skip("only TensorRT type stubs are importable")
    path = _tiny_onnx(tmp_path / "m.onnx")
    built = ettrt.engine_from_onnx(path, precision="fp16", batch=(1, 2, 4))
    plan = ettrt.save_engine(built, tmp_path / "model.plan")
    assert built.metadata["precision_check"]["ok"] is True
    assert ettrt.load_engine(plan) == built.plan


# 2:4 sparsity: SPARSE_WEIGHTS and what TensorRT picked ------------------------------------------------------


def _sparse_onnx(path: Path) -> Path:
    """The tiny net with its conv weight pruned to 2:4 along the input channels (8 → groups of 4)."""
    model = onnx.load(str(_tiny_onnx(path.with_name("dense_" + path.name))))
    w = np.random.default_rng(3).standard_normal((8, 8, 3, 3)).astype(np.float32)
    w[:, [1, 3, 4, 6]] = 0  # two zeros in each group of four input channels
    conv = model.graph.node[0]
    inits = [i for i in model.graph.initializer if i.name != "w"] + [numpy_helper.from_array(w, "w")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    first = helper.make_node("Conv", ["input", "w0"], ["pre"], pads=[1, 1, 1, 1])
    model.graph.initializer.append(numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w0"))
    conv.input[0] = "pre"
    nodes = [first, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _with_sparse_surface(trt, *, log_lines=(), tactics=None):
    """Give the fake SPARSE_WEIGHTS, an ILogger the builder logs to, and tactic names in the inspector."""
    trt.BuilderFlag.SPARSE_WEIGHTS = "SPARSE_WEIGHTS"

    class ILogger:
        Severity = types.SimpleNamespace(ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            trt.calls.append(("ILogger",))

    trt.ILogger = ILogger
    builder_cls = trt.Builder

    class Builder(builder_cls):
        def __init__(self, logger):
            super().__init__(logger)
            self.logger = logger

        def build_serialized_network(self, network, config):
            for line in log_lines:
                self.logger.log(ILogger.Severity.INFO, line)
            return super().build_serialized_network(network, config)

    trt.Builder = Builder
    if tactics is not None:
        info = json.dumps({"Layers": [{"Name": n, "TacticName": t, "Outputs": []} for n, t in tactics.items()]})
        inspector = trt.Runtime(None).deserialize_cuda_engine(b"").create_engine_inspector()
        type(inspector).get_engine_information = lambda self, fmt: info
    return trt


def test_2to4_detection():
    w = np.ones((4, 8, 3, 3), np.float32)
    assert not ettrt.is_2to4(w, 1)  # dense
    w[:, [0, 1, 4, 5]] = 0
    assert ettrt.is_2to4(w, 1)
    assert not ettrt.is_2to4(w, 0)  # along output channels it is dense
    assert not ettrt.is_2to4(np.zeros((4, 8)), 1)  # all zero: nothing to run sparse
    assert not ettrt.is_2to4(np.ones((4, 6)), 1)  # length not a multiple of 4


def test_sparse_weights_flag_set_for_2to4_weights(tmp_path, use_trt):
    log = [
        "[TRT] (Sparsity) Layers eligible for sparse math: /conv1/Conv, /conv2/Conv",
        "[TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: /conv2/Conv",
        "[TRT] some other info line",
    ]
    trt = _with_sparse_surface(
        use_trt("10.3.0"), log_lines=log, tactics={"/conv1/Conv": "sm80_xmma_fprop_implicit_gemm", "/conv2/Conv": "sm80_xmma_fprop_sparse_conv_f32"}
    )  # fmt: skip
    path = _sparse_onnx(tmp_path / "s.onnx")
    assert ettrt.sparse_weight_tensors(onnx.load(str(path))) == ["w"]
    built = ettrt.engine_from_onnx(path)
    assert ("set_flag", "SPARSE_WEIGHTS") in trt.calls
    assert ("ILogger",) in trt.calls  # the capturing logger replaced trt.Logger(WARNING)
    sparsity = built.metadata["sparsity"]
    assert sparsity["tensors_2to4"] == ["w"]
    assert sparsity["sparse_weights_flag"] is True
    assert sparsity["eligible_layers"] == ["/conv1/Conv", "/conv2/Conv"]
    assert sparsity["picked_layers"] == ["/conv2/Conv"]
    assert sparsity["sparse_tactic_layers"] == ["/conv2/Conv"]
    assert "SPARSE_WEIGHTS" in built.metadata["build_flags"]


def test_dense_weights_leave_the_flag_off_unless_forced(tmp_path, use_trt):
    trt = _with_sparse_surface(use_trt("11.1.0"))
    built = ettrt.engine_from_onnx(_tiny_onnx(tmp_path / "m.onnx"))
    assert not _names(trt.calls, "set_flag")
    assert built.metadata["sparsity"]["sparse_weights_flag"] is False
    assert built.metadata["sparsity"]["sparse_tactic_layers"] is None
    trt = _with_sparse_surface(use_trt("11.1.0"))
    built = ettrt.engine_from_onnx(_tiny_onnx(tmp_path / "m.onnx"), sparse_weights=True)
    assert _names(trt.calls, "set_flag") == [("set_flag", "SPARSE_WEIGHTS")]  # SPARSE_WEIGHTS exists in 11.x too
    assert built.metadata["sparsity"]["picked_layers"] is None  # no (Sparsity) lines: unknown, not "none"


def test_parse_sparsity_log_without_lines():
    assert ettrt.parse_sparsity_log([]) == {"eligible_layers": None, "picked_layers": None}
    assert ettrt.sparse_tactic_layers(_layer_info("Half")) is None  # no TacticName: unknown


# Engine vs ONNX Runtime parity --------------------------------------------------------------------------------


class _EngineLike:
    """A runner standing in for TrtRunner: the ONNX run in ONNX Runtime, plus an error of given size."""

    def __init__(self, path, error):
        from runtime.ort_runner import OrtRunner

        self.inner, self.error, self.feeds = OrtRunner(path, providers=("cpu",)), error, []

    def __enter__(self):
        self.inner.activate()
        return self

    def __exit__(self, *exc):
        self.inner.deactivate()

    def get_input_metadata(self):
        return self.inner.get_input_metadata()

    def infer(self, feed):
        self.feeds.append(feed)
        out = self.inner.infer(feed)
        return {k: (v + self.error).astype(np.float16) for k, v in out.items()}


@pytest.mark.parametrize(("error", "passed"), [(2e-3, True), (5e-2, False)])
def test_engine_parity_fp16_tolerances(tmp_path, error, passed):
    path = _tiny_onnx(tmp_path / "m.onnx")
    engine = _EngineLike(path, error)
    parity = ettrt.engine_parity(tmp_path / "model.plan", path, precision="fp16", batch=4, seed=7, engine_runner=engine)
    assert (parity["atol"], parity["rtol"]) == ettrt.ENGINE_TOLERANCES["fp16"] == (1e-2, 1e-2)
    assert parity["passed"] is passed
    assert parity["batch"] == 4
    assert parity["seed"] == 7
    assert engine.feeds[0]["input"].shape == (4, 3, 8, 8)
    assert parity["max_abs"] == pytest.approx(error, abs=1e-3)  # float16 rounding of the outputs on top
    assert parity["outputs"]["output"]["shape"] == [4, 4]
    assert parity["reference"].startswith("onnxruntime CPUExecutionProvider")


def test_engine_parity_recorded_in_sidecar(tmp_path, use_trt):
    use_trt("10.3.0", layer_dtype="Half")
    path = _tiny_onnx(tmp_path / "m.onnx")
    plan = ettrt.save_engine(ettrt.engine_from_onnx(path, precision="fp16"), tmp_path / "model.plan")
    parity = ettrt.engine_parity(plan, path, precision="fp16", engine_runner=_EngineLike(path, 0.0))
    assert parity["passed"] is True
    assert parity["max_abs"] < 1e-2
    ettrt.record_parity(plan, parity)
    side = json.loads((tmp_path / "model.plan.json").read_text())
    assert side["parity"]["passed"] is True
    assert side["parity"]["precision"] == "fp16"
    assert ettrt.load_engine(plan) == plan.read_bytes()  # the sidecar still matches the plan
    from runtime.gpu import engine_markdown, engine_records

    records = engine_records(tmp_path)
    assert list(records) == ["compressed"]
    assert records["compressed"]["parity"]["passed"] is True
    (line,) = engine_markdown(records)
    assert "parity vs ONNX Runtime PASS" in line
    assert "fp16, TensorRT 10.3.0 on NVIDIA Fake GPU" in line


def test_engine_parity_rejects_unknown_precision(tmp_path):
    with pytest.raises(UserInputError, match="unknown precision"):
        ettrt.engine_parity(tmp_path / "m.plan", tmp_path / "m.onnx", precision="fp8")


# TensorRT 11 API surface (names of the 11.x path against a bindings wheel) -----------------------------------


def test_surface_check_on_a_synthetic_wheel(tmp_path, capsys):
    import zipfile

    from export.tensorrt import surface

    names = [n for n in surface.TRT11_NAMES if n != "INPUT"] + ["CONDITIONAL_INPUT"]  # "INPUT": a merged tail
    blob = b"\x00".join(n.encode() for n in names) + b"\x00Tensor is input.\x00"
    wheel = tmp_path / "tensorrt_cu12_bindings-11.9.0-cp311-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tensorrt_bindings/tensorrt.so", blob)
        archive.writestr("tensorrt_bindings/__init__.py", "def nptype(trt_type):\n    pass\n")
    ids = surface.wheel_identifiers(wheel)
    assert surface.missing_names(ids) == []
    assert surface.missing_names(ids, surface.TRT10_ONLY) == list(surface.TRT10_ONLY)
    assert surface.main([str(wheel)]) == 0
    assert "51 names of the 11.x path: ok" in capsys.readouterr().out.replace(str(len(surface.TRT11_NAMES)), "51")
    broken = tmp_path / "tensorrt_cu12_bindings-12.0.0-cp311-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("tensorrt_bindings/tensorrt.so", blob.replace(b"execute_async_v3", b"execute_async_v4"))
    assert surface.main([str(broken)]) == 1
    assert "MISSING execute_async_v3" in capsys.readouterr().out


def test_engine_cli_records_parity_and_fails_on_mismatch(tmp_path, use_trt, monkeypatch):
    import export.tensorrt
    from export.__main__ import main
    from lowrank_core.errors import ParityError

    use_trt("10.3.0", layer_dtype="Half")
    run = tmp_path / "run"
    run.mkdir()
    _tiny_onnx(run / "model.onnx")
    seen = []
    real_parity = ettrt.engine_parity

    def fake_parity(path, onnx_path, *, precision, batch, seed, atol, rtol, error=0.0):
        seen.append((Path(path).name, Path(onnx_path).name, precision, batch, seed))
        engine = _EngineLike(onnx_path, error)  # the engine's role, played by ONNX Runtime plus an error
        return real_parity(path, onnx_path, precision=precision, batch=batch, seed=seed, engine_runner=engine)

    monkeypatch.setattr(export.tensorrt, "engine_parity", fake_parity)
    assert main(["engine", "--run-dir", str(run), "--precision", "fp16", "--opt-batch", "2", "--parity-seed", "5"]) == 0
    assert seen == [("model.plan", "model.onnx", "fp16", 2, 5)]
    side = json.loads((run / "model.plan.json").read_text())
    assert side["parity"]["passed"] is True
    assert side["parity"]["batch"] == 2
    assert side["sparsity"]["sparse_weights_flag"] is False

    monkeypatch.setattr(
        export.tensorrt, "engine_parity", lambda *a, **k: fake_parity(*a, **{**k, "error": 0.5})
    )  # fmt: skip
    use_trt("10.3.0", layer_dtype="Half")
    with pytest.raises(ParityError, match=r"TensorRT vs ONNX Runtime parity failed for model\.plan"):
        main(["engine", "--run-dir", str(run), "--precision", "fp16"])
    assert json.loads((run / "model.plan.json").read_text())["parity"]["passed"] is False
