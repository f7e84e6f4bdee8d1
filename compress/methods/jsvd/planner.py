"""Joint-SVD planning: the config, the paper's layer selection, the groups' ranks and the bisection of ρ.

A target compression factor (RATIO) or FLOPs cut (FLOPS) is reached by bisecting the anchor rate ρ; or
``rho`` is given directly, as in the paper.

**Plan representation.** Every member layer is an ordinary :class:`~compress.plan.LayerPlan` with
``action`` ``rjsvd`` / ``ljsvd`` / ``bijsvd`` (or ``tai`` for plain SVD), ``ranks`` ``[r]`` (``[r_l, r_r]``
for ``bijsvd``) and ``info["group"]``: layers with the same action and group name share their factors, in
plan order (that order is the stacking order). Editing ``info.group`` / ``ranks`` / ``action`` in
``plan.json`` and re-applying changes the architecture accordingly (``target["groups"]`` is a read-only
summary written by the planner; the layer entries are what
:func:`compress.methods.jsvd.apply.apply_joint_plan` reads). A shared factor's parameters are booked on
the group's first member (``info["shared_params"]``), so summing ``params_after`` over the layers counts
it once; MACs are per member (every member runs its own convs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from compress.factorizations import LayerGeometry, dense_macs, factorization
from compress.methods.jsvd.grouping import (
    JOINT_METHODS,
    JointGroup,
    find_groups,
    group_ranks,
    locate,
    member_costs,
    pair_macs,
    repeated_containers,
)
from compress.metrics import count_params, trace_geometry
from compress.plan import LayerPlan, Plan
from compress.planning import (
    FilterFn,
    common_skip_reason,
    hw_list,
    keep_entry,
    layer_params,
    plan_totals,
)
from compress.targets import check_target
from lowrank_core.errors import CompressionError, UserInputError

__all__ = ["JointSVDConfig", "norm_params", "plan_joint_svd"]

_SHORTCUT = re.compile(r"(^|\.)(downsample|shortcut)(\.|$)")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class JointSVDConfig:
    """Joint SVD of same-shaped convs across repeated blocks (method-jsvd.md).

    Attributes:
        method: ``ljsvd``, ``rjsvd1``, ``rjsvd2``, ``bijsvd`` or ``jsvd-tai`` (per-layer Tai baseline).
        ratio: Target whole-model parameter compression factor (dense / compressed), > 1; ρ is bisected to
            hit it. Exactly one of ``ratio``, ``flops`` and ``rho`` is given.
        flops: Target fraction of the whole model's FLOPs (MACs) to remove, in (0, 1); ρ is bisected to hit it.
        rho: The paper's anchor rank rate ``rank_rate_SVD`` (Tai rank = floor(ρ·O), floor(ρ·min(I, O)) for 1×1).
        bi_p: Bi-JSVD's left proportion p = r_l / (r_l + r_r) (a budget share for unequal 1×1 factors, A2).
        bi_iters: Bi-JSVD's block-alternating iterations K (30 in the paper).
        ratio_excludes_bn: Measure ``ratio`` as the paper's CF (normalisation parameters excluded) instead
            of the project's ``count_params`` ratio.
        keep_first_stage: Leave the first repeated container (ResNet ``layer1`` / conv2_x) dense, as the paper.
        keep_shortcuts: Leave ``downsample`` / ``shortcut`` projection convs dense, as the paper.
        tolerance: Relative miss of ``ratio`` above which planning warns.
        exclude: fnmatch patterns of module paths to leave dense.
    """

    method: str = "ljsvd"
    ratio: float | None = None
    flops: float | None = None
    rho: float | None = None
    bi_p: float = 0.5
    bi_iters: int = 30
    ratio_excludes_bn: bool = False
    keep_first_stage: bool = True
    keep_shortcuts: bool = True
    tolerance: float = 0.03
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.method not in JOINT_METHODS:
            raise UserInputError(f"unknown joint-SVD method {self.method!r}; known: {', '.join(sorted(JOINT_METHODS))}")
        given = [n for n, v in (("RATIO", self.ratio), ("FLOPS", self.flops), ("--rho", self.rho)) if v is not None]
        if len(given) != 1:
            raise UserInputError(
                f"{self.method} needs exactly one of RATIO, FLOPS and --rho "
                f"(got ratio={self.ratio}, flops={self.flops}, rho={self.rho})"
            )
        target = check_target(self.ratio, self.flops, rho=self.rho)  # RATIO > 1 / FLOPS in (0, 1), finite
        if target is not None and isinstance(getattr(self, target.kind), str):
            object.__setattr__(self, target.kind, target.value)
        if self.rho is not None and (isinstance(self.rho, bool) or not 0.0 < self.rho <= 1.0):
            raise UserInputError(f"--rho must be in (0, 1] (the paper uses 0.04 and 0.08), got {self.rho}")
        if not 0.0 <= self.bi_p <= 1.0:
            raise UserInputError(f"--bi-p must be in [0, 1] (left share of Bi-JSVD), got {self.bi_p}")
        if self.bi_iters < 1:
            raise UserInputError(f"--bi-iters must be ≥ 1, got {self.bi_iters}")
        if not 0.0 < self.tolerance < 1.0:
            raise UserInputError(f"tolerance must be in (0, 1), got {self.tolerance}")

    @property
    def scheme(self) -> str:
        """Scheme of the joint groups: ``rjsvd``, ``ljsvd``, ``bijsvd`` or ``tai`` (no joint groups)."""
        return JOINT_METHODS[self.method]

    @property
    def hid_joins(self) -> bool:
        """Whether members with a different input depth (HID) join their group (RJSVD-1 only)."""
        return self.method == "rjsvd1"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d


def norm_params(model: nn.Module) -> int:
    """Parameters of normalisation layers (BN/GN/LN), which the paper's CF excludes."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, _NORMS):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def _bias(module: nn.Module) -> int:
    return int(module.bias.numel()) if getattr(module, "bias", None) is not None else 0


