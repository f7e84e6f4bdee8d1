"""``METHOD=auto``: per layer, keep / channel SVD / Tai / Tucker-2 and the ranks, chosen by one knapsack.

For every Conv2d/Linear the planner lists the candidates — keep, and each applicable factorization
(``svd``, ``tai``, ``tucker2`` for k×k convs; ``pointwise-svd`` for 1×1 convs; ``linear-svd`` for Linear
layers) at rank levels on the target's rank grid (multiples of ``round_to``, at most ``max_levels`` per
factorization, spaced geometrically) — with their cost and their error, then picks one candidate per layer
minimising the total error within the budget (:func:`compress.latency.knapsack.solve_mckp`):

* cost: predicted ms of the block timed in isolation (``SPEEDUP`` / ``LATENCY_MS``, from
  :mod:`compress.latency`), parameters (``RATIO``) or MACs (``FLOPS``);
* error proxy: with calibration data (``DATA``), the layer's output reconstruction error
  ``‖(W − Ŵ) X‖² = tr(E XXᵀ Eᵀ)`` on calibration activations, from each layer's input Gram matrix ``XXᵀ``
  (im2col patches at sampled output positions of at most ``calibration_samples`` images, accumulated with
  forward pre-hooks by :func:`compress.methods.lrsd.statistics.collect_stats`); without data the
  weight-space ``‖W − Ŵ‖²`` (the relative Frobenius error squared × ``‖W‖²``), exact for each candidate
  from one SVD (channel SVD, Tai) or one full HOSVD core (Tucker-2, without HOOI) per layer. ``Ŵ`` is the
  data-free decomposition the applier builds either way; the plan records which proxy ranked the candidates
  (``plan.target["error_proxy"]`` and each layer's ``info["error_proxy"]``: ``"output"`` or ``"weight"``).

Every plan entry's ``action`` is a registered factorization, so the default per-layer applier builds it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress import decompose
from compress.factorizations import Factorization, LayerGeometry, dense_macs, factorization
from compress.latency.knapsack import Option as Choice
from compress.latency.knapsack import solve_mckp
from compress.methods.base import (
    CALIBRATION_SAMPLES,
    EXCLUDE,
    MIN_RANK,
    ROUND_TO,
    Batches,
    Method,
    Needs,
    Option,
    positive_int,
    register,
    take_samples,
)
from compress.metrics import count_params, trace_geometry
from compress.plan import LayerPlan, Plan
from compress.planning import FilterFn, common_skip_reason, find_stem, hw_list, keep_entry, layer_params, plan_totals
from compress.reuse import fingerprint, memoized
from compress.targets import Target
from lowrank_core.errors import CompressionError, UserInputError
from lowrank_core.progress import Progress

__all__ = ["AutoConfig", "AutoMethod", "approximation", "candidate_errors", "output_errors", "plan_auto"]

KXK_FACTORIZATIONS = ("svd", "tai", "tucker2")
ERROR_PROXIES = {
    "weight": "weight: ||W - W_hat||_F^2 (relative Frobenius error squared x ||W||^2), summed over layers",
    "output": "output: ||(W - W_hat) X||_F^2 on calibration activations (from each layer's input Gram XX^T), "
    "summed over layers",
}
POSITIONS_PER_IMAGE = 10  # output positions sampled per calibration image for a conv's Gram (0 = all)


@dataclass(frozen=True)
class AutoConfig:
    """Per-layer choice of decomposition and ranks under one budget.

    Attributes:
        method: Always ``auto``.
        ratio: Parameter compression factor of the whole model (cost = parameters); 4 when no target is given.
        flops: Fraction of the model's MACs to remove (cost = MACs).
        speedup: Predicted speedup over the dense model (cost = predicted block ms).
        latency_ms: Predicted latency in ms (cost = predicted block ms).
        factorizations: Factorizations k×k convs may get (1×1 convs and Linear layers get SVD).
        round_to: Ranks are multiples of this.
        min_rank: Smallest rank.
        max_levels: Rank levels per factorization and layer (geometrically spaced on the grid).
        calibration_samples: Calibration images (at most) for the output error proxy when data is given.
        keep_stem: Leave the image-input conv dense.
        exclude: fnmatch patterns of layers to leave dense.
    """

    method: str = "auto"
    ratio: float | None = None
    flops: float | None = None
    speedup: float | None = None
    latency_ms: float | None = None
    factorizations: tuple[str, ...] = KXK_FACTORIZATIONS
    round_to: int = 8
    min_rank: int = 8
    max_levels: int = 10
    calibration_samples: int = 256
    keep_stem: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        given = {"ratio": self.ratio, "flops": self.flops, "speedup": self.speedup, "latency_ms": self.latency_ms}
        if Target.from_options(**given) is None:  # two targets are refused there; none is the default RATIO=4
            object.__setattr__(self, "ratio", 4.0)
        unknown = [f for f in self.factorizations if f not in KXK_FACTORIZATIONS]
        if unknown or not self.factorizations:
            raise UserInputError(f"auto chooses among {', '.join(KXK_FACTORIZATIONS)}; got {list(self.factorizations)}")
        if self.round_to < 1 or self.min_rank < 1 or self.max_levels < 1 or self.calibration_samples < 1:
            raise UserInputError("round_to, min_rank, max_levels and calibration_samples must be ≥ 1")

    @property
    def target(self) -> Target:
        """The one target given."""
        target = Target.from_options(
            ratio=self.ratio, flops=self.flops, speedup=self.speedup, latency_ms=self.latency_ms
        )
        assert target is not None
        return target

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        d = asdict(self)
        d["factorizations"], d["exclude"] = list(self.factorizations), list(self.exclude)
        return d


# ================================================================================================ candidates
def rank_levels(max_rank: int, round_to: int, min_rank: int, max_levels: int) -> list[int]:
    """Ranks on the grid (multiples of ``round_to``, ≥ ``min_rank``, < ``max_rank``), at most ``max_levels``."""
    first = max(1, math.ceil(min_rank / round_to))
    last = (max_rank - 1) // round_to
    if last < first:
        return []
    ks = list(range(first, last + 1))
    if len(ks) > max_levels:
        ratio = last / first
        ks = sorted({round(first * ratio ** (i / (max_levels - 1))) for i in range(max_levels)})
    return [k * round_to for k in ks]


def _tail_energy(sigma: torch.Tensor) -> torch.Tensor:
    """``tail[r] = Σ_{i ≥ r} σ_i²`` for r = 0..len(σ)."""
    sq = sigma.to(torch.float64) ** 2
    return torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])


def _left_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of ``matrix`` (m×n, m ≤ n here) in decreasing order, from its m×m Gram matrix."""
    _, vectors = torch.linalg.eigh(matrix @ matrix.T)
    return vectors.flip(1)


