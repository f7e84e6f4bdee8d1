"""METHOD=auto: per-layer choice by a knapsack on params, MACs or (fake, deterministic) latency."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.latency import use_latency_model
from compress.methods import get_method
from compress.metrics import count_params
from compress.targets import Target
from lowrank_core.errors import UserInputError
from tests.compress.models import TinyResNet
from tests.compress.test_compress_latency import FakeTimer, fake_latency

OPTIONS = {"round_to": 4, "min_rank": 4}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet(width=64).eval()


@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.0])
def test_auto_respects_a_params_budget(ratio):
    method = get_method("auto")
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    plan = method.plan(model, method.make_config(Target("ratio", ratio), **OPTIONS), x)
    compressed = copy.deepcopy(model)
    method.apply_(compressed, plan)
    assert count_params(model) / count_params(compressed) >= ratio
    assert plan.totals["params_after"] == count_params(compressed)
    assert plan.target["cost"] <= plan.target["budget"]
    assert {e.action for e in plan.factorized_layers} <= {"svd", "tai", "tucker2", "pointwise-svd", "linear-svd"}
    for entry in plan.layers:  # every candidate layer records what was considered, and the choice
        if "candidates" in entry.info:
            assert entry.info["candidates"][0]["action"] == "keep"
            assert entry.info["candidates"][entry.info["chosen"]]["action"] == entry.action


def test_auto_error_proxy_matches_the_applied_decomposition():
    method = get_method("auto")
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    plan = method.plan(model, method.make_config(Target("ratio", 2.0), **OPTIONS), x)
    dense = dict(model.named_modules())
    method.apply_(copy.deepcopy(model), plan)
    assert plan.factorized_layers
    for entry in plan.factorized_layers:
        norm2 = float(dense[entry.path].weight.detach().double().pow(2).sum())
        predicted = entry.info["candidates"][entry.info["chosen"]]["error"]
        assert predicted == pytest.approx(entry.rel_error**2 * norm2, rel=1e-6, abs=1e-9)


def test_auto_flops_target_counts_macs():
    method = get_method("auto")
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    plan = method.plan(model, method.make_config(Target("flops", 0.4), **OPTIONS), x)
    assert plan.target["achieved_flops_reduction"] >= 0.4
    assert plan.target["budget_unit"] == "MACs"


def test_auto_speedup_with_a_fake_latency_model(tmp_path):
    latency, _ = fake_latency(tmp_path)
    method = get_method("auto")
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with use_latency_model(latency):
        plan = method.plan(model, method.make_config(Target("speedup", 1.5), **OPTIONS), x)
    assert plan.target["predicted_speedup"] >= 1.5
    assert plan.target["budget_unit"] == "ms"
    compressed = copy.deepcopy(model)
    method.apply_(compressed, plan)
    measured = 1.25 * FakeTimer.cost(compressed, [1, 3, 32, 32])
    assert measured == pytest.approx(plan.target["predicted_ms"], rel=1e-9)
    chosen = [e.info["candidates"][e.info["chosen"]] for e in plan.layers if "candidates" in e.info]
    assert all(c["ms"] is not None for c in chosen)


def test_auto_through_the_latency_solver_is_native(tmp_path):
    from compress.latency.solve import compress_to_latency_

    latency, _ = fake_latency(tmp_path)
    method = get_method("auto")
    model = _model()
    compressed = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    config = method.make_config(Target("speedup", 1.5), **OPTIONS)
    plan = compress_to_latency_(method, model, compressed, config, Target("speedup", 1.5), x, latency=latency)
    assert plan.target["latency_target"]["met"]
    assert plan.target["latency_target"]["knob"] is None
    assert compressed(x).shape == (1, 10)


def test_auto_unreachable_and_two_targets_are_one_line_errors(tmp_path):
    method = get_method("auto")
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UserInputError) as info:
        method.plan(model, method.make_config(Target("ratio", 500.0), **OPTIONS), x)
    assert "\n" not in str(info.value)
    assert "RATIO=500 is out of reach for METHOD=auto" in str(info.value)
    latency, _ = fake_latency(tmp_path)
    with use_latency_model(latency), pytest.raises(UserInputError, match="best speedup found is"):
        method.plan(model, method.make_config(Target("speedup", 100.0), **OPTIONS), x)
    with pytest.raises(UserInputError, match="give one target"):
        method.config_type(ratio=2.0, speedup=2.0, flops=None)


def test_auto_registry_compress_matches_plan_then_apply():
    method = get_method("auto")
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    config = method.make_config(Target("ratio", 2.0), **OPTIONS)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    data = [(x, torch.zeros(2, dtype=torch.long))]
    plan_a = method.compress_(a, config, x[:1], data=data)
    plan_b = method.plan(b, config, x[:1], data=data)
    method.apply_(b, plan_b)
    assert [(e.action, e.ranks) for e in plan_a.layers] == [(e.action, e.ranks) for e in plan_b.layers]
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_auto_output_error_proxy_with_data_equals_a_direct_computation(monkeypatch):
    """With data the proxy is ``‖(W − Ŵ) X‖²`` on the calibration inputs, Ŵ the chain the applier builds."""
    import compress.methods.auto as auto
    from compress.factorizations import factorization

    monkeypatch.setattr(auto, "POSITIONS_PER_IMAGE", 0)  # every output position: the Gram is exact
    method = get_method("auto")
    torch.manual_seed(0)
    model = TinyResNet(width=16).eval()
    images = torch.randn(12, 3, 16, 16)
    data = [(images[:5], torch.zeros(5, dtype=torch.long)), (images[5:], torch.zeros(7, dtype=torch.long))]
    config = method.make_config(Target("ratio", 2.0), **OPTIONS, calibration_samples=10)
    plan = method.plan(model, config, images[:1], data=data)
    assert plan.target["error_proxy"] == "output"
    assert method.plan(model, config, images[:1]).target["error_proxy"] == "weight"
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, p=p: inputs.setdefault(p, a[0]))
        for p, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(images[:10])
    for h in hooks:
        h.remove()
    checked = set()
    for entry in plan.layers:
        if "candidates" not in entry.info:
            continue
        assert entry.info["error_proxy"] == "output"
        module = model.get_submodule(entry.path)
        for row in entry.info["candidates"][1:]:
            chain, _ = factorization(row["action"]).decompose(module, tuple(row["ranks"]))
            x = inputs[entry.path].double()
            with torch.no_grad():
                direct = float((module.double()(x) - chain.double()(x)).pow(2).sum())
            module.float()
            assert row["error"] == pytest.approx(direct, rel=1e-6)
            checked.add(row["action"])
    assert {"svd", "tai", "tucker2", "linear-svd"} <= checked
