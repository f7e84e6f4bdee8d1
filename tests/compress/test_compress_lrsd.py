"""Low-rank + sparse decomposition (LRSD): solver special cases, 2:4 structure, module parity, calibration, plans."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress import Plan, apply_plan_, method_config, plan_compression
from compress.methods.lrsd import (
    WEIGHT_ONLY_WARNING,
    LayerStats,
    LowRankSparse,
    LowRankSparseConfig,
    allocate_ratios,
    collect_stats,
    data_problem,
    layer_storage,
    lrsd_compress_,
    project_sparse,
    response_error,
    sensitivity_sweep,
    solve_lrsd,
    split_budget,
)
from compress.metrics import count_macs, count_params

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The solver is many small float64 matmuls: on 2 shared cores OpenMP spinning makes them ~100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted(m: int, k: int, r: int, c: int, seed: int = 0, noise: float = 1e-3):
    g = _gen(seed)
    L0 = torch.randn(m, r, generator=g, dtype=DT) @ torch.randn(r, k, generator=g, dtype=DT)
    S0 = torch.zeros(m * k, dtype=DT)
    idx = torch.randperm(m * k, generator=g)[:c]
    S0[idx] = (8.0 + torch.rand(c, generator=g, dtype=DT)) * torch.sign(torch.randn(c, generator=g, dtype=DT))
    S0 = S0.reshape(m, k)
    return L0, S0, L0 + S0 + noise * torch.randn(m, k, generator=g, dtype=DT)


def _correlated_gram(k: int, n: int, seed: int = 1) -> torch.Tensor:
    """X Xᵀ of correlated inputs (decaying channel scales, mixed by a random matrix)."""
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g, dtype=DT) / k**0.5
    X = mix @ (torch.randn(k, n, generator=g, dtype=DT) * torch.linspace(0.2, 2.0, k, dtype=DT)[:, None])
    return X @ X.T


def _ridge(G: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    k = G.shape[0]
    return G + lam * float(torch.trace(G)) / k * torch.eye(k, dtype=DT)


# ------------------------------------------------------------------------------------------------ solver
@pytest.mark.parametrize("weighted", [False, True])
def test_recovers_planted_low_rank_plus_sparse(weighted: bool) -> None:
    L0, S0, W = _planted(40, 72, 4, 120)
    C = _ridge(_correlated_gram(72, 600)) if weighted else None
    res = solve_lrsd(W, 4, 120, metric=C, iters=20)
    assert torch.equal(res.S != 0, S0 != 0)  # support exactly
    assert float((res.L - L0).norm() / L0.norm()) < 1e-2
    assert float((res.S - S0).norm() / S0.norm()) < 1e-2


def test_card_zero_equals_closed_form_data_aware_low_rank() -> None:
    g = _gen(3)
    m, k, r = 24, 60, 5
    # decaying spectrum with a clear gap after r so the subspace iteration converges to machine precision
    W = (
        torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT)).Q
        @ torch.diag(torch.cat([torch.linspace(10, 6, r, dtype=DT), torch.linspace(1, 0.1, m - r, dtype=DT)]))
        @ torch.randn(m, k, generator=g, dtype=DT).div(k**0.5)
    )
    G = _correlated_gram(k, 400)
    stats = LayerStats(gram=G)
    target, C = data_problem(W, stats, lam=1e-3)
    res = solve_lrsd(target, r, 0, metric=C, iters=60, tol=0.0)
    # independent closed form (NumPy): L = P Pᵀ W*, P = top-r eigenvectors of W* C_λ W*ᵀ
    Wn, Cn = W.numpy(), _ridge(G).numpy()
    _, vecs = np.linalg.eigh(Wn @ Cn @ Wn.T)
    P = vecs[:, -r:]
    closed = P @ P.T @ Wn
    assert np.abs(res.L.numpy() - closed).max() / np.abs(closed).max() < 1e-8
    assert res.S.abs().max() == 0


def test_card_zero_asymmetric_target_matches_closed_form() -> None:
    g = _gen(4)
    m, k, n, r = 12, 30, 300, 3
    W = torch.randn(m, r, generator=g, dtype=DT) @ torch.randn(r, k, generator=g, dtype=DT)
    W = W + 0.05 * torch.randn(m, k, generator=g, dtype=DT)  # rank-r dominant: a clear eigen-gap
    Xd = torch.randn(k, n, generator=g, dtype=DT)
    Xc = Xd + 0.3 * torch.randn(k, n, generator=g, dtype=DT)  # inputs from a perturbed (compressed) prefix
    stats = LayerStats(gram=Xc @ Xc.T, cross=Xd @ Xc.T, gram_dense=Xd @ Xd.T, columns=n)
    target, C = data_problem(W, stats, lam=1e-3)
    lam = 1e-3 * float(torch.trace(Xc @ Xc.T)) / k
    Cn = (Xc @ Xc.T).numpy() + lam * np.eye(k)
    Wstar = np.linalg.solve(Cn, (W.numpy() @ Xd.numpy() @ Xc.numpy().T + lam * W.numpy()).T).T
    np.testing.assert_allclose(target.numpy(), Wstar, rtol=1e-9, atol=1e-10)
    res = solve_lrsd(target, r, 0, metric=C, iters=80, tol=0.0)
    _, vecs = np.linalg.eigh(Wstar @ Cn @ Wstar.T)
    closed = vecs[:, -r:] @ vecs[:, -r:].T @ Wstar
    assert np.abs(res.L.numpy() - closed).max() / np.abs(closed).max() < 1e-6
    # the response error identity used for reporting agrees with the explicit product
    Y = W.numpy() @ Xd.numpy()
    explicit = np.linalg.norm(Y - res.L.numpy() @ Xc.numpy()) / np.linalg.norm(Y)
    assert response_error(W, res.L, stats) == pytest.approx(explicit, rel=1e-9)


def test_card_zero_weight_only_matches_truncated_svd_within_1_percent() -> None:
    W = torch.randn(50, 80, generator=_gen(5), dtype=DT)
    res = solve_lrsd(W, 10, 0, iters=0, godec_iters=30)
    s = torch.linalg.svdvals(W)
    best = float(s[10:].norm())
    assert float((W - res.L).norm()) <= 1.01 * best


def test_rank_zero_weight_only_is_magnitude_pruning() -> None:
    W = torch.randn(20, 30, generator=_gen(6), dtype=DT)
    res = solve_lrsd(W, 0, 100)
    thr = W.abs().flatten().sort(descending=True).values[99]
    assert torch.equal(res.S, torch.where(W.abs() >= thr, W, torch.zeros_like(W)))
    assert res.U.shape == (20, 0)


@pytest.mark.parametrize("s_step", ["grasp", "hard"])
def test_rank_zero_data_aware_is_pruning_with_least_squares_refit(s_step: str) -> None:
    m, k, c = 10, 24, 60
    W = torch.randn(m, k, generator=_gen(7), dtype=DT)
    C = _ridge(_correlated_gram(k, 200))
    res = solve_lrsd(W, 0, c, metric=C, s_step=s_step, iters=20)
    S, Wn, Cn = res.S.numpy(), W.numpy(), C.numpy()
    assert int((S != 0).sum()) == c
    # closed form of data-aware pruning on the chosen support: per row, C_TT s_T = (C w)_T
    for i in range(m):
        T = np.flatnonzero(S[i])
        expect = np.linalg.solve(Cn[np.ix_(T, T)], (Cn @ Wn[i])[T]) if len(T) else np.zeros(0)
        np.testing.assert_allclose(S[i, T], expect, rtol=1e-8, atol=1e-10)

    # and the data-aware support is no worse than the magnitude support refitted the same way
    def refit_objective(mask: np.ndarray) -> float:
        P = np.zeros_like(Wn)
        for i in range(m):
            T = np.flatnonzero(mask[i])
            if len(T):
                P[i, T] = np.linalg.solve(Cn[np.ix_(T, T)], (Cn @ Wn[i])[T])
        E = Wn - P
        return 0.5 * float(np.sum((E @ Cn) * E))

    magnitude = project_sparse(W, c).numpy()
    assert res.history[-1] <= refit_objective(magnitude) * (1 + 1e-12)
    assert res.history[-1] == pytest.approx(refit_objective(S != 0), rel=1e-9)


@pytest.mark.parametrize(("s_step", "structured"), [("grasp", "none"), ("hard", "none"), ("grasp", "2:4")])
def test_objective_never_rises(s_step: str, structured: str) -> None:
    g = _gen(8)
    m, k = 16, 8 * 9
    W = torch.randn(m, k, generator=g, dtype=DT)
    C = _ridge(_correlated_gram(k, 300), lam=1e-4)
    res = solve_lrsd(W, 3, 200, metric=C, s_step=s_step, structured=structured, taps=9, iters=25, tol=0.0)
    h = res.history
    assert len(h) >= 3
    assert all(b <= a for a, b in itertools.pairwise(h))
    assert h[-1] < 0.9 * h[0]  # the weighted refinement improves on the GoDec warm start
    E = W - res.approx
    assert h[-1] == pytest.approx(0.5 * float(((E @ C) * E).sum()), rel=1e-10)


def test_stops_on_relative_decrease() -> None:
    _, _, W = _planted(20, 30, 2, 40, noise=0.0)
    res = solve_lrsd(W, 2, 40, metric=_ridge(_correlated_gram(30, 100)), iters=50, tol=1e-5)
    assert res.converged
    assert res.iterations < 50
    h = res.history
    assert h[-2] - h[-1] <= 1e-5 * h[-2]


def test_two_four_pattern_holds_exactly() -> None:
    m, s, taps = 6, 8, 9
    W = torch.randn(m, s * taps, generator=_gen(9), dtype=DT)
    C = _ridge(_correlated_gram(s * taps, 300))
    full = solve_lrsd(W, 1, m * s * taps // 2, metric=C, structured="2:4", taps=taps, iters=5)
    per_group = (full.S != 0).reshape(m, s // 4, 4, taps).sum(2)
    assert torch.equal(per_group, torch.full_like(per_group, 2))  # c = m·k/2: exactly two of every four
    part = solve_lrsd(W, 1, 50, metric=C, structured="2:4", taps=taps, iters=5)
    assert int((part.S != 0).sum()) == 50
    assert int((part.S != 0).reshape(m, s // 4, 4, taps).sum(2).max()) <= 2
    # groups run along input channels at a fixed tap: channel s, tap p is column s·taps + p
    mask = project_sparse(torch.arange(1.0, 17.0).reshape(1, 16), 16, structured="2:4", taps=1)
    assert mask.reshape(4, 4).sum(1).tolist() == [2, 2, 2, 2]
    assert mask[0, [2, 3, 6, 7, 10, 11, 14, 15]].all()


# ------------------------------------------------------------------------------------------------ module
@pytest.mark.parametrize(("rank", "card"), [(3, 40), (0, 40), (3, 0)])
def test_conv_module_equals_one_conv_with_l_plus_s(rank: int, card: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, bias=True).double()
    W = conv.weight.detach().reshape(12, -1)
    res = solve_lrsd(W, rank, card, iters=3)
    module = LowRankSparse.from_factors(conv, res.U, res.V, res.S)
    x = torch.randn(2, 8, 11, 9, dtype=DT)
    ref = F.conv2d(x, res.approx.reshape(conv.weight.shape), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(module(x), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.dense_weight(), res.approx.reshape(conv.weight.shape), atol=1e-12, rtol=0)
    kinds = [type(m) for m in module.modules() if m is not module and not isinstance(m, nn.Sequential)]
    assert set(kinds) == {nn.Conv2d}
    assert (module.lowrank is None) == (rank == 0)
    assert (module.sparse is None) == (card == 0)


def test_linear_module_equals_one_linear_with_l_plus_s() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(20, 7).double()
    res = solve_lrsd(lin.weight.detach(), 2, 30, iters=3)
    module = LowRankSparse.from_factors(lin, res.U, res.V, res.S)
    x = torch.randn(5, 20, dtype=DT)
    torch.testing.assert_close(module(x), F.linear(x, res.approx, lin.bias), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ calibration
def _explicit_patches(x: torch.Tensor, kh: int, kw: int, stride: int, pad: int) -> torch.Tensor:
    """The n × (S·kh·kw) patch matrix built by loops (independent of F.unfold)."""
    xp = F.pad(x, (pad, pad, pad, pad))
    n, _, h, w = xp.shape
    rows = []
    for b in range(n):
        for i in range(0, h - kh + 1, stride):
            for j in range(0, w - kw + 1, stride):
                rows.append(xp[b, :, i : i + kh, j : j + kw].reshape(-1))
    return torch.stack(rows).to(DT)


def test_gram_accumulation_equals_explicit_patch_product() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    batches = [torch.randn(2, 3, 7, 7), torch.randn(3, 3, 7, 7)]
    stats = collect_stats(model, ["0", "3"], batches, positions_per_image=0)
    X = torch.cat([_explicit_patches(b, 3, 3, 2, 1) for b in batches])
    torch.testing.assert_close(stats["0"].gram, X.T @ X, atol=1e-10, rtol=1e-12)
    assert stats["0"].columns == 5 * 16
    assert stats["0"].symmetric
    with torch.no_grad():
        H = torch.cat([model[:3](b) for b in batches]).to(DT)
    torch.testing.assert_close(stats["3"].gram, H.T @ H, atol=1e-10, rtol=1e-12)
    sampled = collect_stats(model, ["0"], batches, positions_per_image=5)
    assert sampled["0"].columns == 5 * 5


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_asymmetric_statistics_come_from_the_compressed_prefix() -> None:
    torch.manual_seed(0)
    dense = _TwoLayer().eval()
    batches = [torch.randn(4, 4, 6, 6) for _ in range(2)]
    comp = copy.deepcopy(dense)
    W = comp.a.weight.detach().reshape(8, -1)
    res = solve_lrsd(W, 1, 10, iters=2)
    comp.a = LowRankSparse.from_factors(comp.a, res.U, res.V, res.S)
    stats = collect_stats(comp, ["b"], batches, reference=dense, positions_per_image=0)["b"]
    with torch.no_grad():
        hc = [torch.relu(comp.a(b)) for b in batches]
        hd = [torch.relu(dense.a(b)) for b in batches]
    Xc = torch.cat([_explicit_patches(h, 3, 3, 1, 1) for h in hc])
    Xd = torch.cat([_explicit_patches(h, 3, 3, 1, 1) for h in hd])
    torch.testing.assert_close(stats.gram, Xc.T @ Xc, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(stats.cross, Xd.T @ Xc, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(stats.gram_dense, Xd.T @ Xd, atol=1e-9, rtol=1e-12)
    assert float((stats.gram - stats.gram_dense).norm()) > 1e-2 * float(stats.gram.norm())  # it matters here

    # end to end: the asymmetric fit of layer b corrects layer a's error, so the network output is closer
    def output_error(mode: str) -> float:
        model = copy.deepcopy(dense)
        cfg = LowRankSparseConfig(ratio=3.0, mode=mode, split="fixed", keep_stem=False, positions_per_image=0, iters=10)
        lrsd_compress_(model, cfg, batches[0][:1], batches, model_name="two")
        with torch.no_grad():
            ref = torch.cat([dense(b) for b in batches])
            out = torch.cat([model(b) for b in batches])
        return float((out - ref).norm() / ref.norm())

    assert output_error("asymmetric") < output_error("symmetric")


# ------------------------------------------------------------------------------------------------ budget / plan
def test_budget_split_arithmetic() -> None:
    m, k = 64, 576
    budget = m * k // 4  # 9216
    assert split_budget(m, k, budget, 0.0) == (0, 9216)
    assert split_budget(m, k, budget, 1.0) == (14, 9216 - 14 * 640)  # floor(9216/640) = 14
    assert split_budget(m, k, budget, 0.5) == (7, 9216 - 7 * 640)
    assert split_budget(m, k, budget, 0.5, charge_index=True) == (7, (9216 - 7 * 640 - 65) // 2)
    assert split_budget(m, k, budget, 0.0, max_card=m * k // 2)[1] == 9216
    st = layer_storage(m, k, 7, 4736)
    assert st == {"values": 9216, "index": 4736 + 65, "values_plus_index": 9216 + 4801, "dense_storage": 4480 + m * k}
    st24 = layer_storage(m, k, 7, 4736, structured="2:4")
    assert st24["values_2to4"] == 4480 + m * k // 2
    assert st24["metadata_bits_2to4"] == m * k


def test_conv_fc_allocation_arithmetic() -> None:
    weights, fc = {"c1": 1000, "c2": 3000, "fc": 8000}, {"c1": False, "c2": False, "fc": True}
    cfg = LowRankSparseConfig(allocation="conv_fc", fc_factor=4.0)
    ratios, summary = allocate_ratios(weights, fc, 500, 500 + 2000, cfg)
    assert summary["fc_ratio"] == pytest.approx(4 * summary["conv_ratio"])
    assert ratios["fc"] == pytest.approx(4 * ratios["c1"])
    assert ratios["c1"] == ratios["c2"]
    assert 4000 / ratios["c1"] + 8000 / ratios["fc"] == pytest.approx(2000)
    fixed = LowRankSparseConfig(allocation="conv_fc", conv_ratio=2.0, layer_ratios=(("c1", 10.0),))
    ratios, _ = allocate_ratios(weights, fc, 500, 2500, fixed)
    assert ratios["c1"] == 10.0
    assert ratios["c2"] == 2.0
    assert 100 + 1500 + 8000 / ratios["fc"] == pytest.approx(2000)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(x + self.c2(x))
        return self.fc(x.mean((2, 3)))


def _small() -> nn.Module:
    torch.manual_seed(0)
    return _Small().eval()


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(8, 1, 12, 12, generator=g) for _ in range(n)]


def test_plan_counts_and_ratio() -> None:
    model = _small()
    x = torch.randn(1, 1, 12, 12)
    cfg = method_config("lrsd", ratio=3.0, split="fixed", s_step="hard")
    plan = lrsd_compress_(model, cfg, x, _batches(), model_name="small")
    assert plan.method == "lrsd"
    assert plan.warnings == []
    assert plan.layer("stem").action == "keep"
    for e in plan.factorized_layers:
        m, k = e.info["m"], e.info["k"]
        assert e.ranks[0] * (m + k) + e.info["cardinality"] <= e.info["budget"] <= m * k / e.info["layer_ratio"]
    assert plan.target["achieved_ratio"] == pytest.approx(3.0, rel=0.01)
    # what count_params/count_macs see is the exported structure: dense-with-zeros sparse branch
    assert count_params(model) == plan.totals["params_after_dense_storage"] == plan.totals["params_after_measured"]
    assert count_macs(model, x) == plan.totals["macs_after"]
    assert plan.totals["macs_after_sparse_kernel"] < plan.totals["macs_before"] < plan.totals["macs_after"]
    assert plan.totals["params_after"] < plan.totals["params_after_with_index"] < plan.totals["params_before"]


def test_plan_json_round_trip_and_empty_reapply(tmp_path) -> None:
    dense = _small()
    model = copy.deepcopy(dense)
    x = torch.randn(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=3.0, split="search", split_grid=3, split_iters=1, iters=3)
    plan = lrsd_compress_(model, cfg, x, _batches(), model_name="small")
    assert all("split_trials" in e.info for e in plan.factorized_layers)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == plan.to_dict()
    rebuilt = apply_plan_(copy.deepcopy(dense), loaded, init="empty")
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


def test_weight_only_fallback_warns() -> None:
    model = _small()
    x = torch.randn(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=3)
    plan = lrsd_compress_(model, cfg, x, None, model_name="small")
    assert WEIGHT_ONLY_WARNING in plan.warnings
    assert WEIGHT_ONLY_WARNING.startswith("no calibration data: solved the weight-only problem (")
    assert all(e.info["weight_only"] for e in plan.factorized_layers)
    other = _small()
    plan2 = plan_compression(other, cfg, x, model_name="small")
    apply_plan_(other, plan2)
    assert WEIGHT_ONLY_WARNING in plan2.warnings
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-6, rtol=1e-5)


def test_structured_two_four_model_and_weights() -> None:
    model = _small()
    x = torch.randn(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=1.5, structured="2:4", split="fixed", rank_fraction=0.2, iters=3)
    plan = lrsd_compress_(model, cfg, x, _batches(), model_name="small")
    assert "macs_after_2to4" in plan.totals
    for e in plan.factorized_layers:
        layer = model.get_submodule(e.path)
        assert isinstance(layer, LowRankSparse)
        assert layer.sparse is not None
        w = layer.sparse.weight.detach()
        t, s = w.shape[0], w.shape[1]
        taps = w[0, 0].numel()
        nz = (w.reshape(t, s // 4, 4, taps) != 0).sum(2)
        assert int(nz.max()) <= 2


def test_sensitivity_sweep_error_grows_with_ratio() -> None:
    model = _small()
    cfg = LowRankSparseConfig(split="fixed", iters=3)
    sweep = sensitivity_sweep(model, ["c1", "c2"], [2.0, 8.0], _batches(), cfg, output_error=True)
    for path in ("c1", "c2"):
        assert sweep[path][2.0]["response_error"] < sweep[path][8.0]["response_error"]
        assert sweep[path][2.0]["output_error"] < sweep[path][8.0]["output_error"]


def test_bad_options_are_refused() -> None:
    from compress import UserInputError

    with pytest.raises(UserInputError, match="RATIO"):
        LowRankSparseConfig(ratio=None)
    with pytest.raises(UserInputError, match="s_step"):
        LowRankSparseConfig(s_step="soft")
    with pytest.raises(UserInputError, match="does not take"):
        method_config("lrsd", ratio=4.0, hooi_iters=2)


def test_saved_plan_is_resolved_identically_with_data() -> None:
    first = _small()
    x = torch.randn(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=3)
    plan = lrsd_compress_(first, cfg, x, _batches(), model_name="small")
    again = _small()
    replay = Plan.from_dict(plan.to_dict())
    lrsd_compress_(again, LowRankSparseConfig.from_dict(replay.config), x, _batches(), plan=replay)
    assert [e.ranks for e in replay.layers] == [e.ranks for e in plan.layers]
    with torch.no_grad():
        torch.testing.assert_close(again(x), first(x), atol=1e-6, rtol=1e-6)


def test_equal_budget_low_rank_plus_sparse_beats_either_alone() -> None:
    """Spec §1.4/§3.6 (values depend on the draw): decaying-spectrum layer, budget 2512 (7.3×)."""
    g = _gen(0)
    m, k, n = 64, 288, 1000
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT)).Q
    V = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=DT)).Q
    W = (U * torch.arange(1, m + 1, dtype=DT).reciprocal()) @ V.T
    mix = torch.randn(k, k, generator=g, dtype=DT) / k**0.5
    X = mix @ (torch.randn(k, n, generator=g, dtype=DT) * torch.linspace(0.2, 2.0, k, dtype=DT)[:, None])
    stats = LayerStats(gram=X @ X.T)
    target, C = data_problem(W, stats)
    err = {}
    for r, c in [(7, 0), (4, 1104), (0, 2512)]:
        assert r * (m + k) + c <= 2512
        weighted = response_error(W, solve_lrsd(target, r, c, metric=C, iters=15).approx, stats)
        plain = response_error(W, solve_lrsd(W, r, c, iters=15).approx, stats)
        assert weighted < plain
        err[r] = weighted
    assert err[4] < 0.9 * err[7]
    assert err[4] < 0.6 * err[0]


@pytest.mark.parametrize("parts", ["lowrank", "sparse"])
def test_equal_budget_ablations_drop_one_part(parts: str) -> None:
    """parts=lowrank is c = 0 (no sparse branch at all), parts=sparse is r = 0 (pruning), at L + S's budget."""
    x = torch.randn(1, 1, 12, 12)
    both = lrsd_compress_(_small(), LowRankSparseConfig(ratio=3.0, split="fixed", iters=3), x, _batches())
    model = _small()
    plan = lrsd_compress_(model, LowRankSparseConfig(ratio=3.0, parts=parts, iters=3), x, _batches())
    assert "split_trials" not in plan.factorized_layers[0].info  # no split search in an ablation
    for entry in plan.factorized_layers:
        m, k = entry.info["m"], entry.info["k"]
        rank, card = entry.ranks[0], entry.info["cardinality"]
        assert (card == 0 and rank >= 1) if parts == "lowrank" else (rank == 0 and card >= 1)
        assert rank * (m + k) + card <= entry.info["budget"]
    modules = [model.get_submodule(e.path) for e in plan.factorized_layers]
    if parts == "lowrank":  # only the low-rank branch is built: no dense-with-zeros conv, MACs drop
        assert all(isinstance(mod, LowRankSparse) and mod.sparse is None for mod in modules)
        assert count_macs(model, x) < plan.totals["macs_before"]
    else:
        assert all(mod.lowrank is None for mod in modules)
    # equal parameter budget: stored values within one layer's rounding of the L + S plan
    slack = max(e.info["m"] + e.info["k"] for e in plan.factorized_layers) * len(plan.factorized_layers)
    assert abs(plan.totals["params_after"] - both.totals["params_after"]) <= slack