def candidate_errors(fact: Factorization, module: nn.Module, ranks_list: list[tuple[int, ...]]) -> list[float]:
    """The squared weight-space error ``‖W − Ŵ‖²`` of ``fact`` at each ranks tuple (HOSVD for Tucker-2)."""
    w = module.weight.detach().to(torch.float64).cpu()
    if fact.name == "tucker2":
        t, s = w.shape[:2]
        u_t = _left_basis(w.reshape(t, -1))
        u_s = _left_basis(w.transpose(0, 1).reshape(s, -1))
        core = torch.einsum("tskl,tr,sq->rqkl", w, u_t, u_s)
        energy = (core**2).sum(dim=(2, 3)).cumsum(0).cumsum(1)
        total = float((w**2).sum())
        out = []
        for r_t, r_s in ranks_list:
            kept = float(energy[min(r_t, energy.shape[0]) - 1, min(r_s, energy.shape[1]) - 1])
            out.append(max(total - kept, 0.0))
        return out
    matrix = decompose.unfold_spatial(w) if fact.name == "tai" else w.reshape(w.shape[0], -1)
    small = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    tail = _tail_energy(torch.linalg.eigvalsh(small).flip(0).clamp_min(0.0).sqrt())
    return [float(tail[min(r[0], len(tail) - 1)]) for r in ranks_list]


