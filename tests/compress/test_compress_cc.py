"""Collaborative compression (cc): scores, fits, the rate solver, stop rules, ground truths, plans and thinning.

Scores are checked against the spec's formulas, the heuristic against zero channels and zero singular values,
plans against count_macs/count_params, producer thinning against the masked dense model, and saved plans
against a fresh model.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.methods import get_method
from compress.methods.cc import (
    DECOMP,
    MAX_RATE,
    PRUNE,
    WEIGHT_ONLY_WARNING,
    ChannelSelect,
    CollaborativeConfig,
    ConvShape,
    allocate_reductions,
    cc_compress_,
    fit_exponential,
    gradient_statistics,
    heuristic_trajectory,
    plan_cc,
    sensitivity_curve,
    unit_scores,
)
from compress.metrics import count_macs, count_params
from compress.plan import KEEP, Plan
from compress.planning import cpu_rank_multiple
from compress.targets import Target
from compress.zoo import create_model
from lowrank_core.errors import CompressionError, UserInputError

DT = torch.float64
CC = get_method("cc")
apply_plan_ = CC.apply_  # the applier the registry dispatches cc plans to


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 linear algebra: on 2 shared cores OpenMP spinning makes it ~100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def _resnet20(seed: int = 0, width: float = 0.5) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model(f"cifar_resnet20_w{width:g}", num_classes=10)
    return _randomize_bn_(model, seed).eval()


def _batches(n: int = 2, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = _gen(seed)
    return [
        (torch.randn(16, 3, size, size, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(n)
    ]


EXAMPLE = torch.zeros(1, 3, 16, 16)


@pytest.fixture(scope="module")
def weight_only_plan() -> tuple[nn.Module, Plan]:
    model = _resnet20()
    return model, plan_cc(model, CollaborativeConfig(flops=0.5), EXAMPLE, model_name="r20")


@pytest.fixture(scope="module")
def data_case() -> tuple[nn.Module, nn.Module, Plan]:
    model = _resnet20()
    compressed = copy.deepcopy(model)
    plan = cc_compress_(compressed, CollaborativeConfig(flops=0.5), EXAMPLE, _batches(), model_name="r20")
    return model, compressed.eval(), plan


def _cc_entries(plan: Plan) -> list:
    return [e for e in plan.layers if e.info.get("R") is not None]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"flops": 1.5}, "FLOPS must be the fraction"),
        ({"flops": 0.0}, "FLOPS must be the fraction"),
        ({"ratio": 0.5}, "RATIO must be a number > 1"),
        ({"ratio": math.inf}, "RATIO must be a number > 1"),
        ({"gamma": -1.0}, "gamma must be a finite number ≥ 0"),
        ({"weighting": "lambda"}, "weighting must be one of slope, lagrangian"),
        ({"decompose": False, "prune": False}, "needs decompose=True or prune=True"),
        ({"round_to": 0}, "round_to must be an integer ≥ 1"),
        ({"curve_points": 3}, "curve_points must be 0"),
        ({"calibration_samples": 0}, "calibration_samples must be an integer ≥ 1"),
        ({"decompose": "no"}, "decompose must be True or False"),
        ({"exclude": "layer1.*"}, "exclude must be a sequence"),
        ({"flops_measure": "graph"}, "flops_measure must be one of model, layers"),
    ],
)
def test_bad_options_are_one_line_errors(options: dict, needle: str) -> None:
    with pytest.raises(UserInputError) as exc:
        CollaborativeConfig(**options)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_target_resolution_and_round_trip() -> None:
    assert CollaborativeConfig().flops == 0.5  # neither given: the paper's README setting
    assert CollaborativeConfig().control == "flops"
    both = CollaborativeConfig(flops=0.3, ratio=4.0)  # flops wins, as for every method
    assert (both.flops, both.ratio, both.control) == (0.3, None, "flops")
    default = CC.make_config()  # no target on the command line: CC's documented FLOPS=0.5, not RATIO=4
    assert CC.default_target == Target("flops", 0.5)
    assert (default.flops, default.ratio, default.control) == (0.5, None, "flops")
    by_ratio = CC.make_config(Target("ratio", 4.0))
    assert (by_ratio.ratio, by_ratio.flops, by_ratio.control) == (4.0, None, "ratio")
    cfg = CC.make_config(Target("flops", 0.4), gamma=0.5, decompose=False, exclude=("a.*",))
    assert CollaborativeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert CC.config_from_plan(Plan("m", "cc", cfg.to_dict(), [1, 3, 8, 8], [])) == cfg
    with pytest.raises(UserInputError, match="does not take --rank-rule"):
        CC.make_config(rank_rule="uniform")


# ------------------------------------------------------------------------------------------------ scores
def _naive_scores(W4: torch.Tensor, G4: torch.Tensor, pruned: list[int], rank: int | None, gamma: float):
    """The spec's §6 formulas, literally: one W_u, A and SVD per candidate."""
    n_out, n_in = W4.shape[:2]
    W, G = W4.reshape(n_out, -1).to(DT), G4.reshape(n_out, -1).to(DT)
    taps = W.shape[1] // n_in
    cols = torch.ones(W.shape[1], dtype=DT)
    for c in pruned:
        cols[c * taps : (c + 1) * taps] = 0
    Wp = W * cols
    U, S, Vh = torch.linalg.svd(Wp, full_matrices=False)
    r = min(n_out, (n_in - len(pruned)) * taps) if rank is None else rank
    Wt = Wp if rank is None else (U[:, :r] * S[:r]) @ Vh[:r]
    n = (n_in - len(pruned)) + r

    def score(Wu: torch.Tensor) -> float:
        A = Wu - W
        B = ((G * A) ** 2).sum()
        Uu, Su, Vhu = torch.linalg.svd(Wu, full_matrices=False)
        What = (Uu**2 * Su**2) @ (Vhu**2)
        Fw = gamma * (
            B + 4 / (n - 1) * (G**2 * A * (-Wu)).sum() + 1 / (n - 1) * (((G * Wu) ** 2).sum() + (G**2 * What).sum())
        )
        return float(B + Fw)

    chan = []
    for c in range(n_in):
        if c in pruned:
            chan.append(math.inf)
            continue
        Wu = Wt.clone()
        Wu[:, c * taps : (c + 1) * taps] = 0
        chan.append(score(Wu))
    sv = [score(Wt - S[j] * torch.outer(U[:, j], Vh[j])) for j in range(r)]
    return torch.tensor(chan, dtype=DT), torch.tensor(sv, dtype=DT)


