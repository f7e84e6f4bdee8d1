"""LRSD's parameter budget: storage of ``L + S``, the rank/cardinality split, per-layer ratios, FLOPs targets."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import nn

from compress.plan import LayerPlan
from lowrank_core.errors import CompressionError, UserInputError

__all__ = [
    "BudgetOptions",
    "allocate_ratios",
    "card_for",
    "card_limit",
    "entries_for_flops",
    "kernel_macs",
    "layer_storage",
    "matrix_dims",
    "split_budget",
]


class BudgetOptions(Protocol):
    """The allocation options the budget reads (:class:`~compress.methods.lrsd.planner.LowRankSparseConfig` has them).

    A protocol, so this module needs nothing of the planner that imports it.
    """

    @property
    def allocation(self) -> str:
        """``uniform`` or ``conv_fc``."""

    @property
    def conv_ratio(self) -> float | None:
        """A fixed conv ratio, or ``None``."""

    @property
    def fc_ratio(self) -> float | None:
        """A fixed FC ratio, or ``None``."""

    @property
    def fc_factor(self) -> float:
        """FC ratio / conv ratio when neither is fixed."""

    @property
    def layer_ratios(self) -> Sequence[tuple[str, float]]:
        """``(pattern, ratio)`` overrides."""

    @property
    def flops(self) -> float | None:
        """The FLOPs fraction to remove, or ``None``."""

    @property
    def structured(self) -> str:
        """``none`` or ``2:4``."""


def matrix_dims(module: nn.Module) -> tuple[int, int, int, int]:
    """``(m, k, channels, taps)`` of the matrix view."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        t, s, kh, kw = (int(v) for v in w.shape)
        return t, s * kh * kw, s, kh * kw
    return int(w.shape[0]), int(w.shape[1]), int(w.shape[1]), 1