def approximation(fact: Factorization, module: nn.Module, ranks: tuple[int, ...]) -> torch.Tensor:
    """``Ŵ`` (float64, the layer's weight shape) of the data-free truncation the applier builds at ``ranks``."""
    w = module.weight.detach().to(torch.float64).cpu()
    if fact.name == "tucker2":
        t, s = w.shape[:2]
        u_t = _left_basis(w.reshape(t, -1))[:, : min(ranks[0], t)]
        u_s = _left_basis(w.transpose(0, 1).reshape(s, -1))[:, : min(ranks[1], s)]
        return torch.einsum("ab,bskl,sc->ackl", u_t @ u_t.T, w, u_s @ u_s.T)
    matrix = decompose.unfold_spatial(w) if fact.name == "tai" else w.reshape(w.shape[0], -1)
    r = ranks[0]
    if matrix.shape[0] <= matrix.shape[1]:
        basis = _left_basis(matrix)[:, :r]
        approx = basis @ (basis.T @ matrix)
    else:
        basis = _left_basis(matrix.T)[:, :r]
        approx = (matrix @ basis) @ basis.T
    if fact.name == "tai":
        return decompose.fold_spatial(approx, tuple(w.shape))
    return approx.reshape(w.shape)


def output_errors(
    fact: Factorization, module: nn.Module, ranks_list: list[tuple[int, ...]], gram: torch.Tensor
) -> list[float]:
    """The output error ``‖(W − Ŵ) X‖² = tr(E XXᵀ Eᵀ)`` of ``fact`` at each ranks tuple, from the input Gram ``XXᵀ``.

    ``gram`` is the ``k × k`` second moment of the layer's inputs in im2col order (``c·kh·kw + i·kw + j``; the
    input features for a Linear layer), as :func:`compress.methods.lrsd.statistics.collect_stats` accumulates it.
    """
    w = module.weight.detach().to(torch.float64).cpu()
    g = gram.to(device="cpu", dtype=torch.float64)
    matrix = w.reshape(w.shape[0], -1)
    if fact.name not in ("tai", "tucker2"):  # channel SVD: Ŵ = U_r U_rᵀ W, so the error is a tail sum
        basis = _left_basis(matrix) if matrix.shape[0] <= matrix.shape[1] else _eig_basis(matrix @ matrix.T)
        rotated = basis.T @ matrix
        per_vector = ((rotated @ g) * rotated).sum(dim=1)  # u_iᵀ W G Wᵀ u_i
        tail = torch.cat([torch.flip(torch.cumsum(torch.flip(per_vector, [0]), 0), [0]), per_vector.new_zeros(1)])
        return [max(float(tail[min(r[0], len(tail) - 1)]), 0.0) for r in ranks_list]
    out = []
    for ranks in ranks_list:
        err = matrix - approximation(fact, module, ranks).reshape(matrix.shape)
        out.append(max(float(((err @ g) * err).sum()), 0.0))
    return out