@pytest.mark.parametrize(("pruned", "rank"), [([], None), ([1, 4], None), ([2], 20), ([0, 3, 5], 11)])
def test_vectorised_scores_match_the_spec_formula(pruned: list[int], rank: int | None) -> None:
    g = _gen(1)
    W = torch.randn(24, 6, 3, 3, generator=g, dtype=DT)
    G = torch.randn(24, 6, 3, 3, generator=g, dtype=DT)
    ref_c, ref_s = _naive_scores(W, G, pruned, rank, 0.9)
    chan, sv = unit_scores(W, G, pruned=pruned, rank=rank, exact_forward=True)
    assert torch.equal(torch.isinf(chan), torch.isinf(ref_c))
    fin = torch.isfinite(ref_c)
    torch.testing.assert_close(chan[fin], ref_c[fin], rtol=1e-9, atol=0)
    torch.testing.assert_close(sv, ref_s, rtol=1e-9, atol=0)
    # the default keeps the current singular basis for channel candidates: the forward term's Ŵ part moves a
    # little (it is weighted by γ/(n−1)); the singular-value scores are exact either way
    approx_c, approx_s = unit_scores(W, G, pruned=pruned, rank=rank)
    torch.testing.assert_close(approx_s, ref_s, rtol=1e-9, atol=0)
    rel = ((approx_c[fin] - ref_c[fin]).abs() / ref_c[fin]).max()
    assert rel < 0.05


def test_arm_scores_use_only_their_own_units() -> None:
    g = _gen(2)
    W = torch.randn(8, 4, 3, 3, generator=g, dtype=DT)
    chan, sv = unit_scores(W, None, prune=True, decompose=False)
    assert sv.numel() == 0
    assert torch.isfinite(chan).all()
    chan, sv = unit_scores(W, None, prune=False, decompose=True)
    assert torch.isinf(chan).all()
    assert sv.numel() == 8
    assert torch.all(sv[:-1] >= sv[1:])  # G ≡ 1: the score grows with σ, so the smallest σ scores lowest


# ------------------------------------------------------------------------------------------------ fit, solver
def test_fit_recovers_an_exponential_and_flags_flat_curves() -> None:
    c = np.linspace(0.05, 0.9, 40)
    loss = 2.0 * np.exp(3.0 * c)
    log_a, b = fit_exponential(c, loss)
    assert b == pytest.approx(3.0, rel=1e-8)
    assert log_a == pytest.approx(math.log(2.0) - math.log(loss.max()), abs=1e-7)  # ℓ normalised by its max
    assert all(math.isnan(v) for v in fit_exponential(c, np.zeros_like(c)))
    assert all(math.isnan(v) for v in fit_exponential(np.array([0.3]), np.array([1.0])))


@pytest.mark.parametrize("weighting", ["slope", "lagrangian"])
def test_rate_solver_meets_the_target_with_equal_slopes(weighting: str) -> None:
    rng = np.random.default_rng(0)
    n = 12
    log_a, b = rng.uniform(-6, -1, n), rng.uniform(0.5, 8, n)
    macs = rng.uniform(1e5, 1e7, n)
    caps = np.full(n, MAX_RATE)
    for frac in (0.05, 0.4, 0.9):
        target = frac * float((macs * caps).sum())
        f, log_x = allocate_reductions(log_a, b, macs, caps, target, weighting=weighting)
        assert f.sum() == pytest.approx(target, rel=1e-6)
        c = f / macs
        inside = (c > 1e-9) & (c < MAX_RATE - 1e-9)
        assert inside.any()
        slope = np.log(b) + log_a + b * c  # log(a b e^{b c})
        if weighting == "lagrangian":
            slope -= np.log(macs)
        np.testing.assert_allclose(slope[inside], log_x, atol=1e-8)
        assert np.all(slope[c <= 1e-9] >= log_x - 1e-8)  # layers at 0 would only get steeper
    f, _ = allocate_reductions(log_a, b, macs, caps, 0.0)
    assert not f.any()
    with pytest.raises(CompressionError, match="at most"):
        allocate_reductions(log_a, b, macs, caps, 1.01 * float((macs * caps).sum()))