def _skip_reason(
    path: str,
    module: nn.Module,
    config: JointSVDConfig,
    geom: LayerGeometry | None,
    containers: list[str],
    first_stage: str | None,
    filter_fn: FilterFn | None,
) -> str | None:
    """Why the paper's layer selection leaves this layer dense (shared rules first, in the paper's order)."""
    if geom is None:
        return common_skip_reason(module, path, geom)
    if not isinstance(module, nn.Conv2d):
        return "the joint-SVD paper decomposes convs only (FC layers stay dense)"
    if locate(path, containers) is None:
        return "outside any repeated block (stem, head): the joint-SVD paper leaves it dense"
    if config.keep_first_stage and first_stage is not None and path.startswith(f"{first_stage}."):
        return "first stage (conv2_x) is left dense by the paper's rule"
    if config.keep_shortcuts and _SHORTCUT.search(path):
        return "shortcut projection is left dense by the paper's rule"
    reason = common_skip_reason(module, path, geom, exclude=config.exclude, filter_fn=filter_fn)
    return reason if reason is not None else factorization("tai").unsupported_reason(module)


@dataclass
class _GroupSpec:
    group: JointGroup
    shapes: list[tuple[int, ...]]
    dense: int  # weights + biases of the members
    biases: int
    dense_macs: int


