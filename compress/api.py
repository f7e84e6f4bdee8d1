"""Public compression API: one frozen config per method, one registered planner, plan → apply → record.

Follows torchao's ``quantize_(model, config, filter_fn)``: :func:`compress_` takes a model and a method
config, plans, applies the plan in place and returns the plan with the measured errors recorded.
Planning and applying are also available separately (:func:`plan_compression`, :func:`apply_plan_`),
so a plan can be inspected, edited and re-applied to a fresh base model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from compress.lowrank import (
    FACTORIZATIONS,
    Factorization,
    LayerGeometry,
    dense_macs,
    factorization,
)
from compress.metrics import count_macs, count_params, trace_geometry
from compress.plan import KEEP, LayerPlan, Plan
from compress.ranks import RANK_RULES, Candidate, EVBMFRule, rank_rule, select_ranks
from lowrank_deploy.errors import CompressionError, UserInputError

__all__ = [
    "METHODS",
    "FilterFn",
    "LowRankConfig",
    "MethodConfig",
    "apply_plan_",
    "check_flops",
    "compress_",
    "method_config",
    "plan_compression",
    "planned_module",
    "register_applier",
    "register_method",
    "register_planner",
]

FilterFn = Callable[[nn.Module, str], bool]


class MethodConfig(Protocol):
    """What every method config provides: its CLI name and a JSON view."""

    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of the config, written next to every artifact."""
        ...


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
            raise UserInputError(f"unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}")
        if self.flops is not None:
            check_flops(self.flops)
            object.__setattr__(self, "ratio", None)  # the FLOPs target replaces the (default) ratio
        if self.ratio is not None and (not isinstance(self.ratio, (int, float)) or not self.ratio > 1.0):
            raise UserInputError(f"RATIO must be a number > 1 (parameter compression factor), got {self.ratio!r}")
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


CONV_METHODS = {"tucker2": "tucker2", "svd": "svd", "tai": "tai", "cp": "cp"}


def check_flops(flops: Any) -> float:
    """Validate a FLOPs-reduction target (the fraction of the whole model's MACs to remove); return it."""
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0.0 < flops < 1.0:
        raise UserInputError(
            f"FLOPS must be the fraction of FLOPs to remove, in (0, 1) (0.5 = half the FLOPs), got {flops!r}"
        )
    return float(flops)


def target_text(ratio: float | None, flops: float | None) -> str:
    """``RATIO=4`` or ``FLOPS=0.5``: the target as the user wrote it, for messages."""
    return f"FLOPS={flops:g}" if flops is not None else f"RATIO={ratio:g}"


_C = TypeVar("_C")
Planner = Callable[..., Plan]
_PLANNERS: dict[type, Planner] = {}
METHODS: dict[str, Callable[..., Any]] = {}
_METHOD_FIELDS: dict[str, set[str]] = {}
Applier = Callable[..., nn.Module]
_APPLIERS: dict[str, Applier] = {}


def register_method(name: str, config_type: type, **fixed: Any) -> None:
    """Expose a method under a CLI name: ``method_config(name, **options)`` builds ``config_type(**fixed, **options)``.

    ``config_type`` is a frozen dataclass; only its fields are accepted as options.
    """
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = functools.partial(config_type, **fixed)
    _METHOD_FIELDS[name] = {f.name for f in dataclasses.fields(config_type)} - set(fixed)


def register_planner(config_type: type[_C]) -> Callable[[Planner], Planner]:
    """Decorator registering the planner that handles configs of ``config_type``."""

    def wrap(fn: Planner) -> Planner:
        _PLANNERS[config_type] = fn
        return fn

    return wrap


def register_applier(method: str) -> Callable[[Applier], Applier]:
    """Decorator registering how plans of ``method`` are applied (default: one factorization per layer).

    The applier is called as ``fn(model, plan, init=...)`` and must follow :func:`apply_plan_`'s contract.
    Methods whose layers share tensors (joint SVD) or need more than a layer's weight use this hook.
    """

    def wrap(fn: Applier) -> Applier:
        _APPLIERS[method] = fn
        return fn

    return wrap


# Options every CLI invocation passes whether or not the method uses them (e.g. ``--round-to auto``).
_SOFT_OPTIONS = frozenset({"round_to"})


def method_config(name: str, *, ratio: float | None = 4.0, **options: Any) -> Any:
    """Build the config of method ``name``.

    ``ratio`` is passed as given (``None`` = use the method's own knob); other options that are ``None``
    fall back to the config's defaults. An option the method does not take is a :class:`UserInputError`.
    """
    try:
        factory = METHODS[name]
    except KeyError:
        raise UserInputError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    accepted = _METHOD_FIELDS[name]
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(k for k in given if k not in accepted and k not in _SOFT_OPTIONS)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise UserInputError(f"method {name!r} does not take {flags}; drop it (see `python -m compress run --help`)")
    return factory(ratio=ratio, **{k: v for k, v in given.items() if k in accepted})