# ------------------------------------------------------------------------------------------------ heuristic
def _shape(W: torch.Tensor, pixels: int = 16) -> ConvShape:
    return ConvShape(W.shape[0], W.shape[1], W.shape[2] * W.shape[3], pixels)


@pytest.mark.parametrize(("prune", "decompose"), [(True, True), (True, False), (False, True)])
def test_every_target_is_met_with_at_most_one_unit_of_overshoot(prune: bool, decompose: bool) -> None:
    g = _gen(3)
    W = torch.randn(32, 16, 3, 3, generator=g)
    G = torch.randn(32, 16, 3, 3, generator=g)
    shape = _shape(W)
    cap = shape.max_reduction(prune=prune, decompose=decompose) * 0.999
    traj = heuristic_trajectory(W, G, shape, cap, prune=prune, decompose=decompose)
    assert traj.interval == max(1, math.floor(0.01 * (16 * prune + 32 * decompose)))
    for rate in (0.05, 0.2, 0.5, 0.8, 0.94):
        target = rate * shape.dense_macs
        if target > cap:
            continue
        d = traj.decide(target)
        assert d.reached
        assert d.reduction >= target
        kept = 16 - len(d.pruned)
        assert d.reduction == shape.dense_macs - shape.macs(kept, d.rank)
        t = traj.stop_index(target)
        assert t == d.removals - 1
        if t > 0:  # one removal fewer meets neither stop rule
            prev_switch = (
                traj.n_pruned[t - 1] > 0 and traj.decomposed[t - 1] and traj.prune_only_reduction[t - 1] >= target
            )
            assert traj.reduction[t - 1] < target
            assert not prev_switch
        # the same target run on its own stops at the same state (one trajectory answers every smaller target)
        alone = heuristic_trajectory(W, G, shape, target, prune=prune, decompose=decompose).decide(target)
        assert alone == d
        if not decompose:
            assert d.rank is None
        if not prune:
            assert d.pruned == ()
    zero = traj.decide(0.0)
    assert (zero.pruned, zero.rank, zero.removals) == ((), None, 0)
    assert heuristic_trajectory(W, G, shape, 0.0).reduction.size == 0


@pytest.mark.parametrize("decompose", [True, False])
def test_zero_weight_channels_are_pruned_first(decompose: bool) -> None:
    g = _gen(4)
    W = torch.randn(32, 16, 3, 3, generator=g)
    zero = [1, 6, 7, 12]
    W[:, zero] = 0.0
    G = torch.randn(32, 16, 3, 3, generator=g)
    shape = _shape(W)
    traj = heuristic_trajectory(W, G, shape, 0.9 * shape.dense_macs, decompose=decompose)
    assert sorted(traj.order[:4]) == zero


@pytest.mark.parametrize("prune", [True, False])
def test_rank_deficient_weight_loses_its_zero_singular_values_first(prune: bool) -> None:
    g = _gen(5)
    n_out, n_in, rank = 64, 16, 8
    W = (torch.randn(n_out, rank, generator=g) @ torch.randn(rank, n_in * 9, generator=g)).reshape(n_out, n_in, 3, 3)
    G = torch.randn(n_out, n_in, 3, 3, generator=g)
    shape = _shape(W)
    # rank 22 costs 22·(144 + 64) ≤ half of 64·144: reachable by removing zero singular values only
    target = 0.5 * shape.dense_macs
    d = heuristic_trajectory(W, G, shape, target, prune=prune).decide(target)
    assert d.pruned == ()
    assert d.rank is not None
    assert rank <= d.rank <= 22
    conv = nn.Conv2d(n_in, n_out, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(W)
    model = nn.Sequential(conv)
    plan = Plan(
        model="m",
        method="cc",
        config={},
        input_shape=[1, n_in, 4, 4],
        layers=[_entry("0", list(W.shape), DECOMP, [d.rank])],
    )
    apply_plan_(model, plan)
    assert plan.layers[0].rel_error < 1e-5
    x = torch.randn(2, n_in, 6, 6, generator=g)
    torch.testing.assert_close(model(x), F.conv2d(x, W, padding=1), rtol=1e-4, atol=1e-4)


def _entry(path: str, shape: list[int], action: str, ranks: list[int] | None, **info):
    from compress.plan import LayerPlan

    return LayerPlan(path, "Conv2d", shape, action, ranks, None, 0, 0, 0, 0, info={"input": "full", **info})


def test_full_rank_factorisation_reproduces_the_layer() -> None:
    g = _gen(6)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 8, 9, 9, generator=g)
    reference = conv(x)
    plan = Plan("m", "cc", {}, [1, 8, 9, 9], [_entry("0", [12, 8, 3, 3], DECOMP, [12])])
    model = nn.Sequential(conv)
    apply_plan_(model, plan)
    chain = model[0]
    assert [type(m) for m in chain] == [nn.Conv2d, nn.Conv2d]
    assert (chain[0].stride, chain[0].bias, chain[1].kernel_size) == ((2, 2), None, (1, 1))
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ gradients
def test_gradient_statistics_are_the_mean_of_batch_mean_gradients() -> None:
    model = _resnet20().train()
    batches = _batches(3)
    paths = ["layer1.0.conv1", "layer3.2.conv2"]
    G, info = gradient_statistics(model, paths, batches)
    assert info == {"images": 48, "batches": 3}
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    ref = copy.deepcopy(model).eval()
    expected = [torch.zeros_like(ref.get_submodule(p).weight, dtype=DT) for p in paths]
    for x, y in batches:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for e, p in zip(expected, paths, strict=True):
            e += ref.get_submodule(p).weight.grad.to(DT) / 3
    for p, e in zip(paths, expected, strict=True):
        torch.testing.assert_close(G[p], e, rtol=1e-5, atol=1e-9)
    with pytest.raises(UserInputError, match="empty"):
        gradient_statistics(model, paths, [])