def plan_joint_svd(
    model: nn.Module,
    config: JointSVDConfig,
    example_input: torch.Tensor,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Group the convs, pick ρ (given, or bisected for ``config.ratio`` / ``config.flops``) and every group's ranks.

    Returns:
        The plan; ``target`` holds ``rho``, ``achieved_ratio`` (``count_params`` convention),
        ``cf_excluding_bn`` (the paper's CF) and the groups.

    Raises:
        CompressionError: nothing to compress, or the target is out of reach.
    """
    geometry, _, total_macs = trace_geometry(model, example_input)
    total_params = count_params(model)
    norms = norm_params(model)
    containers = repeated_containers(model)
    with_convs = [c for c in containers if c]  # module order
    first_stage = with_convs[0] if with_convs else None

    keep: dict[str, LayerPlan] = {}
    candidates: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        reason = _skip_reason(path, module, config, geom, containers, first_stage, filter_fn)
        if reason is None:
            candidates.append(path)
        else:
            keep[path] = keep_entry(path, module, geom, reason)
    if not candidates:
        raise CompressionError(
            f"nothing to compress in {model_name}: no conv inside repeated blocks passes the rules; see the plan reasons"
        )
    specs = _group_specs(model, candidates, config.method, geometry)
    p = Fraction(str(config.bi_p))

    def params_after(rho: Fraction) -> int:
        saved = 0
        for s in specs:
            ranks = group_ranks(s.shapes, s.group.scheme, rho, p)
            private, shared = member_costs(s.shapes, s.group.scheme, ranks)
            saved += s.dense - (sum(private) + shared + s.biases)
        return total_params - saved

    offset = norms if config.ratio_excludes_bn else 0

    def ratio_at(rho: Fraction) -> float:
        return (total_params - offset) / (params_after(rho) - offset)

    def macs_cut_at(rho: Fraction) -> float:
        saved = 0
        for s in specs:
            total = sum(group_ranks(s.shapes, s.group.scheme, rho, p))
            after = sum(
                pair_macs(shape, total, geometry[pth]) for shape, pth in zip(s.shapes, s.group.members, strict=True)
            )
            saved += s.dense_macs - after
        return saved / max(total_macs, 1)

    rho, warnings = _choose_rho(config, model_name, ratio_at, macs_cut_at)

    layers_by_path: dict[str, LayerPlan] = dict(keep)
    group_info: list[dict[str, Any]] = []
    for s in specs:
        ranks = group_ranks(s.shapes, s.group.scheme, rho, p)
        layers_by_path.update(_group_entries(model, s, ranks, geometry))
        if s.group.scheme != "tai":
            group_info.append(
                {"name": s.group.name, "scheme": s.group.scheme, "ranks": list(ranks), "members": s.group.members}
            )

    layers = [layers_by_path[pth] for pth, _ in model.named_modules() if pth in layers_by_path]
    totals = plan_totals(layers, total_params, total_macs)
    after, macs_after = totals["params_after"], totals["macs_after"]
    return Plan(
        model=model_name,
        method=config.method,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=layers,
        target={
            "ratio": config.ratio,
            "flops": config.flops,
            "achieved_flops_reduction": 1.0 - macs_after / max(total_macs, 1),
            "rho": float(rho),
            "achieved_ratio": total_params / after,
            "cf_excluding_bn": (total_params - norms) / (after - norms),
            "norm_params": norms,
            "groups": group_info,
        },
        totals=totals,
        warnings=warnings,
    )


def _group_specs(model: nn.Module, candidates: list[str], method: str, geometry: dict[str, Any]) -> list[_GroupSpec]:
    """The groups of same-shape convs (:func:`find_groups`) with their shapes, dense params, biases and MACs."""
    specs = []
    for g in find_groups(model, candidates, method):
        mods = [model.get_submodule(p) for p in g.members]
        specs.append(
            _GroupSpec(
                group=g,
                shapes=[tuple(int(v) for v in m.weight.shape) for m in mods],
                dense=sum(layer_params(m) for m in mods),
                biases=sum(_bias(m) for m in mods),
                dense_macs=sum(dense_macs(m, geometry[pth]) for pth, m in zip(g.members, mods, strict=True)),
            )
        )
    return specs


def _group_entries(
    model: nn.Module, spec: _GroupSpec, ranks: Sequence[int], geometry: dict[str, Any]
) -> dict[str, LayerPlan]:
    """The plan entry of every member of one group at the group's ranks (the shared factor counted once)."""
    g = spec.group
    private, shared = member_costs(spec.shapes, g.scheme, ranks)
    entries = {}
    for k, path in enumerate(g.members):
        module = model.get_submodule(path)
        geom = geometry[path]
        info: dict[str, Any] = {"group": g.name, "member": k, "size": len(g.members)}
        if g.scheme != "tai":
            info["shared"] = {"rjsvd": "V (1×F2 conv)", "ljsvd": "U (F1×1 conv)", "bijsvd": "V_r and U_l"}[g.scheme]
        if k == 0 and shared:
            info["shared_params"] = shared
        entries[path] = LayerPlan(
            path=path,
            type="Conv2d",
            shape=list(spec.shapes[k]),
            action=g.scheme,
            ranks=list(ranks),
            reason=None,
            params_before=layer_params(module),
            params_after=private[k] + _bias(module) + (shared if k == 0 else 0),
            macs_before=dense_macs(module, geom),
            macs_after=pair_macs(spec.shapes[k], sum(ranks), geom),
            in_hw=hw_list(geom.in_hw),
            out_hw=hw_list(geom.out_hw),
            info=info,
        )
    return entries


def _choose_rho(
    config: JointSVDConfig,
    model_name: str,
    ratio_at: Callable[[Fraction], float],
    macs_cut_at: Callable[[Fraction], float],
) -> tuple[Fraction, list[str]]:
    """ρ: given, or bisected for the config's RATIO / FLOPS target; plus the warnings of a missed target.

    Raises:
        CompressionError: the target is out of reach with the paper's layer selection.
    """
    warnings: list[str] = []
    if config.rho is not None:
        return Fraction(str(config.rho)), warnings
    if config.flops is not None:
        # The FLOPs cut is a non-increasing step function of ρ: bisect on 1 / (1 − cut) like a ratio.
        rho, miss = _bisect_rho(lambda r: 1.0 / max(1.0 - macs_cut_at(r), 1e-12), 1.0 / (1.0 - config.flops))
        got = macs_cut_at(rho)
        lo_cut = macs_cut_at(Fraction(1, 10**4))
        if config.flops > lo_cut + 0.03 * (1.0 - config.flops):
            raise CompressionError(
                f"FLOPS={config.flops:g} is out of reach for {config.method} on {model_name} (at most "
                f"{100 * lo_cut:.1f}% fewer FLOPs with the paper's layer selection); pick a smaller FLOPS"
            )
        if miss > config.tolerance:
            warnings.append(
                f"FLOPS={config.flops:g} reached only as {got:.3f} (rank floors make the cut a step function of ρ)"
            )
        return rho, warnings
    assert config.ratio is not None
    rho, miss = _bisect_rho(ratio_at, float(config.ratio))
    if miss > config.tolerance:
        best = ratio_at(rho)
        lo, hi = ratio_at(Fraction(1)), ratio_at(Fraction(1, 10**4))
        if config.ratio > hi * (1 + config.tolerance) or config.ratio < lo * (1 - config.tolerance):
            raise CompressionError(
                f"RATIO={config.ratio:g} is out of reach for {config.method} on {model_name} "
                f"(achievable {lo:.2f}–{hi:.2f} with the paper's layer selection); pick a RATIO in that range"
            )
        warnings.append(
            f"RATIO={config.ratio:g} reached only as {best:.3f} (rank floors make the factor a step function of ρ)"
        )
    return rho, warnings


def _bisect_rho(ratio_at: Callable[[Fraction], float], target: float) -> tuple[Fraction, float]:
    """ρ whose compression factor is nearest ``target`` (the factor is a non-increasing step function of ρ)."""
    lo, hi = 1e-4, 1.0  # ratio_at(lo) ≥ ratio_at(hi)
    if ratio_at(Fraction(hi)) >= target:
        lo = hi
    elif ratio_at(Fraction(lo)) <= target:
        hi = lo
    else:
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if ratio_at(Fraction(mid)) > target:
                lo = mid
            else:
                hi = mid
    best = min((Fraction(lo), Fraction(hi)), key=lambda r: abs(ratio_at(r) / target - 1))
    # A short decimal ρ with the same ranks reads better in plans and reports.
    for digits in range(2, 8):
        short = Fraction(round(float(best), digits)).limit_denominator(10**digits)
        if short > 0 and ratio_at(short) == ratio_at(best):
            best = Fraction(str(round(float(best), digits)))
            break
    return best, abs(ratio_at(best) / target - 1)
