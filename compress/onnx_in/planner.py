"""Ranks for the weight layers of an ONNX graph, with the PyTorch path's rules, rank rules and Plan format.

The skip rules (stem, ``exclude``, ``min_share``, no gain at the minimum rank, grouped convs) and the
target bisection (:func:`compress.ranks.select_ranks`) are those of :func:`compress.methods.lowrank.plan_lowrank`;
only the layers come from the graph (:mod:`compress.onnx_in.layers`) instead of a forward pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from compress.factorizations import Factorization, factorization
from compress.methods.lowrank import CONV_METHODS, LowRankConfig, select_plan_ranks
from compress.onnx_in.layers import OnnxLayer
from compress.plan import KEEP, LayerPlan, Plan
from compress.planning import hw_list, plan_totals
from compress.ranks import Candidate, rank_rule
from lowrank_core.errors import CompressionError, UserInputError

__all__ = ["ONNX_METHODS", "check_onnx_method", "layer_entry", "plan_onnx_layers"]

#: Methods that run on ONNX input (``auto`` is handled by :mod:`compress.onnx_in.latency`).
ONNX_METHODS = CONV_METHODS
_REFUSED = {
    "vbmf-tucker2": "its ExpandNets/orthogonal training stage and MUSCO fine-tuning need the PyTorch model; "
    "from ONNX use METHOD=tucker2 RANK_RULE=evbmf (the same EVBMF Tucker-2 ranks, no training)",
    "lrsd": "it fits W = L + S to each layer's responses through PyTorch modules; use METHOD=svd/tucker2/tai/cp",
    "cc": "its channel selection and gradients need the PyTorch model; use METHOD=svd/tucker2/tai/cp",
}
_JOINT = "shares one factor across the blocks of a stage, which needs the PyTorch module structure"

LayerFilter = Callable[[OnnxLayer], bool]


def check_onnx_method(name: str) -> None:
    """Refuse, in one line naming why, a method that cannot run on an ONNX graph."""
    if name in ONNX_METHODS or name == "auto":
        return
    if name in _REFUSED:
        raise UserInputError(f"METHOD={name} cannot compress an ONNX model: {_REFUSED[name]}")
    if name in ("ljsvd", "rjsvd1", "rjsvd2", "bijsvd", "jsvd-tai"):
        raise UserInputError(f"METHOD={name} cannot compress an ONNX model: it {_JOINT}; use METHOD=svd or tai")
    raise UserInputError(f"METHOD={name} cannot compress an ONNX model; use one of {', '.join(ONNX_METHODS)} or auto")


def _factorization_for(layer: OnnxLayer, config: LowRankConfig, conv: Factorization) -> Factorization:
    if layer.op != "Conv":
        return factorization("linear-svd")
    assert layer.module is not None
    return factorization("pointwise-svd") if tuple(layer.module.weight.shape[2:]) == (1, 1) else conv


def _stem(layers: Sequence[OnnxLayer], in_channels: int | None) -> str | None:
    """The first conv (graph order) that reads the image: as :func:`compress.planning.find_stem`."""
    for layer in layers:
        if layer.op == "Conv" and layer.module is not None and layer.module.in_channels == in_channels:
            return layer.path
    return None


def _skip_reason(
    layer: OnnxLayer,
    fact: Factorization,
    config: LowRankConfig,
    stem: str | None,
    shares: tuple[float, float],
    filter_fn: LayerFilter | None,
) -> str | None:
    assert layer.module is not None
    if config.keep_stem and layer.path == stem:
        return "stem (image-input conv) is left dense by rule: few parameters, most sensitive layer"
    if any(fnmatch.fnmatchcase(layer.path, pat) for pat in config.exclude):
        return "excluded by pattern"
    if filter_fn is not None and not filter_fn(layer):
        return "excluded by filter_fn"
    if layer.op != "Conv" and not config.compress_linear:
        return f"{layer.op} layers are left dense by config"
    if fact.name == "pointwise-svd" and not config.compress_pointwise:
        return "1×1 convs are left dense by config"
    reason = fact.unsupported_reason(layer.module)
    if reason is not None:
        return reason
    min_ranks = tuple(min(config.min_rank, m) for m in fact.max_ranks(layer.module))
    if fact.params(layer.module, min_ranks) >= layer.params:
        return f"too small to gain: even at ranks {list(min_ranks)} the factorized layer is not smaller"
    share_p, share_m = shares
    if share_p < config.min_share and share_m < config.min_share:
        return (
            f"negligible ({100 * share_p:.2f}% of params, {100 * share_m:.2f}% of MACs < "
            f"{100 * config.min_share:g}%): factorizing adds a layer for no measurable saving"
        )
    return None


def layer_entry(
    layer: OnnxLayer, action: str, ranks: Sequence[int] | None, reason: str | None, **cost: int
) -> LayerPlan:
    """The plan entry of one graph layer (``params``/``macs`` after the action; default: unchanged)."""
    module = layer.module
    shape = list(module.weight.shape) if module is not None else []
    geom = layer.geometry
    return LayerPlan(
        path=layer.path,
        type=layer.op,
        shape=[int(d) for d in shape],
        action=action,
        ranks=None if ranks is None else [int(r) for r in ranks],
        reason=reason,
        params_before=layer.params,
        params_after=cost.get("params", layer.params),
        macs_before=layer.macs,
        macs_after=cost.get("macs", layer.macs),
        in_hw=hw_list(geom.in_hw) if layer.op == "Conv" else None,
        out_hw=hw_list(geom.out_hw),
        info={"onnx_op": layer.op, "node_index": layer.index, "weight": layer.weight_name},
    )


def plan_onnx_layers(
    layers: Sequence[OnnxLayer],
    config: LowRankConfig,
    *,
    model_name: str,
    input_shape: Sequence[int],
    total_params: int,
    total_macs: int,
    filter_fn: LayerFilter | None = None,
) -> Plan:
    """The plan of a classic low-rank method (``tucker2``/``svd``/``tai``/``cp``) for the graph's layers.

    Raises:
        CompressionError: nothing to compress, or a target the candidates cannot reach.
    """
    conv = factorization(config.conv_method, hooi_iters=config.hooi_iters)
    stem = _stem(layers, int(input_shape[1]) if len(input_shape) > 1 else None)
    entries: dict[str, LayerPlan] = {}
    candidates: list[Candidate] = []
    for layer in layers:
        if layer.reason is not None or layer.module is None:
            entries[layer.path] = layer_entry(layer, KEEP, None, layer.reason or "no usable weight")
            continue
        fact = _factorization_for(layer, config, conv)
        shares = (layer.params / max(total_params, 1), layer.macs / max(total_macs, 1))
        reason = _skip_reason(layer, fact, config, stem, shares, filter_fn)
        if reason is not None:
            entries[layer.path] = layer_entry(layer, KEEP, None, reason)
            continue
        candidates.append(Candidate(layer.path, layer.module, fact, layer.geometry, layer.params, layer.macs))
    if not candidates:
        raise CompressionError(
            f"nothing to compress in {model_name}: no Conv/Gemm/MatMul with a constant weight may be factorized "
            "(see the plan reasons)"
        )
    rule, selection, warnings = select_plan_ranks(candidates, config, total_params, total_macs)
    rule_name = rule.name
    by_path = {layer.path: layer for layer in layers}
    for cand in candidates:
        ranks = selection.ranks[cand.path]
        layer = by_path[cand.path]
        if ranks is None:
            entry = layer_entry(layer, KEEP, None, "no parameter gain at the ranks this ratio allows")
        else:
            params, macs = cand.cost(ranks)
            entry = layer_entry(layer, cand.factorization.name, ranks, None, params=params, macs=macs)
        entry.info.update(selection.info.get(cand.path, {}), max_ranks=list(cand.max_ranks))
        entries[cand.path] = entry
    ordered = [entries[layer.path] for layer in layers]
    totals = plan_totals(ordered, total_params, total_macs)
    return Plan(
        model=model_name,
        method=config.method,
        config={**config.to_dict(), "source": "onnx"},
        input_shape=[int(d) for d in input_shape],
        layers=ordered,
        target={
            "ratio": config.ratio,
            "flops": config.flops,
            "achieved_ratio": total_params / max(totals["params_after"], 1),
            "achieved_flops_reduction": 1.0 - totals["macs_after"] / max(total_macs, 1),
            "rank_rule": rule_name,
            "knob": {rank_rule(rule_name).knob_name: selection.knob},
            "max_ratio": total_params / max(selection.min_params, 1),
        },
        totals=totals,
        warnings=warnings,
    )