# ------------------------------------------------------------------------------------------------ plans
def test_weight_only_plan_warns_and_keeps_the_invariants(weight_only_plan) -> None:
    _, plan = weight_only_plan
    assert WEIGHT_ONLY_WARNING in plan.warnings
    assert "DATA=fashion-mnist" in WEIGHT_ONLY_WARNING
    assert plan.target["calibration"] is None
    entries = _cc_entries(plan)
    assert len(entries) == 20  # every conv but the stem: 18 block convs + 2 projections
    assert plan.layer("conv1").action == KEEP
    assert plan.layer("fc").action == KEEP
    assert all(e.info["fit"]["b"] > 0 for e in entries)  # spec §11.1
    assert plan.target["fallback_layers"] == []
    budget = plan.target["T"]
    assert sum(e.info["f_target"] for e in entries) == pytest.approx(budget, rel=1e-6)  # spec §11.2
    assert plan.target["sum_f_rel_error"] < 1e-6
    for e in entries:  # spec §11.3 (the overshoot bound is checked on trajectories above)
        assert e.info["reduction"] >= e.info["f_target"]
        assert e.info["f_target_rate"] <= MAX_RATE + 1e-12
    # flops_measure="model": the budget is bisected below 0.5 × MACs until the measured model (producer
    # thinning included) has 50 % fewer MACs; one more unit's worth of overshoot at most
    assert plan.target["flops_measure"] == "model"
    assert budget < 0.5 * plan.totals["macs_before"]
    assert 0.5 <= plan.target["achieved_flops_reduction"] <= 0.52
    assert plan.target["flops_reduction_layers"] < plan.target["achieved_flops_reduction"]


def test_layer_accounting_is_the_codes_budget(weight_only_plan) -> None:
    model, plan = weight_only_plan
    layers = plan_cc(model, CollaborativeConfig(flops=0.5, flops_measure="layers"), EXAMPLE)
    assert layers.target["T"] == pytest.approx(0.5 * layers.totals["macs_before"], rel=1e-12)
    assert layers.target["sum_f_rel_error"] < 1e-6
    # Σ own reductions ≥ T, and producer thinning removes more on top
    assert layers.target["achieved_flops_reduction"] > layers.target["flops_reduction_layers"] >= 0.5
    assert layers.target["achieved_flops_reduction"] > plan.target["achieved_flops_reduction"]


def test_plan_without_data_is_the_weight_only_planner(weight_only_plan) -> None:
    model, plan = weight_only_plan
    again = CC.plan(model, CC.make_config(), EXAMPLE, model_name="r20")
    assert again.to_dict() == plan.to_dict()


def test_producer_routes_follow_the_dependency_graph(weight_only_plan) -> None:
    _, plan = weight_only_plan
    for e in _cc_entries(plan):
        if e.path.endswith("conv2"):  # BasicBlock conv2 reads relu(bn1(conv1)) alone: thinned
            assert e.info["route"] == "thinned"
            if e.info["pruned"]:
                producer = e.path.replace("conv2", "conv1")
                assert e.info["producer"] == producer
                assert e.info["through"] == [e.path.replace("conv2", "bn1")]
                assert plan.layer(producer).info["out_keep"] == e.info["in_keep"]
                assert plan.layer(producer).info["thinned_by"] == e.path
        else:  # conv1 and the projections read the residual stream: gathered
            assert e.info["route"] == "gather"


def test_data_plan_records_calibration_and_counts_match_the_model(data_case) -> None:
    dense, compressed, plan = data_case
    assert WEIGHT_ONLY_WARNING not in plan.warnings
    assert plan.target["calibration"]["images"] == 32
    assert all(e.info["fit"]["b"] > 0 for e in _cc_entries(plan))
    assert count_macs(compressed, EXAMPLE) == plan.totals["macs_after"] == plan.totals["macs_after_measured"]
    assert count_params(compressed) == plan.totals["params_after"]
    # index buffers are not parameters
    selects = [m for m in compressed.modules() if isinstance(m, ChannelSelect)]
    assert selects
    assert plan.target["layers"]["gathered"] == len(selects)
    assert not any(p is m.index for m in selects for p in compressed.parameters())
    assert plan.target["achieved_flops_reduction"] == pytest.approx(
        1 - count_macs(compressed, EXAMPLE) / count_macs(dense, EXAMPLE)
    )