def _eig_basis(square: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix in decreasing order of eigenvalue."""
    _, vectors = torch.linalg.eigh(square)
    return vectors.flip(1)


def _candidate_errors(
    fact: Factorization, module: nn.Module, ranks_list: list[tuple[int, ...]], gram: torch.Tensor | None
) -> list[float]:
    """Output-space errors with a Gram, else weight-space ones; kept across the knob values of a latency solve."""

    def compute() -> list[float]:
        if gram is not None:
            return output_errors(fact, module, ranks_list, gram)
        return candidate_errors(fact, module, ranks_list)

    return memoized(
        "auto candidate errors", lambda: (fingerprint(module.weight, gram), fact.name, tuple(ranks_list)), compute
    )


def input_grams(
    model: nn.Module, paths: list[str], data: Batches, samples: int, *, positions_per_image: int | None = None
) -> dict[str, torch.Tensor]:
    """Each layer's input Gram ``XXᵀ`` (float64, im2col order) over the first ``samples`` images of ``data``."""
    from compress.methods.lrsd.statistics import collect_stats

    images, _ = take_samples(data, samples)
    device = next(model.parameters()).device
    batches = [images[i : i + 64].to(device) for i in range(0, int(images.shape[0]), 64)]
    per_image = POSITIONS_PER_IMAGE if positions_per_image is None else positions_per_image
    stats = collect_stats(model, paths, batches, positions_per_image=per_image, seed=0)
    return {p: st.gram for p, st in stats.items()}


def layer_candidates(module: nn.Module, config: AutoConfig) -> list[tuple[Factorization, tuple[int, ...]]]:
    """``(factorization, ranks)`` of every non-keep candidate of ``module`` that stores fewer parameters."""
    if isinstance(module, nn.Linear):
        facts = [factorization("linear-svd")]
    elif tuple(module.kernel_size) == (1, 1):
        facts = [factorization("pointwise-svd")]
    else:
        facts = [factorization(name) for name in config.factorizations]
    dense_p = layer_params(module)
    out: list[tuple[Factorization, tuple[int, ...]]] = []
    for fact in facts:
        if fact.unsupported_reason(module) is not None:
            continue
        limits = fact.max_ranks(module)
        top = max(limits)
        for r in rank_levels(top, config.round_to, config.min_rank, config.max_levels):
            ranks = tuple(
                max(1, min(m, config.round_to * max(1, round(r * m / top / config.round_to)))) for m in limits
            )
            if fact.params(module, ranks) < dense_p:
                out.append((fact, ranks))
    return out


# ================================================================================================ planning
def plan_auto(
    model: nn.Module,
    config: AutoConfig,
    example_input: torch.Tensor,
    *,
    data: Batches | None = None,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan ``METHOD=auto``; see the module doc (``data``: calibration batches for the output error proxy)."""
    target = config.target
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = find_stem(model, order, int(example_input.shape[1]))
    total_params = count_params(model)
    latency = None
    if target.is_latency:
        from compress.latency import current_latency_model

        latency = current_latency_model(batch=int(example_input.shape[0]))
        dense = latency.profile_dense(model, example_input)
    else:
        dense = None

    entries, layers, pending, fixed_cost = _scan(model, config, geometry, stem, filter_fn, latency, dense)
    if not layers:
        raise CompressionError(f"nothing to compress in {model_name}: every Conv2d/Linear is kept by rule")
    proxy = "weight" if data is None else "output"
    grams = {} if data is None else _input_grams(model, [p for p, _, _ in layers], data, config.calibration_samples)
    cost_key = {"ratio": "params", "flops": "macs"}.get(target.kind, "ms")
    groups = _error_groups(layers, pending, grams, proxy, cost_key)

    dense_total, floor, unit, goal = _goal(target, groups, total_params, total_macs, dense, fixed_cost)
    budget = goal - floor
    try:
        solution = solve_mckp(groups, budget)
    except UserInputError:
        best_total = floor + sum(min(o.cost for o in g) for g in groups)
        raise UserInputError(_unreachable(target, model_name, best_total, dense_total)) from None

    for (path, module, rows), j in zip(layers, solution.choice, strict=True):
        entries[path] = _chosen_entry(path, module, rows, j, geometry[path], proxy)

    ordered = [entries[p] for p, m in model.named_modules() if p in entries]
    totals = plan_totals(ordered, total_params, total_macs)
    record: dict[str, Any] = {
        "ratio": config.ratio,
        "flops": config.flops,
        "kind": target.kind,
        "value": target.value,
        "achieved_ratio": total_params / totals["params_after"],
        "achieved_flops_reduction": 1.0 - totals["macs_after"] / max(total_macs, 1),
        "budget": budget,
        "budget_unit": unit,
        "cost": solution.cost,
        "lambda": solution.lam,
        "error_proxy": proxy,
        "error_proxy_text": ERROR_PROXIES[proxy],
        "total_error": solution.error,
    }
    if latency is not None:
        record.update(_latency_record(dense, latency, fixed_cost + solution.cost))
    return Plan(
        model=model_name,
        method="auto",
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=ordered,
        target=record,
        totals=totals,
    )


def _scan(
    model: nn.Module,
    config: AutoConfig,
    geometry: dict[str, LayerGeometry],
    stem: str | None,
    filter_fn: FilterFn | None,
    latency: Any,
    dense: Any,
) -> tuple[
    dict[str, LayerPlan],
    list[tuple[str, nn.Module, list[dict[str, Any]]]],
    list[list[tuple[Factorization, tuple[int, ...]]]],
    float,
]:
    """Step 1: a keep entry for every layer left dense, and every other layer's candidate table.

    Returns:
        The keep entries, the candidate layers with their rows, their candidates, and the cost of the kept layers.
    """
    target = config.target
    entries: dict[str, LayerPlan] = {}
    layers: list[tuple[str, nn.Module, list[dict[str, Any]]]] = []
    pending: list[list[tuple[Factorization, tuple[int, ...]]]] = []
    fixed_cost = 0.0
    timing = None
    if latency is not None:
        count = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        timing = Progress(count, "auto: timing candidate blocks", unit="layer")
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        reason = common_skip_reason(
            module, path, geom, stem=stem, keep_stem=config.keep_stem, exclude=config.exclude, filter_fn=filter_fn
        )
        cands = [] if reason is not None else layer_candidates(module, config)
        if reason is None and not cands:
            reason = "no candidate on the rank grid stores fewer parameters than the dense layer"
        dense_ms = None
        if latency is not None and path in dense.inputs:
            dense_ms = dense.blocks_ms[path]
        if reason is not None:
            entries[path] = keep_entry(path, module, geom, reason)
            fixed_cost += {"ratio": layer_params(module), "flops": entries[path].macs_before}.get(
                target.kind, dense_ms or 0.0
            )
            continue
        assert geom is not None
        block_input = dense.inputs[path] if latency is not None else None
        rows = _candidate_rows(module, cands, geom, dense_ms, latency, block_input)
        layers.append((path, module, rows))
        pending.append(cands)
        if timing is not None:
            timing.update(1, f"{path}: {len(cands)} candidates")
    if latency is not None:
        latency.save()
    if timing is not None:
        timing.close()
    return entries, layers, pending, fixed_cost


def _latency_record(dense: Any, latency: Any, cost: float) -> dict[str, Any]:
    """The predicted latency of the chosen plan (``cost`` in profile units) and the latency model."""
    predicted = dense.scale * cost
    return {
        "dense_ms": dense.total_ms,
        "scale": dense.scale,
        "predicted_ms": predicted,
        "predicted_speedup": dense.total_ms / predicted,
        "latency_model": latency.to_dict(),
    }


def _candidate_rows(
    module: nn.Module,
    cands: list[tuple[Factorization, tuple[int, ...]]],
    geom: LayerGeometry,
    dense_ms: float | None,
    latency: Any,
    block_input: Any,
) -> list[dict[str, Any]]:
    """The table of one layer: ``keep`` first, then each candidate with its params, MACs (and block ms)."""
    rows = [{"action": "keep", "ranks": None, "params": layer_params(module), "macs": dense_macs(module, geom)}]
    rows[0].update(ms=dense_ms, error=0.0)
    for fact, ranks in cands:
        row = {"action": fact.name, "ranks": list(ranks), "params": fact.params(module, ranks)}
        row["macs"] = fact.macs(module, ranks, geom)
        if latency is not None:
            row["ms"] = latency.block_ms(fact.build(module, ranks), block_input)
        rows.append(row)
    return rows


def _input_grams(model: nn.Module, paths: list[str], data: Batches, samples: int) -> dict[str, Any]:
    """The calibration input Gram matrix of every candidate layer (memoized for the same model and data)."""
    return memoized(  # the stored value holds ``data``: its id stays valid
        "auto input grams",
        lambda: (fingerprint(model), tuple(paths), id(data), samples),
        lambda: (data, input_grams(model, paths, data, samples)),
    )[1]


def _error_groups(
    layers: list[tuple[str, nn.Module, list[dict[str, Any]]]],
    pending: list[list[tuple[Factorization, tuple[int, ...]]]],
    grams: dict[str, Any],
    proxy: str,
    cost_key: str,
) -> list[list[Choice]]:
    """Each candidate's error proxy (written into its row) and each layer's (cost, error) choices for the knapsack."""
    groups = []
    bar = Progress(len(layers), f"auto: {proxy}-space errors of the candidates", unit="layer")
    for (path, module, rows), cands in zip(layers, pending, strict=True):
        errors: dict[tuple[str, tuple[int, ...]], float] = {}
        for fact in {f.name: f for f, _ in cands}.values():
            ranks_list = [r for f, r in cands if f.name == fact.name]
            gram = grams[path] if proxy == "output" else None
            values = _candidate_errors(fact, module, ranks_list, gram)
            errors.update(zip(((fact.name, r) for r in ranks_list), values, strict=True))
        bar.update(1, path)
        for row, (fact, ranks) in zip(rows[1:], cands, strict=True):
            row["error"] = errors[(fact.name, ranks)]
        groups.append([Choice(cost=float(r[cost_key]), error=float(r["error"])) for r in rows])
    bar.close()
    return groups


def _goal(
    target: Target, groups: list[list[Choice]], total_params: int, total_macs: int, dense: Any, fixed_cost: float
) -> tuple[float, float, str, float]:
    """``(dense total, cost of everything but the candidates, unit, goal)`` in the target's cost unit."""
    cand_dense = sum(g[0].cost for g in groups)
    if target.kind == "ratio":  # what the candidates may cost: the goal minus everything else
        return float(total_params), total_params - cand_dense, "params", total_params / target.value
    if target.kind == "flops":
        return float(total_macs), total_macs - cand_dense, "MACs", (1.0 - target.value) * total_macs
    goal = (dense.total_ms / target.value if target.kind == "speedup" else target.value) / dense.scale
    return dense.total_ms / dense.scale, fixed_cost, "ms", goal


def _chosen_entry(
    path: str, module: nn.Module, rows: list[dict[str, Any]], j: int, geom: LayerGeometry, proxy: str
) -> LayerPlan:
    """The plan entry of the candidate the knapsack chose (row ``j``), with the whole table in its info."""
    row = rows[j]
    if row["action"] == "keep":
        entry = keep_entry(path, module, geom, "auto: keeping it dense costs least error within the budget")
    else:
        entry = LayerPlan(
            path=path,
            type=type(module).__name__,
            shape=list(module.weight.shape),
            action=row["action"],
            ranks=list(row["ranks"]),
            reason=None,
            params_before=layer_params(module),
            params_after=int(row["params"]),
            macs_before=int(rows[0]["macs"]),
            macs_after=int(row["macs"]),
            in_hw=hw_list(geom.in_hw),
            out_hw=hw_list(geom.out_hw),
        )
    entry.info = {"candidates": rows, "chosen": j, "error_proxy": proxy}
    return entry


def _unreachable(target: Target, model_name: str, best_total: float, dense_total: float) -> str:
    """One line: the target and the best this planner can reach (``best_total`` in the target's cost unit)."""
    if target.kind == "ratio":
        best = f"the highest ratio found is ×{dense_total / best_total:.2f}"
    elif target.kind == "flops":
        best = f"the most FLOPs removed is {100 * (1 - best_total / dense_total):.1f}%"
    else:
        best = f"the best speedup found is {dense_total / best_total:.2f}× predicted"
    return f"{target.text()} is out of reach for METHOD=auto on {model_name}: {best}; lower the target"


# ================================================================================================ method
MAX_LEVELS = Option(
    "--max-levels", "max_levels", "auto: rank levels per factorization and layer (default 10)", type=positive_int
)
FACTORIZATION_CHOICES = Option(
    "--auto-factorizations",
    "factorizations",
    "auto: factorizations a k×k conv may get (repeatable; default svd, tai, tucker2)",
    multiple=True,
)


class AutoMethod(Method):
    """Per-layer decomposition and ranks chosen by a multiple-choice knapsack (latency, params or MACs)."""

    name = "auto"
    config_type = AutoConfig
    needs = Needs.IMAGES
    options = (ROUND_TO, MIN_RANK, MAX_LEVELS, FACTORIZATION_CHOICES, CALIBRATION_SAMPLES, EXCLUDE)
    summary = "per layer keep/svd/tai/tucker2 and ranks by a knapsack on measured latency, params or MACs"
    target_fields = ("ratio", "flops", "speedup", "latency_ms")

    def plan(
        self,
        model: nn.Module,
        config: Any,
        example_input: torch.Tensor,
        *,
        data: Any = None,
        model_name: str = "model",
        filter_fn: FilterFn | None = None,
    ) -> Plan:
        """See :func:`plan_auto` (with ``data``: the output error proxy on calibration activations)."""
        return plan_auto(model, config, example_input, data=data, model_name=model_name, filter_fn=filter_fn)


register(AutoMethod())