for _name in CONV_METHODS:
    register_method(_name, LowRankConfig, method=_name)


# ================================================================================================ planning
def plan_compression(
    model: nn.Module,
    config: Any,
    example_input: torch.Tensor,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Decide, without changing ``model``, what each layer becomes.

    Args:
        model: The dense model (not modified).
        config: A registered method config, e.g. :class:`LowRankConfig`.
        example_input: One input batch (shapes and MACs are measured on it).
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; layers where it returns False stay dense.
    """
    planner = _PLANNERS.get(type(config))
    if planner is None:
        raise UserInputError(f"no planner registered for {type(config).__name__}")
    return planner(model, config, example_input, model_name=model_name, filter_fn=filter_fn)


@register_planner(LowRankConfig)
def _plan_lowrank(
    model: nn.Module,
    config: LowRankConfig,
    example_input: torch.Tensor,
    *,
    model_name: str,
    filter_fn: FilterFn | None,
) -> Plan:
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = _find_stem(model, order, int(example_input.shape[1]))
    conv_fact = factorization(config.conv_method, hooi_iters=config.hooi_iters)
    pointwise, linear = factorization("pointwise-svd"), factorization("linear-svd")
    total_params = count_params(model)

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
        dense_p = _layer_params(module)
        dense_m = dense_macs(module, geom) if geom is not None else 0
        reason = _skip_reason(module, path, fact, config, geom, stem, filter_fn)
        share_p, share_m = dense_p / max(total_params, 1), dense_m / max(total_macs, 1)
        if reason is None and share_p < config.min_share and share_m < config.min_share:
            reason = (
                f"negligible ({100 * share_p:.2f}% of params, {100 * share_m:.2f}% of MACs < "
                f"{100 * config.min_share:g}%): factorizing adds a layer for no measurable saving"
            )
        if reason is not None:
            entries[path] = _keep_entry(path, module, geom, reason)
            continue
        assert geom is not None  # _skip_reason rejects modules the forward pass did not reach
        candidates.append(Candidate(path, module, fact, geom, dense_p, dense_m))

    rule = rank_rule(config.rank_rule)
    warnings: list[str] = []
    ratio = config.ratio
    if isinstance(rule, EVBMFRule) and candidates and not rule.has_structure(candidates):
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
    if not candidates:
        raise CompressionError(
            f"nothing to compress in {model_name}: every Conv2d/Linear is excluded by rule (see the plan reasons)"
        )
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
    for cand in candidates:
        ranks = selection.ranks[cand.path]
        info = dict(selection.info.get(cand.path, {}))
        if ranks is None:
            entry = _keep_entry(
                cand.path, cand.module, cand.geometry, "no parameter gain at the ranks this ratio allows"
            )
            entry.info = info
        else:
            params, macs = cand.cost(ranks)
            entry = LayerPlan(
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
                in_hw=_hw(cand.geometry.in_hw),
                out_hw=_hw(cand.geometry.out_hw),
                info=info,
            )
        entries[cand.path] = entry

    layers = [entries[p] for p, m in model.named_modules() if p in entries]
    params_after = total_params - sum(e.params_before - e.params_after for e in layers)
    macs_after = total_macs - sum(e.macs_before - e.macs_after for e in layers)
    plan = Plan(
        model=model_name,
        method=config.method,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=layers,
        target={
            "ratio": ratio,
            "flops": config.flops,
            "achieved_ratio": total_params / params_after,
            "achieved_flops_reduction": 1.0 - macs_after / max(total_macs, 1),
            "rank_rule": rule.name,
            "knob": {rule.knob_name: selection.knob},
            "max_ratio": total_params / selection.min_params,
        },
        totals={
            "params_before": total_params,
            "params_after": params_after,
            "macs_before": total_macs,
            "macs_after": macs_after,
        },
        warnings=warnings,
    )
    return plan


def _find_stem(model: nn.Module, order: list[str], in_channels: int) -> str | None:
    for path in order:
        module = model.get_submodule(path)
        if isinstance(module, nn.Conv2d) and module.in_channels == in_channels:
            return path
    return None


def _skip_reason(
    module: nn.Module,
    path: str,
    fact: Factorization,
    config: LowRankConfig,
    geom: LayerGeometry | None,
    stem: str | None,
    filter_fn: FilterFn | None,
) -> str | None:
    if geom is None:
        return "not reached by the forward pass (unused or conditional layer)"
    if config.keep_stem and path == stem:
        return "stem (image-input conv) is left dense by rule: few parameters, most sensitive layer"
    if any(fnmatch.fnmatchcase(path, pat) for pat in config.exclude):
        return "excluded by pattern"
    if filter_fn is not None and not filter_fn(module, path):
        return "excluded by filter_fn"
    if isinstance(module, nn.Linear) and not config.compress_linear:
        return "Linear layers are left dense by config"
    if fact.name == "pointwise-svd" and not config.compress_pointwise:
        return "1×1 convs are left dense by config"
    reason = fact.unsupported_reason(module)
    if reason is not None:
        return reason
    min_ranks = tuple(min(config.min_rank, m) for m in fact.max_ranks(module))
    if fact.params(module, min_ranks) >= _layer_params(module):
        return f"too small to gain: even at ranks {list(min_ranks)} the factorized layer is not smaller"
    return None


def _keep_entry(path: str, module: nn.Module, geom: LayerGeometry | None, reason: str) -> LayerPlan:
    params = _layer_params(module)
    macs = dense_macs(module, geom) if geom is not None else 0
    return LayerPlan(
        path=path,
        type=type(module).__name__,
        shape=list(module.weight.shape),
        action=KEEP,
        ranks=None,
        reason=reason,
        params_before=params,
        params_after=params,
        macs_before=macs,
        macs_after=macs,
        in_hw=_hw(geom.in_hw) if geom else None,
        out_hw=_hw(geom.out_hw) if geom else None,
    )


def _layer_params(module: nn.Module) -> int:
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    return int(module.weight.numel()) + int(bias)


def _hw(hw: tuple[int, int] | None) -> list[int] | None:
    return None if hw is None else [int(hw[0]), int(hw[1])]


# ================================================================================================ applying
def planned_module(
    model: nn.Module, entry: LayerPlan, plan: Plan, types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
) -> nn.Module:
    """The module a plan entry refers to, checked against the entry (type and weight shape).

    Raises:
        CompressionError: the model has no such layer, or it is not one of ``types`` of the planned shape.
    """
    try:
        module = model.get_submodule(entry.path)
    except AttributeError:
        raise CompressionError(
            f"plan does not match the model: it has no layer {entry.path!r}; was the plan made for {plan.model}?"
        ) from None
    if not isinstance(module, types) or list(module.weight.shape) != list(entry.shape):
        kinds = "/".join(t.__name__ for t in types)
        raise CompressionError(
            f"plan does not match the model: {entry.path} is not a {kinds} of weight shape {entry.shape}"
            f"{'' if not hasattr(module, 'weight') else f' (it has {list(module.weight.shape)})'}"
        )
    return module


def apply_plan_(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Replace every planned layer of ``model`` in place; return ``model``.

    Args:
        model: A fresh base model of the architecture the plan was made for.
        plan: The plan.
        init: ``decompose`` fills the factors from the layer's weights (and records each layer's
            relative weight error in ``plan``); ``empty`` only builds the shapes, for loading saved
            weights afterwards.

    Raises:
        CompressionError: the plan does not match the model (missing layer, other shape).
    """
    if init not in ("decompose", "empty"):
        raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
    if plan.method in _APPLIERS:
        return _APPLIERS[plan.method](model, plan, init=init)
    hooi = int(plan.config.get("hooi_iters", 0) or 0)
    for entry in plan.factorized_layers:
        module = planned_module(model, entry, plan)
        if entry.action not in FACTORIZATIONS:
            raise CompressionError(f"plan names unknown factorization {entry.action!r} for {entry.path}")
        fact = factorization(entry.action, hooi_iters=hooi)
        ranks = tuple(int(r) for r in entry.ranks or ())
        fact.check_ranks(module, ranks)
        if init == "decompose":
            replacement, rel_error = fact.decompose(module, ranks)
            entry.rel_error = float(rel_error)
        else:
            replacement = fact.build(module, ranks).to(device=module.weight.device)
        replacement.train(module.training)
        _set_submodule(model, entry.path, replacement)
    return model


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def compress_(
    model: nn.Module,
    config: Any,
    example_input: torch.Tensor,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan, apply in place and record: the one-call entry point (torchao's ``quantize_`` shape).

    Returns:
        The plan, with per-layer weight errors and the measured whole-model params/MACs after compression.
    """
    plan = plan_compression(model, config, example_input, model_name=model_name, filter_fn=filter_fn)
    apply_plan_(model, plan)
    plan.totals["params_after_measured"] = count_params(model)
    plan.totals["macs_after_measured"] = count_macs(model, example_input)
    return plan


from compress import collaborative as _collaborative  # noqa: E402,F401  (registers cc)
from compress import joint_svd as _joint_svd  # noqa: E402,F401  (registers ljsvd/rjsvd1/rjsvd2/bijsvd)
from compress import lowrank_sparse as _lowrank_sparse  # noqa: E402,F401  (registers lrsd)
from compress import vbmf_tucker as _vbmf_tucker  # noqa: E402,F401  (registers vbmf-tucker2)