def test_saved_plan_rebuilds_the_architecture_on_a_fresh_model(data_case, tmp_path: Path) -> None:
    dense, compressed, plan = data_case
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    fresh = apply_plan_(_resnet20(seed=1), loaded, init="empty")
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    fresh.eval()
    x = torch.randn(4, 3, 16, 16, generator=_gen(7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), compressed(x), rtol=0, atol=1e-6)
    # init="decompose" on a copy of the dense model gives the same weights as cc_compress_
    again = apply_plan_(copy.deepcopy(dense), loaded)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), compressed(x), rtol=1e-5, atol=1e-5)


def test_registry_compress_takes_the_first_labelled_images_in_batches_of_128() -> None:
    """``get_method("cc").compress_(..., data=loader)`` = the old entry point on the loader's first n images."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = _gen(12)
    images, labels = torch.randn(170, 3, 16, 16, generator=gen), torch.randint(0, 10, (170,), generator=gen)
    loader = DataLoader(TensorDataset(images, labels), batch_size=48, shuffle=False)
    config = CollaborativeConfig(flops=0.3, calibration_samples=150, curve_points=8)
    dense = _resnet20(seed=12)
    via_registry = copy.deepcopy(dense)
    plan = CC.compress_(via_registry, config, EXAMPLE, data=loader, model_name="r20")
    old = copy.deepcopy(dense)
    batches = [(images[:128], labels[:128]), (images[128:150], labels[128:150])]  # gradient_batches(split, 150)
    reference = cc_compress_(old, config, EXAMPLE, batches, model_name="r20")
    assert plan.target["calibration"] == {**reference.target["calibration"], "images": 150, "batches": 2}
    assert plan.to_dict() == reference.to_dict()
    for (name, a), (_, b) in zip(via_registry.state_dict().items(), old.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # fewer images than calibration_samples: all of them; no data: the weight-only fallback
    few = CC.plan(dense, config, EXAMPLE, data=[(images[:20], labels[:20])], model_name="r20")
    assert few.target["calibration"]["images"] == 20
    assert WEIGHT_ONLY_WARNING in CC.plan(dense, config, EXAMPLE, model_name="r20").warnings
    with pytest.raises(UserInputError, match="labelled calibration data"):
        CC.plan(dense, config, EXAMPLE, data=[images[:20]])
    # rebuild_ = the saved plan filled from the dense weights
    rebuilt = CC.rebuild_(copy.deepcopy(dense), Plan.from_dict(plan.to_dict()))
    for (name, a), (_, b) in zip(rebuilt.state_dict().items(), old.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _masked_reference(dense: nn.Module, plan: Plan) -> nn.Module:
    """The dense model with every cc layer's weight replaced by its dense equivalent.

    Pruned input columns are zeroed and, when decomposed, the kept columns replaced by their top-r SVD;
    no channel is removed anywhere.
    """
    ref = copy.deepcopy(dense)
    for e in _cc_entries(plan):
        conv = ref.get_submodule(e.path)
        W = conv.weight.detach().to(DT)
        keep = e.info["in_keep"] or list(range(W.shape[1]))
        Wk = W[:, keep]
        if e.action == DECOMP:
            r = e.ranks[0]
            M = Wk.reshape(W.shape[0], -1).numpy()
            U, S, Vh = np.linalg.svd(M, full_matrices=False)
            Wk = torch.from_numpy((U[:, :r] * S[:r]) @ Vh[:r]).reshape(Wk.shape)
        new = torch.zeros_like(W)
        new[:, keep] = Wk
        with torch.no_grad():
            conv.weight.copy_(new.to(conv.weight.dtype))
    return ref


@pytest.mark.parametrize("decompose", [False, True])
def test_thinning_and_gathers_compute_the_masked_dense_model(decompose: bool) -> None:
    dense = _resnet20(seed=2)
    compressed = copy.deepcopy(dense)
    # weight-only scores decompose most layers of a random net; gradient scores prune them
    batches = None if decompose else _batches(seed=2)
    plan = cc_compress_(compressed, CollaborativeConfig(flops=0.4, decompose=decompose), EXAMPLE, batches)
    entries = _cc_entries(plan)
    assert any(e.info["input"] == "thinned" for e in entries)
    assert any(e.info["input"] == "gather" for e in entries)
    if not decompose:  # e = 0: each layer is one conv W[out_keep][:, in_keep] of the original weights
        assert all(e.ranks is None and e.action in (PRUNE, KEEP) for e in entries)
        for e in entries:
            if e.action == KEEP:
                continue
            module = compressed.get_submodule(e.path)
            conv = module[-1] if isinstance(module, nn.Sequential) else module
            W = dense.get_submodule(e.path).weight
            out = e.info["out_keep"] or list(range(W.shape[0]))
            inp = e.info["in_keep"] or list(range(W.shape[1]))
            assert torch.equal(conv.weight, W[out][:, inp])
    else:
        assert any(e.action == DECOMP for e in entries)
    ref = _masked_reference(dense, plan)
    x = torch.randn(4, 3, 16, 16, generator=_gen(8))
    with torch.no_grad():
        y_ref, y = ref(x), compressed.eval()(x)
    assert float((y - y_ref).abs().max()) < 1e-5 * max(1.0, float(y_ref.abs().max()))


def test_zero_channels_removed_from_a_chain_change_nothing() -> None:
    """Ground truth end to end: conv2's pruned inputs are exactly-zero channels, removed from conv1 and BN."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
    _randomize_bn_(model, 3).eval()
    zero = [0, 5, 9, 10, 11, 15]
    with torch.no_grad():
        model[3].weight[:, zero] = 0.0
    example = torch.zeros(1, 3, 8, 8)
    total = count_macs(model, example)
    conv2 = 16 * 16 * 9 * 64
    # only conv2 is compressed (the stem is kept), pruning alone: 6 zero channels are worth 6/16 of conv2
    flops = 0.3 * conv2 / total
    compressed = copy.deepcopy(model)
    plan = cc_compress_(compressed, CollaborativeConfig(flops=flops, decompose=False, keep_stem=True), example)
    e = plan.layer("3")
    assert sorted(set(range(16)) - set(e.info["in_keep"])) == sorted(e.info["pruned_order"])
    assert set(e.info["pruned_order"]) <= set(zero)
    assert e.info["input"] == "thinned"
    assert e.info["producer"] == "0"
    assert e.info["through"] == ["1"]
    assert compressed[0].out_channels == compressed[1].num_features == 16 - e.info["pruned"]
    assert isinstance(compressed[3], nn.Conv2d)
    x = torch.randn(3, 3, 8, 8, generator=_gen(9))
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), rtol=0, atol=1e-6)
    assert count_macs(compressed, example) == plan.totals["macs_after"]
    assert count_params(compressed) == plan.totals["params_after"]


