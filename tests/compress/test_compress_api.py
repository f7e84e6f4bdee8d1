"""Planning, rank selection, applying and re-applying plans."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from compress import (
    CompressionError,
    Plan,
    UserInputError,
    apply_plan_,
    compress_,
    method_config,
    plan_compression,
)
from compress.metrics import count_macs, count_params
from tests.compress.models import TinyResNet

SMALL = 64  # input size that keeps torchvision models fast on 2 cores


def _tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


@pytest.mark.parametrize(
    ("model_name", "method", "ratio"),
    [
        ("resnet18", "tucker2", 4.0),
        ("resnet18", "svd", 3.0),
        ("resnet18", "tai", 5.0),
        ("resnet34", "tucker2", 4.0),
        ("resnet50", "tucker2", 3.0),
        ("vgg11_bn", "tucker2", 10.0),
        ("mobilenet_v2", "tucker2", 2.0),
    ],
)
def test_ratio_is_reached_within_3_percent(model_name: str, method: str, ratio: float) -> None:
    model = _tv(model_name)
    x = torch.randn(1, 3, SMALL, SMALL)
    plan = plan_compression(model, method_config(method, ratio=ratio), x, model_name=model_name)
    achieved = plan.totals["params_before"] / plan.totals["params_after"]
    assert achieved == pytest.approx(ratio, rel=0.03)
    assert plan.target["achieved_ratio"] == pytest.approx(achieved, rel=1e-12)
    # The planned totals are what the applied model really has (params and flop-counter MACs);
    # the structure is enough for counting, so skip filling the factors.
    apply_plan_(model, plan, init="empty")
    assert count_params(model) == plan.totals["params_after"]
    assert count_macs(model, x) == plan.totals["macs_after"]
    assert all(r % 8 == 0 or r == m for e in plan.factorized_layers for r, m in zip(e.ranks, _maxes(e), strict=True))


def _maxes(entry) -> list[int]:
    t, s = entry.shape[0], entry.shape[1]
    return (
        [t, s] if entry.action == "tucker2" else [min(t, s, *entry.shape[2:] and [s * entry.shape[2] * entry.shape[3]])]
    )


def test_skip_rules_are_recorded() -> None:
    model = TinyResNet()
    x = torch.randn(1, 3, 16, 16)
    plan = plan_compression(model, method_config("tucker2", ratio=1.5, min_rank=2, round_to=1), x)
    reasons = {e.path: e.reason for e in plan.layers}
    assert "stem" in reasons["stem.0"]
    assert "depthwise" in reasons["depthwise"]
    assert plan.layer("conv1").action == "tucker2"
    assert plan.layer("proj").action == "pointwise-svd"
    assert plan.layer("head").action == "linear-svd"


def test_unreachable_ratio_states_the_maximum() -> None:
    model = _tv("resnet18")
    x = torch.randn(1, 3, SMALL, SMALL)
    with pytest.raises(CompressionError, match=r"not reachable.*at most ×\d+\.\d\d"):
        plan_compression(model, method_config("tucker2", ratio=10_000.0), x)


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0, "4"])
def test_ratio_must_be_a_number_above_one(bad: object) -> None:
    with pytest.raises(UserInputError, match="RATIO must be a number > 1"):
        method_config("tucker2", ratio=bad)


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(UserInputError, match=r"unknown method 'tuker2'.*tucker2"):
        method_config("tuker2")


def test_plan_round_trips_and_reapplies(tmp_path) -> None:
    base = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    compressed = copy.deepcopy(base)
    plan = compress_(compressed, method_config("tucker2", ratio=2.0, min_rank=2, round_to=2), x, model_name="tiny")
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    again = apply_plan_(copy.deepcopy(base), loaded)
    with torch.no_grad():
        torch.testing.assert_close(again(x), compressed(x), rtol=0, atol=0)
    # Structure-only application then loading the state dict gives the same model.
    empty = apply_plan_(copy.deepcopy(base), loaded, init="empty")
    empty.load_state_dict(compressed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(empty(x), compressed(x), rtol=0, atol=0)
    assert all(e.rel_error is not None and 0 <= e.rel_error < 1 for e in plan.factorized_layers)


def test_hand_edited_full_rank_plan_reproduces_the_dense_model() -> None:
    base = TinyResNet().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = plan_compression(base, method_config("tucker2", ratio=2.0, min_rank=2, round_to=1), x)
    for entry in plan.factorized_layers:
        entry.ranks = [entry.shape[0], entry.shape[1]] if entry.action == "tucker2" else [min(entry.shape[:2])]
    model = apply_plan_(copy.deepcopy(base), plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)


def test_plan_for_another_model_is_rejected() -> None:
    x = torch.randn(1, 3, SMALL, SMALL)
    plan = plan_compression(_tv("resnet18"), method_config("tucker2", ratio=2.0), x)
    with pytest.raises(CompressionError, match="plan does not match the model"):
        apply_plan_(_tv("vgg11_bn"), plan)


def test_malformed_plan_is_a_user_error(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"model": "x", "layers": [{"path": 1}]}')
    with pytest.raises(UserInputError, match="malformed plan"):
        Plan.load(path)
    path.write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        Plan.load(path)


def _planted_low_rank(model: nn.Module, rank_fraction: float, noise: float = 1e-3) -> dict[str, tuple[int, int]]:
    """Give every 3×3 conv a Tucker-(r_t, r_s) kernel plus small noise; return the planted ranks."""
    planted = {}
    g = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 3 and m.groups == 1:
            t, s = m.out_channels, m.in_channels
            r_t, r_s = max(2, int(rank_fraction * t)), max(2, int(rank_fraction * s))
            core = torch.randn(r_t, r_s, 3, 3, generator=g)
            u_t = torch.linalg.qr(torch.randn(t, r_t, generator=g))[0]
            u_s = torch.linalg.qr(torch.randn(s, r_s, generator=g))[0]
            w = torch.einsum("rqkl,tr,sq->tskl", core, u_t, u_s)
            with torch.no_grad():
                m.weight.copy_(w + noise * torch.randn(w.shape, generator=g))
            planted[name] = (r_t, r_s)
    return planted


def test_evbmf_rule_finds_planted_ranks() -> None:
    model = TinyResNet(width=64)
    planted = _planted_low_rank(model, 0.25)
    x = torch.randn(1, 3, 16, 16)
    config = method_config("tucker2", ratio=None, rank_rule="evbmf", omega=1.0, round_to=1, min_rank=1)
    plan = plan_compression(model, config, x)
    for path, ranks in planted.items():
        entry = plan.layer(path)
        assert tuple(entry.info["evbmf_ranks"]) == ranks
        assert tuple(entry.ranks) == ranks


def test_evbmf_on_random_weights_falls_back_with_a_warning() -> None:
    x = torch.randn(1, 3, SMALL, SMALL)
    plan = plan_compression(_tv("resnet18"), method_config("tucker2", ratio=3.0, rank_rule="evbmf"), x)
    assert any("EVBMF found no structure" in w for w in plan.warnings)
    assert plan.target["rank_rule"] == "uniform"
    assert plan.target["achieved_ratio"] == pytest.approx(3.0, rel=0.03)


def test_energy_rule_hits_ratio_and_keeps_energy() -> None:
    model = TinyResNet(width=64)
    _planted_low_rank(model, 0.5, noise=0.05)
    x = torch.randn(1, 3, 16, 16)
    plan = plan_compression(model, method_config("tucker2", ratio=2.5, rank_rule="energy", round_to=1, min_rank=1), x)
    assert plan.target["achieved_ratio"] == pytest.approx(2.5, rel=0.03)
    fixed = plan_compression(
        model,
        method_config("tucker2", ratio=None, rank_rule="energy", energy=0.999, round_to=1, min_rank=1),
        x,
    )
    # With 99.9% energy retained, the planted rank-32 structure (plus weak noise) is kept but not more.
    entry = fixed.layer("conv1")
    assert 32 <= entry.ranks[0] < 64


def test_compressed_outputs_track_dense_on_low_rank_weights() -> None:
    model = TinyResNet(width=64).eval()
    _planted_low_rank(model, 0.25, noise=1e-4)
    dense = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    config = method_config("tucker2", ratio=None, rank_rule="evbmf", round_to=1, min_rank=1, exclude=("proj", "head"))
    compress_(model, config, x)
    from compress.metrics import output_agreement

    agree = output_agreement(dense, model, x)
    assert agree.rel_l2 < 1e-2
    assert agree.top1_agreement == 1.0
