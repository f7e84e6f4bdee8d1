"""The method contract: every registered method, plug-ins (a module in compress.methods, an entry point).

The end-to-end test is parametrised over the registry, so a newly registered method is tested by
registering it: plan → apply → ONNX export → parity against PyTorch on small models.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import compress.methods as methods_pkg
from compress.api import compress_, method_config
from compress.methods import base as methods_base
from compress.methods import get_method, load_methods, method_names
from compress.methods.base import Needs, register
from compress.plan import Plan
from compress.zoo import create_model
from lowrank_core.errors import CompressionError, UserInputError

BUILT_IN = method_names()


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registry that reloads plug-ins and is restored afterwards."""
    saved = dict(methods_base.REGISTRY)
    monkeypatch.setattr(methods_pkg, "_loaded", False)
    yield
    methods_base.REGISTRY.clear()
    methods_base.REGISTRY.update(saved)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_declares_the_contract(name: str) -> None:
    method = get_method(name)
    assert method.name == name
    assert dataclasses.is_dataclass(method.config_type)
    assert isinstance(method.needs, Needs)
    assert all(o.flag.startswith("--") and o.field for o in method.options)
    flags = [o.flag for o in method.options]
    assert len(flags) == len(set(flags))
    config = method_config(name)
    assert config.method == name or getattr(config, "method", None) == name
    if method.default_target is not None:
        assert getattr(config, method.default_target.kind) == pytest.approx(method.default_target.value)


def test_the_built_in_methods_are_all_there() -> None:
    expected = {"tucker2", "svd", "tai", "cp", "vbmf-tucker2", "ljsvd", "rjsvd1", "rjsvd2", "bijsvd", "lrsd", "cc"}
    assert expected <= set(BUILT_IN)


def test_registering_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(type(get_method("tucker2"))("tucker2", method="tucker2"))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1.0, 0.5])
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_refuses_the_same_bad_ratio(name: str, bad: float) -> None:
    with pytest.raises(UserInputError, match="RATIO must be"):
        method_config(name, ratio=bad)


_TOY_SOURCE = '''
from __future__ import annotations

from dataclasses import dataclass, field

from compress.methods.base import Method, Option, register
from compress.methods.lowrank import plan_lowrank, LowRankConfig


@dataclass(frozen=True)
class ToyConfig(LowRankConfig):
    """Channel SVD under another name."""

    method: str = "{name}"

    @property
    def conv_method(self) -> str:
        return "svd"


class ToyMethod(Method):
    config_type = ToyConfig
    options = (Option("--toy-knob", "min_rank", "a toy option"),)
    summary = "a toy method from a plug-in"

    def plan(self, model, config, example_input, *, data=None, model_name="model", filter_fn=None):
        return plan_lowrank(model, config, example_input, model_name=model_name, filter_fn=filter_fn)


TOY = ToyMethod("{name}")
'''


def test_a_module_in_the_methods_package_is_a_new_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    (tmp_path / "toy_method.py").write_text(_TOY_SOURCE.format(name="toy") + "\nregister(TOY)\n")
    monkeypatch.setattr(methods_pkg, "__path__", [*methods_pkg.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "compress.methods.toy_method", raising=False)
    load_methods()
    toy = get_method("toy")
    assert toy.options[0].flag == "--toy-knob"
    model = create_model("cifar_resnet20")
    plan = compress_(model, method_config("toy", ratio=2.0, round_to=1), torch.randn(1, 3, 32, 32))
    assert plan.method == "toy"
    assert plan.target["achieved_ratio"] == pytest.approx(2.0, rel=0.05)
    assert {e.action for e in plan.factorized_layers} <= {"svd", "pointwise-svd", "linear-svd"}


def test_an_entry_point_of_another_package_is_a_new_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    pkg = tmp_path / "toy_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(_TOY_SOURCE.format(name="toy-ep"))
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [lowrank_deploy.methods]
        toy-ep = toy_plugin_pkg:TOY
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    load_methods()
    assert "toy-ep" in method_names()
    assert get_method("toy-ep").summary == "a toy method from a plug-in"


def test_a_broken_plug_in_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lowrank_deploy.methods]\nbroken = no_such_module_xyz:M\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(UserInputError, match=r"method plug-in 'broken'.*no_such_module_xyz"):
        load_methods()