def test_small_target_leaves_untargeted_layers_untouched() -> None:
    dense = _resnet20(seed=4)
    compressed = copy.deepcopy(dense)
    plan = cc_compress_(compressed, CollaborativeConfig(flops=0.02), EXAMPLE)
    entries = _cc_entries(plan)
    idle = [e for e in entries if e.info["f_target"] == 0]
    assert idle
    assert any(e.info["f_target"] > 0 for e in entries)
    for e in idle:
        assert e.ranks is None
        assert e.info["in_keep"] is None
        assert e.info["removals"] == 0
        W = dense.get_submodule(e.path).weight
        if e.action == KEEP:
            assert compressed.get_submodule(e.path).weight is not None
            assert torch.equal(compressed.get_submodule(e.path).weight, W)
        else:  # f_l = 0 but its consumer thins its outputs: the kept rows are the original rows
            assert e.action == PRUNE
            assert torch.equal(compressed.get_submodule(e.path).weight, W[e.info["out_keep"]])


def test_pruning_only_and_decomposition_only_arms() -> None:
    model = _resnet20(seed=5)
    prune_only = plan_cc(model, CollaborativeConfig(flops=0.4, decompose=False), EXAMPLE)
    decomp_only = plan_cc(model, CollaborativeConfig(flops=0.4, prune=False), EXAMPLE)
    p_entries, d_entries = _cc_entries(prune_only), _cc_entries(decomp_only)
    assert all(e.ranks is None for e in p_entries)
    assert sum(e.info["pruned"] for e in p_entries) > 0
    assert all(e.info["in_keep"] is None and e.info["out_keep"] is None for e in d_entries)
    assert all(e.action in (DECOMP, KEEP) for e in d_entries)
    for plan in (prune_only, decomp_only):
        compressed = apply_plan_(copy.deepcopy(model), plan)
        assert count_macs(compressed, EXAMPLE) == plan.totals["macs_after"]
        assert plan.target["achieved_flops_reduction"] >= 0.4
    compressed = apply_plan_(copy.deepcopy(model), decomp_only)
    assert not any(isinstance(m, ChannelSelect) for m in compressed.modules())


def test_ratio_target_is_met_within_three_percent() -> None:
    model = _resnet20(seed=6)
    plan = plan_cc(model, CollaborativeConfig(ratio=2.0), EXAMPLE)
    assert plan.target["control"] == "ratio"
    assert plan.target["achieved_ratio"] == pytest.approx(2.0, rel=0.03)
    assert plan.target["achieved_ratio"] >= 2.0
    assert plan.target["sum_f_rel_error"] < 1e-6
    compressed = apply_plan_(copy.deepcopy(model), plan)
    assert count_params(model) / count_params(compressed) == pytest.approx(plan.target["achieved_ratio"], rel=1e-12)