@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (make data installs the Debian package dataset-fashion-mnist)",
)
@pytest.mark.parametrize("structured", ["none", "2:4"])
def test_finetuning_keeps_the_sparse_support_and_the_two_four_pattern(structured: str) -> None:
    """The Trainer freezes every LRSD layer's support: S keeps its zeros (and 2:4 pattern) while it learns."""
    from compress.data import calibration_subset, load_data
    from compress.train import TrainConfig, Trainer
    from compress.zoo import create_model

    data = load_data("fashion-mnist")
    train = data.train.subset(calibration_subset(data.train, 256, seed=1).indices)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, in_channels=1, width=0.25).eval()
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=2, structured=structured)
    lrsd_compress_(model, cfg, torch.zeros(1, 1, 28, 28), None)
    layers = [m for m in model.modules() if isinstance(m, LowRankSparse) and m.sparse is not None]
    before = [m.sparse.weight.detach().clone() for m in layers]
    Trainer(model, TrainConfig(epochs=1, lr=0.05, max_steps=4, batch_size=64), train, None, progress=False).fit()
    changed = 0
    for m, w0 in zip(layers, before, strict=True):
        w = m.sparse.weight.detach()
        assert torch.equal(w == 0, w0 == 0)  # exactly the same support
        changed += int(not torch.equal(w, w0))
        if structured == "2:4":  # at most 2 non-zeros in every group of 4 input channels
            groups = (w != 0).transpose(0, 1).reshape(w.shape[1] // 4, 4, -1).sum(1)
            assert int(groups.max()) <= 2
    assert changed == len(layers)  # the values on the support did train
    assert not any(key.endswith("support_mask") for key in model.state_dict())  # not saved with the weights
    assert all(hasattr(m, "support_mask") for m in layers)


# ------------------------------------------------------------------------------------- the method contract
def _split(n: int = 150):
    """A small in-memory 1×12×12 training split (uint8 images, 10 classes)."""
    from compress.data import DataInfo, TensorSplit

    g = _gen(11)
    images = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    info = DataInfo("toy", "tensor", "", 10, 1, 12, (0.5,), (0.25,), tuple("0123456789"), n, 0)
    return TensorSplit(
        images, labels, info=info, name="train", augment=True, mean=(0.5,), std=(0.25,), pad=0, flip=False
    )


def test_registry_method_declares_its_contract() -> None:
    from compress import UserInputError
    from compress.methods import get_method
    from compress.methods.base import CALIBRATION_SAMPLES, EXCLUDE, Needs
    from compress.targets import Target

    method = get_method("lrsd")
    assert method.config_type is LowRankSparseConfig
    assert method.needs is Needs.IMAGES
    assert not method.requires_data
    flags = [o.flag for o in method.options]
    assert flags == [
        "--s-step",
        "--structured",
        "--lrsd-mode",
        "--calibration-samples",
        "--split",
        "--lrsd-parts",
        "--exclude",
    ]
    assert CALIBRATION_SAMPLES in method.options
    assert EXCLUDE in method.options
    assert method.make_config() == LowRankSparseConfig(ratio=4.0)
    assert method.make_config(Target("flops", 0.5), split="fixed") == LowRankSparseConfig(flops=0.5, split="fixed")
    for bad in (float("inf"), float("nan"), 1.0):
        with pytest.raises(UserInputError, match="RATIO"):
            LowRankSparseConfig(ratio=bad)


def test_registry_compress_equals_the_old_entry_point_on_a_data_loader() -> None:
    """``get_method("lrsd").compress_(data=loader)`` = ``lrsd_compress_`` on the first n images in batches of 64."""
    from torch.utils.data import DataLoader, TensorDataset

    from compress.methods import get_method

    g = _gen(7)
    images, labels = torch.randn(100, 1, 12, 12, generator=g), torch.randint(0, 10, (100,), generator=g)
    x = torch.randn(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=3.0, split_grid=3, split_iters=1, iters=3, calibration_samples=90)
    old = _small()
    plan_old = lrsd_compress_(old, cfg, x, [images[:64], images[64:90]], model_name="small")
    new = _small()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = DataLoader(TensorDataset(images, labels), batch_size=25)  # re-batched to 64 + 26
        plan_new = get_method("lrsd").compress_(new, cfg, x, data=loader, model_name="small")
        assert torch.get_num_threads() == 2  # the one-thread solve restores the setting
    finally:
        torch.set_num_threads(before)
    assert plan_new.to_dict() == plan_old.to_dict()
    assert plan_new.target["calibration"]["images"] == 90
    for (k, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=k)


def test_calibration_loader_gives_the_old_calibration_batches() -> None:
    """The CLI path (a seeded CalibrationLoader) solves on exactly the old ``calibration_batches(split, n, 64, seed)``."""
    from compress.methods import get_method
    from compress.methods.base import CalibrationLoader
    from compress.methods.lrsd import calibration_batches, calibration_images

    split = _split()
    old = calibration_batches(split, 130, 64, seed=3)
    new = calibration_images(CalibrationLoader(split, seed=3), 130)
    assert [b.shape[0] for b in new] == [64, 64, 2]
    for a, b in zip(old, new, strict=True):
        assert torch.equal(a, b)
    x = torch.zeros(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=2, mode="symmetric", calibration_samples=130)
    before, after = _small(), _small()
    plan_old = lrsd_compress_(before, cfg, x, old, model_name="small")
    plan_new = get_method("lrsd").compress_(after, cfg, x, data=CalibrationLoader(split, seed=3), model_name="small")
    assert plan_new.to_dict() == plan_old.to_dict()
    for (k, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=k)


def test_registry_rebuild_re_solves_a_saved_plan_and_falls_back_without_data() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from compress.methods import get_method

    method = get_method("lrsd")
    images = torch.cat(_batches())
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=5)
    x = torch.randn(1, 1, 12, 12)
    cfg = LowRankSparseConfig(ratio=3.0, split="fixed", iters=3, calibration_samples=16)
    first = _small()
    plan = method.compress_(first, cfg, x, data=loader, model_name="small")
    replay = Plan.from_dict(plan.to_dict())
    old = _small()
    lrsd_compress_(old, LowRankSparseConfig.from_dict(replay.config), x, [images], plan=replay)
    again = method.rebuild_(_small(), Plan.from_dict(plan.to_dict()), data=loader)
    for (k, a), (_, b) in zip(old.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(again(x), first(x), atol=1e-6, rtol=1e-6)
    weight_only = method.compress_(_small(), cfg, x, data=None)
    assert WEIGHT_ONLY_WARNING in weight_only.warnings
    assert all(e.info["weight_only"] for e in weight_only.factorized_layers)