def test_plan_from_dict_refuses_unknown_keys_and_fractional_ranks() -> None:
    model = create_model("cifar_resnet20")
    plan = compress_(model, method_config("tucker2", ratio=2.0, round_to=1), torch.randn(1, 3, 32, 32))
    data = plan.to_dict()
    entry = next(e for e in data["layers"] if e["ranks"])
    with pytest.raises(UserInputError, match=rf"unknown key 'rank' in layer '{entry['path']}'"):
        Plan.from_dict({**data, "layers": [{**entry, "rank": [3]}]})
    with pytest.raises(UserInputError, match="unknown key 'targte'"):
        Plan.from_dict({**data, "targte": {}})
    for bad in (3.5, "abc", True, -1):
        with pytest.raises(UserInputError, match="ranks must be a list of non-negative integers"):
            Plan.from_dict({**data, "layers": [{**entry, "ranks": [bad, *entry["ranks"][1:]]}]})
    assert Plan.from_dict(data).to_dict() == data


# ------------------------------------------------------------------------ every method × small models, end to end
def _mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


MODELS = {
    "cifar_resnet20": (lambda: create_model("cifar_resnet20"), 32),
    "resnet18@64": (_resnet18, 64),
    "mobilenet_v2@64": (_mobilenet, 64),
}

# Per-method settings that keep the end-to-end run small (a few seconds per case on 2 cores).
FAST_OPTIONS = {
    "lrsd": {"calibration_samples": 32},
    "cc": {"calibration_samples": 32, "curve_points": 8},
    "bijsvd": {"bi_iters": 2},
}


def _loader(size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, size, size, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(2)
    ]


# Methods whose solvers take minutes on the 11M-parameter torchvision ResNet-18 on 2 cores (CP's ALS, LRSD's
# per-layer solve, CC's sensitivity curves, Bi-JSVD's alternation, 50 HOOI sweeps, auto's candidate errors): it runs in
# `make test-all`; every method, a new one included, still runs on the two smaller models in `make test`.
HEAVY_ON_RESNET18 = {"cp", "lrsd", "cc", "bijsvd", "vbmf-tucker2", "auto"}


def _cases() -> list[object]:
    return [
        pytest.param(
            name,
            model,
            id=f"{name}-{model}",
            marks=[pytest.mark.slow] if model == "resnet18@64" and name in HEAVY_ON_RESNET18 else [],
        )
        for name in BUILT_IN
        for model in MODELS
    ]


@pytest.mark.parametrize(("name", "model_name"), _cases())
def test_every_method_plans_applies_exports_and_matches(name: str, model_name: str) -> None:
    from export.onnx import onnx_from_torch
    from export.parity import check_onnx_parity
    from export.passes import optimize

    factory, size = MODELS[model_name]
    method = get_method(name)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    options = {k: v for k, v in FAST_OPTIONS.get(name, {}).items() if k in method.fields}
    config = method_config(name, ratio=2.0, **options) if "ratio" in method.fields else method_config(name, **options)
    data = _loader(size) if method.needs is not Needs.NOTHING else None
    compressed = factory().eval()
    try:
        plan = compress_(compressed, config, example, data=data, model_name=model_name)
    except CompressionError as exc:  # e.g. joint SVD on a net without repeated same-shape blocks
        message = str(exc)
        assert "\n" not in message
        assert len(message) > 20
        pytest.skip(f"{name} does not apply to {model_name}: {message}")
    assert plan.method == name
    assert plan.factorized_layers, "the plan factorizes nothing"
    assert plan.totals["params_after"] < plan.totals["params_before"]  # stored values (LRSD's S counted sparse)
    rebuilt = method.apply_(factory().eval(), Plan.from_dict(plan.to_dict()), init="empty")
    assert [tuple(p.shape) for p in rebuilt.state_dict().values()] == [
        tuple(p.shape) for p in compressed.state_dict().values()
    ]
    proto = optimize(onnx_from_torch(compressed.eval(), example))
    result = check_onnx_parity(compressed, proto, input_shape=tuple(example.shape))
    assert result.passed
    assert result.n_failed == 0
    assert result.cosine > 0.9999
    assert result.shape == (2, 10)  # two seeded batches of the example's shape, concatenated