def test_unreachable_targets_state_the_maximum() -> None:
    model = _resnet20(seed=6)
    with pytest.raises(CompressionError) as exc:
        plan_cc(model, CollaborativeConfig(flops=0.97), EXAMPLE)
    assert "at most" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(CompressionError, match=r"RATIO=500 is not reachable .*×"):
        plan_cc(model, CollaborativeConfig(ratio=500.0), EXAMPLE)


def test_round_to_aligns_kept_channels_and_ranks() -> None:
    model = _resnet20(seed=7, width=1.0)
    plan = plan_cc(model, CollaborativeConfig(flops=0.5, round_to=4), EXAMPLE)
    for e in _cc_entries(plan):
        if e.info["pruned"]:
            kept = e.shape[1] - e.info["pruned"]
            assert kept % 4 == 0 or kept < 4
        if e.ranks:
            assert e.ranks[0] % 4 == 0 or e.ranks[0] < 4
        assert e.info["reduction"] >= e.info["f_target"]
    compressed = apply_plan_(copy.deepcopy(model), plan)
    assert count_macs(compressed, EXAMPLE) == plan.totals["macs_after"]


def test_bottleneck_conv2_and_conv3_inputs_are_thinned() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("cifar_resnet50_w0.125").eval()
    example = torch.zeros(1, 3, 8, 8)
    plan = plan_cc(model, CollaborativeConfig(flops=0.4), example)
    routes = {e.path: e.info["route"] for e in _cc_entries(plan)}
    assert routes["layer2.1.conv2"] == routes["layer2.1.conv3"] == "thinned"
    assert routes["layer2.1.conv1"] == routes["layer2.0.downsample.0"] == "gather"
    compressed = apply_plan_(copy.deepcopy(model), plan)
    assert count_macs(compressed, example) == plan.totals["macs_after"]
    assert count_params(compressed) == plan.totals["params_after"]


def test_sensitivity_curve_sampling_matches_the_full_curve() -> None:
    g = _gen(10)
    W = torch.randn(16, 8, 3, 3, generator=g)
    G = torch.randn(16, 8, 3, 3, generator=g)
    shape = _shape(W)
    c_full, l_full = sensitivity_curve(W, G, shape, points=0)
    c_few, l_few = sensitivity_curve(W, G, shape, points=8)
    assert c_few.size == 8
    assert c_full.size > c_few.size
    assert np.all(c_full > 0)
    pairs = {(round(float(c), 12), round(float(v), 6)) for c, v in zip(c_full, l_full, strict=True)}
    assert all((round(float(c), 12), round(float(v), 6)) in pairs for c, v in zip(c_few, l_few, strict=True))
    _, b_full = fit_exponential(c_full, l_full)
    _, b_few = fit_exponential(c_few, l_few)
    assert b_full > 0
    assert b_few > 0


def test_option_a_resnet56_matches_the_spec_baseline() -> None:
    """ResNet-56 with parameter-free option-A shortcuts: 125.49 M MACs, 848,954 conv/FC weights, 4,064 BN params."""

    class ShortcutA(nn.Module):
        def __init__(self, pad: int) -> None:
            super().__init__()
            self.pad = pad

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    model = create_model("cifar_resnet56")
    for stage in (model.layer2, model.layer3):
        stage[0].downsample = ShortcutA(stage[0].conv1.out_channels // 4)
    x = torch.zeros(1, 3, 32, 32)
    assert count_macs(model, x) / 1e6 == pytest.approx(125.49, abs=0.005)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    weights = sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert (weights, bn) == (848_954, 4_064)


def test_cli_run_writes_a_cc_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "r20" / "cc"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress",
            "run",
            "--model",
            "cifar_resnet20_w0.5",
            "--weights",
            "random",
            "--input-size",
            "16",
            "--method",
            "cc",
            "--flops",
            "0.4",
            "--cc-gamma",
            "0.8",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run_dir / "compress.json").read_text())
    assert info["method"] == "cc"
    assert info["config"]["gamma"] == 0.8
    assert info["config"]["round_to"] == cpu_rank_multiple()  # --round-to auto aligns cc to the CPU's blocking too
    assert info["ratios"]["flops_reduction"] >= 0.4
    assert any(w == WEIGHT_ONLY_WARNING for w in info["warnings"])
    assert "WARNING: cc: no calibration data" in proc.stdout

    from compress.artifacts import load_run

    run = load_run(run_dir)
    x = torch.randn(2, 3, 16, 16, generator=_gen(11))
    with torch.no_grad():
        y = run.compressed(x)
    assert count_macs(run.compressed, torch.zeros(1, 3, 16, 16)) == run.plan.totals["macs_after"]
    assert y.shape == (2, 10)


