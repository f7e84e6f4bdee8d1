"""Runner contract: context manager, feed validation, registry."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lowrank_core.errors import UserInputError
from runtime import base
from runtime.base import Runner, TensorMeta, available_backends, register_runner, runner_class

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_context_manager_activates_and_deactivates(fake_runner_cls, x_feed):
    runner = fake_runner_cls("a")
    assert not runner.is_active
    with runner as active:
        assert active is runner
        assert runner.is_active
        out = runner.infer(x_feed)
        np.testing.assert_array_equal(out["y"], x_feed["x"] * 2)
        assert runner.last_inference_time_s is not None
        assert runner.last_inference_time_s >= 0.0
    assert not runner.is_active
    assert (runner.activations, runner.deactivations) == (1, 1)


def test_deactivate_runs_after_an_error(fake_runner_cls):
    runner = fake_runner_cls("a")
    with pytest.raises(ValueError, match="boom"), runner:
        raise ValueError("boom")
    assert runner.deactivations == 1
    assert not runner.is_active


def test_activate_twice_is_a_no_op(fake_runner_cls):
    runner = fake_runner_cls("a")
    runner.activate()
    runner.activate()
    runner.deactivate()
    runner.deactivate()
    assert (runner.activations, runner.deactivations) == (1, 1)


def test_infer_needs_an_active_runner(fake_runner_cls, x_feed):
    with pytest.raises(RuntimeError, match="active"):
        fake_runner_cls("a").infer(x_feed)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({}, r"missing input\(s\) \['x'\]"),
        ({"x": np.zeros((2, 3), np.float32), "z": np.zeros(1, np.float32)}, r"unexpected input\(s\) \['z'\]"),
        ({"x": np.zeros((2, 3), np.float64)}, "dtype float64, expected float32"),
        ({"x": np.zeros((2, 3, 1), np.float32)}, r"\(rank 3\), expected rank 2"),
        ({"x": np.zeros((2, 4), np.float32)}, "axis 1 is 4, expected 3"),
        ({"x": [[1.0, 2.0, 3.0]]}, "must be a numpy array"),
    ],
)
def test_infer_rejects_bad_feeds(fake_runner_cls, feed, message):
    with fake_runner_cls("a") as runner, pytest.raises(UserInputError, match=message) as info:
        runner.infer(feed)
    assert "float32[N,3]" in str(info.value)  # the message shows what the model expects
    assert "\n" not in str(info.value)
    assert runner.log.calls == []  # infer_impl never ran


def test_infer_reports_every_problem_at_once(fake_runner_cls):
    with fake_runner_cls("a") as runner, pytest.raises(UserInputError) as info:
        runner.infer({"z": np.zeros(1, np.float32)})
    assert "missing" in str(info.value)
    assert "unexpected" in str(info.value)


def test_feed_must_be_a_mapping(fake_runner_cls):
    with fake_runner_cls("a") as runner, pytest.raises(UserInputError, match="must map input names"):
        runner.infer(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_dims_accept_any_size(fake_runner_cls, batch):
    with fake_runner_cls("a", shape=(None, 3)) as runner:
        out = runner.infer({"x": np.ones((batch, 3), np.float32)})
    assert out["y"].shape == (batch, 3)


def test_unknown_rank_accepts_any_shape(fake_runner_cls):
    with fake_runner_cls("a", shape=None) as runner:
        out = runner.infer({"x": np.ones((2, 2, 2), np.float32)})
    assert out["y"].shape == (2, 2, 2)


def test_tensor_meta():
    meta = TensorMeta(np.dtype("float32"), ("N", 3, None, -1))
    assert [meta.is_dynamic(i) for i in range(4)] == [True, False, True, True]
    assert meta.describe() == "float32[N,3,?,-1]"


def test_memory_reports_rss(fake_runner_cls):
    mem = fake_runner_cls("a").memory()
    assert mem["rss_bytes"] > 1_000_000
    assert mem["fake_device_bytes"] == 1234


def test_info_names_backend_and_device(fake_runner_cls):
    assert fake_runner_cls("a").info() == {"name": "a", "backend": "fake", "device": "cpu"}


# Registry --------------------------------------------------------------------------------------------


def test_builtin_backends_registered():
    names = available_backends()
    assert names == tuple(sorted(names))
    assert {"ort", "torch"} <= set(names)
    assert "trt" in names  # registered by runtime/trt_runner.py; tensorrt itself is imported lazily
    from runtime.ort_runner import OrtRunner
    from runtime.torch_runner import TorchRunner

    assert runner_class("ort") is OrtRunner
    assert runner_class("torch") is TorchRunner
    assert OrtRunner.backend == "ort"
    assert TorchRunner.backend == "torch"


def test_unknown_backend_lists_known_names():
    with pytest.raises(UserInputError, match="unknown backend 'tensorflow'") as info:
        runner_class("tensorflow")
    assert "ort" in str(info.value)
    assert "torch" in str(info.value)


def test_register_new_runner(isolated_registry, fake_runner_cls):
    @register_runner("fake2")
    class Fake2(fake_runner_cls):
        pass

    assert runner_class("fake2") is Fake2
    assert Fake2.backend == "fake2"
    assert "fake2" in available_backends()


def test_register_duplicate_name_raises(isolated_registry, fake_runner_cls):
    class Other(fake_runner_cls):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_runner("ort")(Other)
    assert isolated_registry["ort"].__name__ == "OrtRunner"


def test_runner_modules_are_discovered_by_file_name(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("raise RuntimeError('only *_runner modules are imported')\n")
    (pkg / "demo_runner.py").write_text(
        textwrap.dedent(
            """
            from runtime.base import register_runner
            from tests_fake_base import Base

            @register_runner("demo")
            class DemoRunner(Base):
                pass
            """
        )
    )
    (tmp_path / "tests_fake_base.py").write_text("from runtime.base import Runner as Base\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_RUNNERS", dict(base._RUNNERS))
    monkeypatch.setattr(base, "_DISCOVERED", set())
    base._discover_runner_modules("plugpkg")
    assert base._RUNNERS["demo"].__name__ == "DemoRunner"
    assert issubclass(base._RUNNERS["demo"], Runner)


HEAVY = ("torch", "onnxruntime", "matplotlib", "tensorrt", "onnx")


@functools.cache
def _heavy_modules_after(imports: str) -> frozenset[str]:
    code = f"import sys\n{imports}\nprint(','.join(sorted(k for k in {HEAVY!r} if k in sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return frozenset(filter(None, proc.stdout.strip().split(",")))


RUNTIME_IMPORTS = (
    "import runtime, runtime.base, runtime.harness, runtime.report, runtime.env\n"
    "import runtime.__main__ as m\n"
    "m.build_parser()\n"
    "runtime.available_backends()"
)


def test_runtime_adds_no_heavy_imports():
    # runtime needs lowrank_core.errors/_io/_cli; whatever importing those costs is compress's business.
    baseline = _heavy_modules_after("import lowrank_core.errors, lowrank_core.io, lowrank_core.cli")
    assert _heavy_modules_after(RUNTIME_IMPORTS) == baseline


def test_import_runtime_is_light():
    assert _heavy_modules_after("import lowrank_core.errors, lowrank_core.io, lowrank_core.cli") == set()
    assert _heavy_modules_after(RUNTIME_IMPORTS) == set()
