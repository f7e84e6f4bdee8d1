"""LRSD's config and planner: which layers become ``L + S`` and at which rank and cardinality.

The planner allocates per-layer compression ratios to meet the whole-model target (``RATIO`` counts stored
values; ``FLOPS`` counts sparse-kernel MACs), and splits each layer's weight budget between rank and
cardinality. A ``split="search"`` config refines the split on calibration data when the layers are solved
(:mod:`compress.methods.lrsd.apply`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from compress.factorizations import LayerGeometry, dense_macs
from compress.methods.lrsd.budget import (
    allocate_ratios,
    card_for,
    card_limit,
    entries_for_flops,
    layer_storage,
    matrix_dims,
    split_budget,
)
from compress.metrics import count_params, trace_geometry
from compress.plan import LayerPlan, Plan
from compress.planning import (
    common_skip_reason,
    find_stem,
    hw_list,
    keep_entry,
    layer_params,
    plan_totals,
)
from compress.targets import check_flops, check_ratio
from lowrank_core.errors import CompressionError, UserInputError

if TYPE_CHECKING:
    import torch

    from compress.planning import FilterFn

__all__ = ["METHOD", "WEIGHT_ONLY_WARNING", "LowRankSparseConfig", "layer_entry", "plan_lrsd", "retotal"]

METHOD = "lrsd"
WEIGHT_ONLY_WARNING = (
    "no calibration data: solved the weight-only problem (C = I, plain GoDec + refinement) instead of "
    "reconstructing layer responses; pass calibration batches to lrsd_compress_ for the data-aware fit"
)


@dataclass(frozen=True)
class LowRankSparseConfig:
    """Low-rank + sparse decomposition (Yu et al. 2017), spec ``docs/method-lrsd.md``.

    Attributes:
        method: Always ``lrsd``.
        ratio: Target parameter compression of the whole model, dense / compressed, counting stored
            values (r(m+k) + c per layer, index not charged, as in the paper). > 1.
        flops: Instead of ``ratio``: the fraction of the whole model's MACs to remove, counted as a sparse
            kernel would execute them (r(m+k)·P + c·P per layer; with ``structured="2:4"`` the S branch at
            half its dense cost). The exported ONNX graph runs S as a dense conv, so its own MACs do not
            drop; the plan records both and warns. When given, ``ratio`` is set to ``None``.
        parts: ``both`` (L + S), or the equal-budget ablations ``lowrank`` (c = 0: the whole budget buys rank,
            data-aware low-rank only) and ``sparse`` (r = 0: data-aware pruning). Only ``both`` searches a split.
        split: ``search`` (grid over r on the calibration objective, spec §1.5) or ``fixed`` (``rank_fraction``).
        rank_fraction: Share of the largest affordable rank given to L when ``split="fixed"`` (and the
            plan's starting split before the search).
        split_grid: Number of r values tried by the search.
        split_iters: Outer iterations per trial of the search.
        s_step: ``grasp`` (default) or ``hard`` (iterative hard thresholding).
        structured: ``none`` or ``2:4`` (at most 2 non-zeros per 4 input channels; the whole S branch then
            runs on 2:4 sparse tensor cores at half its dense cost).
        mode: ``asymmetric`` (X from the compressed prefix, Y from the dense model; spec default) or ``symmetric``.
        calibration_samples: Images in the calibration sample (taken by the caller; recorded here).
        positions_per_image: Output positions sampled per image for convs (0 = all).
        lam: Ridge λ relative to ``tr(X Xᵀ)/k``.
        iters: Outer refinement iterations at most.
        tol: Relative-decrease stopping tolerance.
        power: Extra subspace iterations per L-step.
        godec_iters: GoDec warm-start iterations at most.
        cg_iters: CG iterations of each restricted least-squares refit.
        allocation: ``uniform`` (one ratio for all compressed layers) or ``conv_fc`` (FC layers get
            ``fc_factor`` × the conv ratio unless ``conv_ratio``/``fc_ratio`` fix one of them).
        conv_ratio: Fixed ratio of conv layers (``conv_fc`` only).
        fc_ratio: Fixed ratio of Linear layers (``conv_fc`` only).
        fc_factor: FC ratio / conv ratio when neither is fixed.
        layer_ratios: ``(pattern, ratio)`` overrides (fnmatch on module paths), e.g. from a sensitivity sweep.
        charge_index: Let each layer's budget also pay for S's CSR index (c indices + m+1 row pointers).
        compress_linear: Decompose Linear layers.
        keep_stem: Leave the image-input conv dense.
        exclude: fnmatch patterns of module paths to leave dense.
        seed: Seed of the random projections and of the position sampling.
    """

    method: str = METHOD
    ratio: float | None = 4.0
    flops: float | None = None
    parts: str = "both"
    split: str = "search"
    rank_fraction: float = 0.5
    split_grid: int = 6
    split_iters: int = 3
    s_step: str = "grasp"
    structured: str = "none"
    mode: str = "asymmetric"
    calibration_samples: int = 256
    positions_per_image: int = 10
    lam: float = 1e-3
    iters: int = 30
    tol: float = 1e-5
    power: int = 1
    godec_iters: int = 30
    cg_iters: int = 30
    allocation: str = "uniform"
    conv_ratio: float | None = None
    fc_ratio: float | None = None
    fc_factor: float = 4.0
    layer_ratios: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    charge_index: bool = False
    compress_linear: bool = True
    keep_stem: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != METHOD:
            raise UserInputError(f"LowRankSparseConfig is method 'lrsd', got {self.method!r}")
        if self.flops is not None:
            check_flops(self.flops)
            object.__setattr__(self, "ratio", None)  # the FLOPs target replaces the (default) ratio
        else:
            check_ratio(self.ratio)  # the one target validation (refuses None, ≤ 1, inf and nan)
        choices = {
            "split": ("search", "fixed"),
            "s_step": ("grasp", "hard"),
            "structured": ("none", "2:4"),
            "mode": ("asymmetric", "symmetric"),
            "parts": ("both", "lowrank", "sparse"),
            "allocation": ("uniform", "conv_fc"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"lrsd {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.rank_fraction <= 1.0:
            raise UserInputError(f"rank_fraction must be in [0, 1], got {self.rank_fraction}")
        if self.calibration_samples < 1 or self.positions_per_image < 0 or self.lam < 0:
            raise UserInputError("calibration_samples must be ≥ 1, positions_per_image ≥ 0 and lam ≥ 0")
        if self.split_grid < 2 or self.iters < 0 or self.godec_iters < 1 or self.cg_iters < 1 or self.power < 0:
            raise UserInputError("split_grid ≥ 2, iters ≥ 0, godec_iters ≥ 1, cg_iters ≥ 1 and power ≥ 0 are required")
        for name in ("conv_ratio", "fc_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 1.0:
                raise UserInputError(f"{name} must be ≥ 1, got {value}")
        if self.conv_ratio is not None and self.fc_ratio is not None:
            raise UserInputError("give conv_ratio or fc_ratio, not both: the other one is solved to reach RATIO")
        if self.fc_factor <= 0:
            raise UserInputError(f"fc_factor must be > 0, got {self.fc_factor}")
        for item in self.layer_ratios:
            if len(item) != 2 or not float(item[1]) >= 1.0:
                raise UserInputError(f"layer_ratios entries are (pattern, ratio ≥ 1), got {item!r}")

    @property
    def searches(self) -> bool:
        """Whether each layer's r/c split is searched on the calibration objective."""
        return self.split == "search" and self.parts == "both"

    def layer_split(self, module: nn.Module, budget: int) -> tuple[int, int]:
        """The planned ``(rank, cardinality)`` of ``module`` for a weight budget (before any search)."""
        m, k, _, _ = matrix_dims(module)
        max_card = card_limit(module, self.structured)
        if self.parts == "lowrank":
            return max(1, min(budget // (m + k), m, k)), 0
        if self.parts == "sparse":
            return 0, card_for(m, k, budget, 0, charge_index=self.charge_index, max_card=max_card)
        return split_budget(m, k, budget, self.rank_fraction, charge_index=self.charge_index, max_card=max_card)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["layer_ratios"] = [[p, float(r)] for p, r in self.layer_ratios]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowRankSparseConfig:
        """Inverse of :meth:`to_dict` (e.g. from ``plan.config``)."""
        d = dict(data)
        d["exclude"] = tuple(d.get("exclude", ()))
        d["layer_ratios"] = tuple((str(p), float(r)) for p, r in d.get("layer_ratios", ()))
        return cls(**d)


def _skip_reason(
    module: nn.Module,
    path: str,
    geom: LayerGeometry | None,
    stem: str | None,
    config: LowRankSparseConfig,
    filter_fn: FilterFn | None,
) -> str | None:
    """Why ``module`` stays dense: the shared rules, then LRSD's own (Linear off, grouped conv, padding, 2:4)."""
    reason = common_skip_reason(
        module, path, geom, stem=stem, keep_stem=config.keep_stem, exclude=config.exclude, filter_fn=filter_fn
    )
    if reason is not None:
        return reason
    if isinstance(module, nn.Linear) and not config.compress_linear:
        return "Linear layers are left dense by config"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped/depthwise conv (groups={module.groups}) is left dense by rule"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "only explicit zero padding is supported by the two-branch conv"
    if config.structured == "2:4":
        _, _, channels, _ = matrix_dims(module)
        if channels % 4:
            return f"2:4 structured sparsity needs input channels divisible by 4, this layer has {channels}"
    return None


def layer_entry(
    path: str, module: nn.Module, geom: LayerGeometry, rank: int, card: int, ratio: float, budget: int, structured: str
) -> LayerPlan:
    """The plan entry of ``module`` as ``L + S`` at ``(rank, card)``: storage counted several ways, MACs, budget."""
    m, k, _, _ = matrix_dims(module)
    bias = int(module.bias.numel()) if module.bias is not None else 0
    store = layer_storage(m, k, rank, card, structured=structured)
    pixels = geom.out_pixels
    macs_lowrank = rank * (k + m) * pixels
    macs_sparse_dense = m * k * pixels if card or not rank else 0
    info: dict[str, Any] = {
        "cardinality": card,
        "layer_ratio": ratio,
        "budget": budget,
        "m": m,
        "k": k,
        "storage": store,
        "index_overhead": store["index"],
        "params_with_index": store["values_plus_index"] + bias,
        "params_dense_storage": store["dense_storage"] + bias + (m * k if not rank and not card else 0),
        "macs_lowrank": macs_lowrank,
        "macs_sparse_dense": macs_sparse_dense,
        "macs_sparse_kernel": macs_lowrank + card * pixels,
    }
    if structured == "2:4":
        info["macs_2to4"] = macs_lowrank + macs_sparse_dense // 2
    return LayerPlan(
        path=path,
        type=type(module).__name__,
        shape=list(module.weight.shape),
        action=METHOD,
        ranks=[rank],
        reason=None,
        params_before=layer_params(module),
        params_after=store["values"] + bias,
        macs_before=dense_macs(module, geom),
        macs_after=macs_lowrank + macs_sparse_dense,
        in_hw=hw_list(geom.in_hw),
        out_hw=hw_list(geom.out_hw),
        info=info,
    )


def plan_lrsd(
    model: nn.Module,
    config: LowRankSparseConfig,
    example_input: torch.Tensor,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan LRSD for ``model`` without changing it: per-layer ratios, then each layer's rank/cardinality split.

    Raises:
        CompressionError: nothing to compress, or the target is unreachable.
    """
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = find_stem(model, order, int(example_input.shape[1]))
    total_params = count_params(model)
    entries: dict[str, LayerPlan] = {}
    cands: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        reason = _skip_reason(module, path, geom, stem, config, filter_fn)
        if reason is not None:
            entries[path] = keep_entry(path, module, geom, reason)
        else:
            cands[path] = module
    if not cands:
        raise CompressionError(f"nothing to compress in {model_name}: every Conv2d/Linear is excluded by rule")
    weights = {p: int(m.weight.numel()) for p, m in cands.items()}
    fixed = total_params - sum(weights.values())
    is_fc = {p: isinstance(m, nn.Linear) for p, m in cands.items()}

    def layer_entries(target_params: float) -> tuple[dict[str, LayerPlan], dict[str, Any]]:
        ratios, summary = allocate_ratios(weights, is_fc, fixed, target_params, config)
        out: dict[str, LayerPlan] = {}
        for path, module in cands.items():
            geom = geometry[path]
            ratio = ratios[path]
            m, k, _, _ = matrix_dims(module)
            budget = math.floor(m * k / ratio)
            if ratio <= 1.0 or budget >= m * k:
                out[path] = keep_entry(path, module, geom, f"allocated ratio {ratio:.3g} ≤ 1: nothing to gain")
                continue
            rank, card = config.layer_split(module, budget)
            out[path] = layer_entry(path, module, geom, rank, card, ratio, budget, config.structured)
        return out, summary

    warnings: list[str] = []
    if config.flops is None:
        assert config.ratio is not None
        chosen, summary = layer_entries(total_params / config.ratio)
    else:
        chosen, summary = entries_for_flops(layer_entries, total_params, total_macs, config, warnings)
    entries.update(chosen)
    layers = [entries[p] for p, m in model.named_modules() if p in entries]
    plan = Plan(
        model=model_name,
        method=METHOD,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=layers,
        target={"ratio": config.ratio, "flops": config.flops, **summary},
        warnings=warnings,
    )
    retotal(plan, total_params, total_macs)
    return plan


def retotal(plan: Plan, total_params: int, total_macs: int) -> None:
    """Recompute the plan's totals from its entries (after a split search changed ranks)."""
    fact = plan.factorized_layers
    totals = plan_totals(plan.layers, total_params, total_macs)
    params_after, macs_after = totals["params_after"], totals["macs_after"]
    gained_index = sum(e.info.get("params_with_index", e.params_after) - e.params_after for e in fact)
    dense_storage = sum(e.info.get("params_dense_storage", e.params_after) - e.params_after for e in fact)
    kernel = sum(e.macs_after - e.info.get("macs_sparse_kernel", e.macs_after) for e in fact)
    plan.totals.update(
        params_before=total_params,
        params_after=params_after,
        params_after_with_index=params_after + gained_index,
        params_after_dense_storage=params_after + dense_storage,
        macs_before=total_macs,
        macs_after=macs_after,
        macs_after_sparse_kernel=macs_after - kernel,
    )
    if any("macs_2to4" in e.info for e in fact):
        half = sum(e.macs_after - e.info["macs_2to4"] for e in fact)
        plan.totals["macs_after_2to4"] = macs_after - half
    plan.target.update(
        achieved_ratio=total_params / params_after,
        achieved_ratio_with_index=total_params / plan.totals["params_after_with_index"],
        achieved_ratio_dense_storage=total_params / plan.totals["params_after_dense_storage"],
    )