def test_a_layer_without_gradient_falls_back_to_untouched() -> None:
    model = _resnet20(seed=8)
    with torch.no_grad():
        model.layer1[0].bn2.weight.zero_()  # the block's residual branch is multiplied by 0: dL/dW ≡ 0 in it
    compressed = copy.deepcopy(model)
    plan = cc_compress_(compressed, CollaborativeConfig(flops=0.3), EXAMPLE, _batches(seed=8))
    assert plan.target["fallback_layers"] == ["layer1.0.conv1", "layer1.0.conv2"]
    for name in ("conv1", "conv2"):
        entry = plan.layer(f"layer1.0.{name}")
        assert entry.action == KEEP
        assert entry.info["f_target"] == 0.0
        assert entry.info["fit"]["b"] is None
        assert "needs b > 0" in entry.reason
        assert any(w.startswith(f"cc: layer1.0.{name}: sensitivity fit gave b = nan") for w in plan.warnings)
        assert torch.equal(getattr(compressed.layer1[0], name).weight, getattr(model.layer1[0], name).weight)
    fitted = [e for e in _cc_entries(plan) if e.info["fallback"] is None]
    assert all(e.info["fit"]["b"] > 0 for e in fitted)
    assert sum(e.info["f_target"] for e in fitted) == pytest.approx(plan.target["T"], rel=1e-6)


def test_lagrangian_weighting_equalises_slope_per_mac() -> None:
    model = _resnet20(seed=9)
    plan = plan_cc(model, CollaborativeConfig(flops=0.4, weighting="lagrangian"), EXAMPLE)
    entries = _cc_entries(plan)
    assert sum(e.info["f_target"] for e in entries) == pytest.approx(plan.target["T"], rel=1e-6)
    interior = [e for e in entries if 1e-9 < e.info["f_target_rate"] < e.info["cap_rate"] - 1e-9]
    assert interior
    for e in interior:  # log(a b e^{b c} / F_l) = log λ for every layer strictly inside its bounds
        fit, c = e.info["fit"], e.info["f_target_rate"]
        value = fit["log_a"] + math.log(fit["b"]) + fit["b"] * c - math.log(e.macs_before)
        assert value == pytest.approx(plan.target["log_x"], abs=1e-8)


def test_cli_options_map_onto_the_config() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("cc")
    for option in CC.options:
        option.add_to(group)
    flags = {o.flag for o in CC.options}
    assert {"--cc-gamma", "--cc-mode", "--cc-weighting", "--cc-curve-points"} <= flags  # today's spellings
    assert {"--calibration-samples", "--round-to", "--exclude"} <= flags

    def config(*extra: str, target: Target | None = None):
        args = vars(parser.parse_args(list(extra)))
        fields: dict = {}
        for option in CC.options:
            if args[option.dest] is not None:
                fields.update(option.config_fields(args[option.dest]))
        return CC.make_config(target, **fields)

    cfg = config("--cc-mode", "prune", "--cc-gamma", "0.5", "--round-to", "auto", target=Target("flops", 0.4))
    expected = (0.4, None, False, True, 0.5, cpu_rank_multiple())
    assert (cfg.flops, cfg.ratio, cfg.decompose, cfg.prune, cfg.gamma, cfg.round_to) == expected
    assert config("--round-to", "1").round_to == 1  # the paper's unrounded counts
    cfg = config("--cc-mode", "decompose", "--round-to", "8", "--calibration-samples", "64")
    assert (cfg.ratio, cfg.flops, cfg.prune, cfg.round_to, cfg.calibration_samples) == (None, 0.5, False, 8, 64)
    cfg = config("--cc-mode", "both", "--cc-weighting", "lagrangian", "--cc-curve-points", "0", "--exclude", "fc")
    assert (cfg.decompose, cfg.prune, cfg.weighting, cfg.curve_points, cfg.exclude) == (
        True,
        True,
        "lagrangian",
        0,
        ("fc",),
    )
    with pytest.raises(SystemExit):
        config("--cc-mode", "neither")


def test_cli_without_a_target_runs_at_flops_half() -> None:
    """``python -m compress run --method cc`` with no target: CC's documented FLOPS=0.5 (was RATIO=4)."""
    from compress.cli import build_parser
    from compress.cli.options import config_from_args

    def config(*extra: str):
        return config_from_args(build_parser().parse_args(["run", "--model", "m", "--run-dir", "d", *extra]))

    cfg = config("--method", "cc", "--cc-mode", "prune", "--cc-gamma", "0.5")
    expected = (0.5, None, False, True, 0.5, cpu_rank_multiple())
    assert (cfg.flops, cfg.ratio, cfg.decompose, cfg.prune, cfg.gamma, cfg.round_to) == expected
    assert (config("--method", "cc", "--ratio", "3").ratio, config("--method", "cc", "--flops", "0.4").flops) == (
        3,
        0.4,
    )
    with pytest.raises(UserInputError, match="--cc-gamma does not apply to --method tucker2"):
        config("--method", "tucker2", "--cc-gamma", "0.5")


def test_a_plan_for_another_model_is_refused(weight_only_plan) -> None:
    _, plan = weight_only_plan
    with pytest.raises(CompressionError, match=r"plan does not match the model: layer1\.0\.conv1 is not a Conv2d"):
        apply_plan_(_resnet20(width=1.0), Plan.from_dict(plan.to_dict()), init="empty")
    broken = Plan.from_dict(plan.to_dict())
    entry = next(e for e in broken.layers if e.action == DECOMP)
    entry.ranks = [10_000]
    with pytest.raises(CompressionError, match=f"plan rank \\[10000\\] of {entry.path} is not in 1.."):
        apply_plan_(_resnet20(), broken)