def layer_storage(m: int, k: int, rank: int, card: int, *, structured: str = "none") -> dict[str, int]:
    """Stored weights of ``L + S`` (bias excluded), counted several honest ways.

    Returns:
        ``values`` = r(m+k) + c (the paper's count, index not charged); ``index`` = CSR index entries
        (c column indices + m+1 row pointers, 0 when c = 0); ``values_plus_index``; ``dense_storage`` =
        r(m+k) + m·k (the exported dense-with-zeros sparse branch); with ``structured="2:4"`` also
        ``values_2to4`` = r(m+k) + m·k/2 (what a 2:4 sparse tensor-core kernel stores, plus 2-bit metadata
        per kept value, ``metadata_bits_2to4``).
    """
    lowrank = rank * (m + k)
    index = card + m + 1 if card else 0
    out = {
        "values": lowrank + card,
        "index": index,
        "values_plus_index": lowrank + card + index,
        "dense_storage": lowrank + (m * k if card else 0),
    }
    if structured == "2:4":
        out["values_2to4"] = lowrank + (m * k // 2 if card else 0)
        out["metadata_bits_2to4"] = 2 * (m * k // 2) if card else 0
    return out


def split_budget(
    m: int,
    k: int,
    budget: int,
    rank_fraction: float,
    *,
    charge_index: bool = False,
    max_card: int | None = None,
) -> tuple[int, int]:
    """Split a per-layer weight budget between rank and cardinality (spec §1.5).

    ``r = round(rank_fraction · floor(B/(m+k)))`` and ``c = B − r(m+k)`` (values only); with
    ``charge_index`` each non-zero also pays one index entry and the row pointers: ``c = ⌊(B − r(m+k) − (m+1))/2⌋``.
    ``c`` is capped at ``max_card`` (default m·k; m·k/2 for 2:4).
    """
    if budget < 0 or not 0.0 <= rank_fraction <= 1.0:
        raise UserInputError(f"need budget ≥ 0 and rank_fraction in [0, 1], got {budget}, {rank_fraction}")
    r_max = min(budget // (m + k), m, k)
    rank = round(rank_fraction * r_max)
    return rank, card_for(m, k, budget, rank, charge_index=charge_index, max_card=max_card)


def card_for(m: int, k: int, budget: int, rank: int, *, charge_index: bool, max_card: int | None) -> int:
    """The cardinality a budget leaves after rank ``rank`` (index entries paid too with ``charge_index``)."""
    left = budget - rank * (m + k)
    card = (left - (m + 1)) // 2 if charge_index else left
    return int(max(0, min(card, m * k if max_card is None else max_card)))


def allocate_ratios(
    weights: dict[str, int],
    is_fc: dict[str, bool],
    fixed_params: int,
    target_params: float,
    config: BudgetOptions,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer ratios so that the compressed layers plus everything else meet ``target_params``.

    Args:
        weights: Weight count ``m·k`` of each candidate layer.
        is_fc: Whether each candidate is a Linear layer.
        fixed_params: Parameters that stay (dense layers, biases, norms).
        target_params: Whole-model parameter target (``total / ratio``).
        config: Allocation options (``allocation``, ``conv_ratio``, ``fc_ratio``, ``fc_factor``, ``layer_ratios``).

    Returns:
        ``(ratio per layer, summary)``; a layer whose ratio comes out ≤ 1 should stay dense.

    Raises:
        CompressionError: when even infinite compression of the free layers misses the target.
    """
    ratios: dict[str, float] = {}
    free: dict[str, int] = {}
    budget = float(target_params) - fixed_params
    for path, w in weights.items():
        override = next((float(r) for pat, r in config.layer_ratios if fnmatch.fnmatchcase(path, pat)), None)
        if override is not None:
            ratios[path] = override
            budget -= w / override
        else:
            free[path] = w
    conv_w = sum(w for p, w in free.items() if not is_fc[p])
    fc_w = sum(w for p, w in free.items() if is_fc[p])
    summary: dict[str, Any] = {"allocation": config.allocation}
    if not free:
        return ratios, summary
    if budget <= 0:
        raise CompressionError(
            f"RATIO unreachable: the layers left dense (and fixed ratios) already hold {target_params - budget:.0f} "
            f"of the {target_params:.0f} allowed parameters; lower RATIO or compress more layers"
        )
    if config.allocation == "uniform" or fc_w == 0 or conv_w == 0:
        rc = rf = (conv_w + fc_w) / budget
    elif config.conv_ratio is not None:
        rc = config.conv_ratio
        left = budget - conv_w / rc
        if left <= 0:
            raise CompressionError(
                f"conv_ratio {rc} alone exceeds the budget of RATIO; raise conv_ratio or lower RATIO"
            )
        rf = fc_w / left
    elif config.fc_ratio is not None:
        rf = config.fc_ratio
        left = budget - fc_w / rf
        if left <= 0:
            raise CompressionError(f"fc_ratio {rf} alone exceeds the budget of RATIO; raise fc_ratio or lower RATIO")
        rc = conv_w / left
    else:
        rc = (conv_w + fc_w / config.fc_factor) / budget
        rf = config.fc_factor * rc
    for path in free:
        ratios[path] = rf if is_fc[path] else rc
    summary.update(conv_ratio=rc if conv_w else None, fc_ratio=rf if fc_w else None)
    return ratios, summary


def card_limit(module: nn.Module, structured: str) -> int:
    """The largest cardinality of ``S``: every entry, or half of them under the 2:4 structure."""
    m, k, _, _ = matrix_dims(module)
    return m * k // 2 if structured == "2:4" else m * k


def kernel_macs(entries: dict[str, LayerPlan], total_macs: int, structured: str) -> int:
    """Whole-model MACs with every LRSD layer run by a sparse kernel (2:4 tensor cores if ``structured``)."""
    key = "macs_2to4" if structured == "2:4" else "macs_sparse_kernel"
    return total_macs - sum(e.macs_before - e.info.get(key, e.macs_after) for e in entries.values())


def entries_for_flops(
    layer_entries: Callable[[float], tuple[dict[str, LayerPlan], dict[str, Any]]],
    total_params: int,
    total_macs: int,
    config: BudgetOptions,
    warnings: list[str],
) -> tuple[dict[str, LayerPlan], dict[str, Any]]:
    """Bisect the parameter target until the sparse-kernel MACs meet ``config.flops`` (they fall with it)."""
    assert config.flops is not None
    target = total_macs * (1.0 - config.flops)

    def macs_at(ratio: float) -> int:
        try:
            return kernel_macs(layer_entries(total_params / ratio)[0], total_macs, config.structured)
        except CompressionError:  # past the reachable parameter budget
            return -1

    lo, hi = 1.0 + 1e-6, 1e4
    while hi > lo * 1.01 and macs_at(hi) < 0:  # the largest parameter ratio the layers can still reach
        hi = math.sqrt(lo * hi)
    floor_macs = macs_at(hi)
    if floor_macs < 0 or floor_macs > target * 1.03:
        raise CompressionError(
            f"FLOPS={config.flops:g} is not reachable for lrsd: even at the highest compression the sparse-kernel "
            f"MACs stay at {100 * floor_macs / total_macs:.1f}% of dense; lower FLOPS or compress more layers"
        )
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        got = macs_at(mid)
        if got < 0 or got <= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    chosen, summary = layer_entries(total_params / hi)
    exported = total_macs - sum(e.macs_before - e.macs_after for e in chosen.values())
    warnings.append(
        f"FLOPS={config.flops:g} counts the MACs a sparse kernel executes"
        f"{' (2:4 tensor cores run S at half cost)' if config.structured == '2:4' else ''}; the exported ONNX graph "
        f"runs the sparse branch as a dense conv, so it executes {100 * exported / total_macs:.0f}% of the dense MACs"
    )
    summary = {**summary, "flops_measure": "2:4 sparse tensor cores" if config.structured == "2:4" else "sparse kernel"}
    return chosen, summary
