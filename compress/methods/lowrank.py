"""Classic per-layer low-rank baselines: ``tucker2``, ``svd`` (channel SVD), ``tai`` (spatial SVD), ``cp``.

k×k convs get the named factorization, 1×1 convs and Linear layers get SVD under each of them (MUSCO's
convention). Ranks come from one rank rule (:mod:`compress.ranks`): a uniform parameter fraction
bisected to the target, MUSCO's direct param-reduction rule, weakened EVBMF or retained energy. The
applier (:func:`compress.planning.apply_factorizations_`) is every method's default: one registered factorization
(:mod:`compress.factorizations`) per planned layer, built from stock ``nn.Conv2d`` / ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress.attention import unfused_view
from compress.factorizations import Factorization, LayerGeometry, dense_macs, factorization
from compress.methods.base import EXCLUDE, MIN_RANK, ROUND_TO, Method, Option, finite_float, nonneg_int, register
from compress.metrics import count_params, trace_geometry
from compress.plan import LayerPlan, Plan
from compress.planning import (
    FilterFn,
    apply_factorizations_,
    common_skip_reason,
    find_stem,
    hw_list,
    keep_entry,
    layer_params,
    plan_totals,
)
from compress.ranks import RANK_RULES, Candidate, EVBMFRule, rank_rule, select_ranks
from compress.targets import Target, check_target, target_text
from lowrank_core.errors import CompressionError, UserInputError

__all__ = [
    "CONV_METHODS",
    "LowRankConfig",
    "LowRankMethod",
    "apply_factorizations_",
    "plan_lowrank",
    "select_plan_ranks",
]

CONV_METHODS = ("tucker2", "svd", "tai", "cp")


@dataclass(frozen=True)
class LowRankConfig:
    """Classic per-layer low-rank decomposition (MUSCO's convention for which layer gets what).

    Attributes:
        method: Decomposition of k×k convs: ``tucker2``, ``svd`` (channel SVD), ``tai`` (spatial SVD), ``cp``.
            1×1 convs and Linear layers get SVD under every method.
        ratio: Target parameter compression factor of the whole model (dense / compressed), > 1.
            ``None`` uses the rank rule's own knob (``energy`` or ``omega``).
        flops: Instead of ``ratio``: the fraction of the whole model's FLOPs (MACs) to remove, in (0, 1)
            (0.5 = half). When given it is the target and ``ratio`` is set to ``None``.
        rank_rule: ``uniform`` (every layer keeps the same parameter fraction), ``param-reduction`` (MUSCO's
            direct per-layer rule: Tucker-2 ranks from the quadratic budget with aspect β), ``evbmf``
            (weakened EVBMF) or ``energy``.
        energy: Retained spectral energy when ``rank_rule="energy"`` and no ratio is given.
        omega: EVBMF weakening factor when ``rank_rule="evbmf"`` and no ratio is given (1 = plain EVBMF).
        round_to: Ranks are rounded to a multiple of this (8 suits FP16 tensor cores and AVX-512).
        min_rank: Smallest rank any factor may get.
        hooi_iters: HOOI refinement sweeps after the HOSVD initialisation of Tucker-2 (0 = plain HOSVD).
        compress_pointwise: Factorize 1×1 convs with SVD.
        compress_linear: Factorize Linear layers with SVD.
        keep_stem: Leave the image-input conv dense.
        min_share: A layer holding less than this fraction of the model's parameters *and* of its MACs
            is left dense: factorizing it adds layers (latency) for no measurable saving.
        exclude: fnmatch patterns of module paths to leave dense.
    """

    method: str = "tucker2"
    ratio: float | None = 4.0
    flops: float | None = None
    rank_rule: str = "uniform"
    energy: float = 0.9
    omega: float = 1.0
    round_to: int = 8
    min_rank: int = 8
    hooi_iters: int = 0
    compress_pointwise: bool = True
    compress_linear: bool = True
    keep_stem: bool = True
    min_share: float = 0.005
    exclude: tuple[str, ...] = field(default_factory=tuple)

    @property
    def conv_method(self) -> str:
        """The factorization given to k×k convs."""
        return self.method

    def __post_init__(self) -> None:
        if self.conv_method not in CONV_METHODS:
            raise UserInputError(f"unknown method {self.method!r}; known: {', '.join(sorted(CONV_METHODS))}")
        if self.flops is not None:
            object.__setattr__(self, "ratio", None)  # the FLOPs target replaces the (default) ratio
        check_target(self.ratio, self.flops)
        if self.rank_rule not in RANK_RULES:
            raise UserInputError(f"unknown rank rule {self.rank_rule!r}; known: {', '.join(sorted(RANK_RULES))}")
        if self.rank_rule in ("uniform", "param-reduction") and self.ratio is None and self.flops is None:
            raise UserInputError(f"rank rule {self.rank_rule!r} needs a target RATIO or FLOPS")
        if not 0.0 < self.energy <= 1.0:
            raise UserInputError(f"energy must be in (0, 1], got {self.energy}")
        if not 0.0 <= self.min_share < 1.0:
            raise UserInputError(f"min_share must be in [0, 1), got {self.min_share}")
        if self.round_to < 1 or self.min_rank < 1:
            raise UserInputError("round_to and min_rank must be ≥ 1")
        if self.conv_method == "cp" and self.rank_rule != "uniform":
            raise UserInputError("METHOD=cp supports only the 'uniform' rank rule")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d


# ================================================================================================ planning
def plan_lowrank(
    model: nn.Module,
    config: LowRankConfig,
    example_input: torch.Tensor,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Per-layer ranks for the classic factorizations (and ``vbmf-tucker2``'s EVBMF ranks); see the module doc.

    ``nn.MultiheadAttention`` layers are planned on their unfused view (:mod:`compress.attention`): the
    plan names their ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear layers; ``model`` is not changed.
    """
    model = unfused_view(model)
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = find_stem(model, order, int(example_input.shape[1]))
    total_params = count_params(model)
    entries, candidates = _candidates(model, config, geometry, stem, filter_fn, total_params, total_macs)
    if not candidates:
        raise CompressionError(
            f"nothing to compress in {model_name}: every Conv2d/Linear is excluded by rule (see the plan reasons)"
        )
    rule, selection, warnings = select_plan_ranks(candidates, config, total_params, total_macs)
    for cand in candidates:
        entries[cand.path] = _layer_entry(cand, selection)
    layers = [entries[p] for p, m in model.named_modules() if p in entries]
    totals = plan_totals(layers, total_params, total_macs)
    return Plan(
        model=model_name,
        method=config.method,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=layers,
        target={
            "ratio": config.ratio,
            "flops": config.flops,
            "achieved_ratio": total_params / totals["params_after"],
            "achieved_flops_reduction": 1.0 - totals["macs_after"] / max(total_macs, 1),
            "rank_rule": rule.name,
            "knob": {rule.knob_name: selection.knob},
            "max_ratio": total_params / selection.min_params,
        },
        totals=totals,
        warnings=warnings,
    )


def _candidates(
    model: nn.Module,
    config: LowRankConfig,
    geometry: dict[str, LayerGeometry],
    stem: str | None,
    filter_fn: FilterFn | None,
    total_params: int,
    total_macs: int,
) -> tuple[dict[str, LayerPlan], list[Candidate]]:
    """Step 1: a keep entry (with its reason) for every layer left dense, a candidate for every other one."""
    conv_fact = factorization(config.conv_method, hooi_iters=config.hooi_iters)
    pointwise, linear = factorization("pointwise-svd"), factorization("linear-svd")
    entries: dict[str, LayerPlan] = {}
    candidates: list[Candidate] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        if isinstance(module, nn.Conv2d):
            fact = pointwise if tuple(module.kernel_size) == (1, 1) else conv_fact
        else:
            fact = linear
        dense_p = layer_params(module)
        dense_m = dense_macs(module, geom) if geom is not None else 0
        reason = _skip_reason(module, path, fact, config, geom, stem, filter_fn)
        share_p, share_m = dense_p / max(total_params, 1), dense_m / max(total_macs, 1)
        if reason is None and share_p < config.min_share and share_m < config.min_share:
            reason = (
                f"negligible ({100 * share_p:.2f}% of params, {100 * share_m:.2f}% of MACs < "
                f"{100 * config.min_share:g}%): factorizing adds a layer for no measurable saving"
            )
        if reason is not None:
            entries[path] = keep_entry(path, module, geom, reason)
            continue
        assert geom is not None  # _skip_reason rejects modules the forward pass did not reach
        candidates.append(Candidate(path, module, fact, geom, dense_p, dense_m))
    return entries, candidates


def select_plan_ranks(
    candidates: list[Candidate], config: LowRankConfig, total_params: int, total_macs: int
) -> tuple[Any, Any, list[str]]:
    """Step 2: the rank rule's ranks for the target, falling back from EVBMF to uniform where it cannot reach it.

    Returns:
        The rule used, its selection (:func:`compress.ranks.select_ranks`) and the plan's warnings.
    """
    rule = rank_rule(config.rank_rule)
    warnings: list[str] = []
    ratio = config.ratio
    if isinstance(rule, EVBMFRule) and not rule.has_structure(candidates):
        warnings.append(
            "EVBMF found no structure above the noise level in any layer (random or untrained weights?): "
            "fell back to the uniform rank rule for the target ratio (train first: DATA=fashion-mnist TRAIN_EPOCHS=…, "
            "or pass trained WEIGHTS=…)"
        )
        if ratio is None and config.flops is None:
            raise CompressionError(
                "EVBMF found no structure in any layer and no RATIO was given to fall back on; pass RATIO=… or FLOPS=…"
            )
        rule = rank_rule("uniform")
    knob = 1.0 - config.energy if rule.name == "energy" else config.omega

    def select(rule: Any) -> Any:
        return select_ranks(
            candidates,
            rule,
            total_params=total_params,
            ratio=ratio,
            knob=knob,
            round_to=config.round_to,
            min_rank=config.min_rank,
            total_macs=total_macs,
            flops=config.flops,
        )

    try:
        selection = select(rule)
    except CompressionError as exc:
        if not isinstance(rule, EVBMFRule):
            raise
        # EVBMF keeps a layer whose spectrum is all noise (rank 0) at full rank (§2.1), so when too few
        # layers show structure the ratio is out of the ω knob's reach: fall back to the ratio knob.
        n_flat = sum(1 for c in candidates if not any(v > 0 for v in rule.vbmf_ranks(c)))
        warnings.append(
            f"EVBMF cannot reach {target_text(ratio, config.flops)}: {n_flat} of {len(candidates)} layers show no "
            f"structure above the noise level and stay at full rank ({exc}); fell back to the uniform rank rule for "
            "the target (train longer, or lower the target)"
        )
        evbmf, rule = rule, rank_rule("uniform")
        selection = select(rule)
        for cand in candidates:  # keep the raw EVBMF ranks in the plan all the same
            selection.info.setdefault(cand.path, {})["evbmf_ranks"] = list(evbmf.vbmf_ranks(cand))
    warnings.extend(selection.warnings)
    return rule, selection, warnings


def _layer_entry(cand: Candidate, selection: Any) -> LayerPlan:
    """Step 3: the plan entry of one candidate at its selected ranks (kept dense when they gain nothing)."""
    ranks = selection.ranks[cand.path]
    info = dict(selection.info.get(cand.path, {}))
    if ranks is None:
        entry = keep_entry(cand.path, cand.module, cand.geometry, "no parameter gain at the ranks this ratio allows")
        entry.info = info
        return entry
    params, macs = cand.cost(ranks)
    return LayerPlan(
        path=cand.path,
        type=type(cand.module).__name__,
        shape=list(cand.module.weight.shape),
        action=cand.factorization.name,
        ranks=list(ranks),
        reason=None,
        params_before=cand.params_dense,
        params_after=params,
        macs_before=cand.macs_dense,
        macs_after=macs,
        in_hw=hw_list(cand.geometry.in_hw),
        out_hw=hw_list(cand.geometry.out_hw),
        info=info,
    )


def _skip_reason(
    module: nn.Module,
    path: str,
    fact: Factorization,
    config: LowRankConfig,
    geom: LayerGeometry | None,
    stem: str | None,
    filter_fn: FilterFn | None,
) -> str | None:
    reason = common_skip_reason(
        module, path, geom, stem=stem, keep_stem=config.keep_stem, exclude=config.exclude, filter_fn=filter_fn
    )
    if reason is not None:
        return reason
    if isinstance(module, nn.Linear) and not config.compress_linear:
        return "Linear layers are left dense by config"
    if fact.name == "pointwise-svd" and not config.compress_pointwise:
        return "1×1 convs are left dense by config"
    reason = fact.unsupported_reason(module)
    if reason is not None:
        return reason
    min_ranks = tuple(min(config.min_rank, m) for m in fact.max_ranks(module))
    if fact.params(module, min_ranks) >= layer_params(module):
        return f"too small to gain: even at ranks {list(min_ranks)} the factorized layer is not smaller"
    return None


# ================================================================================================ applying
# ================================================================================================ method
RANK_RULE = Option("--rank-rule", "rank_rule", "uniform (default) | param-reduction | evbmf | energy")
ENERGY = Option("--energy", "energy", "retained energy for --rank-rule energy without a target", type=finite_float)
OMEGA = Option("--omega", "omega", "EVBMF weakening factor without a target (1 = plain EVBMF)", type=finite_float)
HOOI_ITERS = Option("--hooi-iters", "hooi_iters", "HOOI sweeps after HOSVD for Tucker-2 (default 0)", type=nonneg_int)


class LowRankMethod(Method):
    """The per-layer baselines; ``LowRankMethod("tai", method="tai")`` etc."""

    config_type = LowRankConfig
    options = (RANK_RULE, ENERGY, OMEGA, ROUND_TO, MIN_RANK, HOOI_ITERS, EXCLUDE)
    summary = "per-layer factorization of every conv/Linear with ranks from one rank rule"

    def make_config(self, target: Target | None = None, *, use_default_target: bool = True, **options: Any) -> Any:
        """As :meth:`Method.make_config`; without any target the rank rule's own knob decides (EVBMF by default)."""
        if target is None and not use_default_target:
            options.setdefault("rank_rule", None)
            if options["rank_rule"] is None:
                options["rank_rule"] = "evbmf"
        return super().make_config(target, use_default_target=use_default_target, **options)

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
        """See :func:`plan_lowrank`."""
        return plan_lowrank(model, config, example_input, model_name=model_name, filter_fn=filter_fn)


for _name in CONV_METHODS:
    register(LowRankMethod(_name, method=_name))
