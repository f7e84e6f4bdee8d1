"""CC's applier: rebuild every planned conv from the plan alone, thinning producers and their BatchNorms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.methods.cc.modules import DECOMP, PRUNE, ChannelSelect
from compress.plan import KEEP, LayerPlan, Plan
from compress.planning import one_thread, planned_module, set_submodule
from lowrank_core.errors import CompressionError

__all__ = ["apply_cc_"]


def _indices(value: Any, n: int, what: str) -> list[int] | None:
    """Channel indices recorded in a plan, checked (distinct, in ``0..n-1``); ``None`` stays ``None``."""
    if value is None:
        return None
    idx = [int(i) for i in value]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= n:
        raise CompressionError(f"plan {what} must be distinct channel indices in 0..{n - 1}; regenerate the plan")
    return idx


def _build_layer(conv: nn.Conv2d, entry: LayerPlan, init: str) -> tuple[nn.Module, float | None]:
    """The replacement of ``conv`` described by ``entry`` (weights from ``conv`` when ``init='decompose'``)."""
    n_out, n_in, kh, kw = conv.weight.shape
    in_keep = _indices(entry.info.get("in_keep"), n_in, f"in_keep of {entry.path}")
    out_keep = _indices(entry.info.get("out_keep"), n_out, f"out_keep of {entry.path}")
    gather = in_keep is not None and entry.info.get("input") == "gather"
    ik = list(range(n_in)) if in_keep is None else in_keep
    ok = list(range(n_out)) if out_keep is None else out_keep
    Ik, Ok = len(ik), len(ok)
    rank = int(entry.ranks[0]) if entry.action == DECOMP and entry.ranks else None
    if entry.action == DECOMP and (rank is None or not 1 <= rank <= min(n_out, Ik * kh * kw)):
        raise CompressionError(f"plan rank {entry.ranks} of {entry.path} is not in 1..{min(n_out, Ik * kh * kw)}")
    opts = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    mode = {"padding_mode": conv.padding_mode}
    has_bias = conv.bias is not None
    if rank is None:
        convs = [nn.Conv2d(Ik, Ok, (kh, kw), bias=has_bias, **geometry, **mode, **opts)]
    else:
        convs = [
            nn.Conv2d(Ik, rank, (kh, kw), bias=False, **geometry, **mode, **opts),
            nn.Conv2d(rank, Ok, 1, bias=has_bias, **opts),
        ]
    rel_error = None
    if init == "decompose":
        W = conv.weight.detach()
        ik_t, ok_t = torch.tensor(ik, device=W.device), torch.tensor(ok, device=W.device)
        Wp = W.index_select(1, ik_t).to(torch.float64)
        with torch.no_grad():
            if rank is None:
                approx = Wp
                convs[0].weight.copy_(Wp.index_select(0, ok_t))
            else:
                U, S, Vh = torch.linalg.svd(Wp.reshape(n_out, -1), full_matrices=False)
                root = S[:rank].sqrt()
                first = (root[:, None] * Vh[:rank]).reshape(rank, Ik, kh, kw)
                second = (U[:, :rank] * root).reshape(n_out, rank, 1, 1)
                convs[0].weight.copy_(first)
                convs[1].weight.copy_(second.index_select(0, ok_t))
                approx = (second.reshape(n_out, rank) @ first.reshape(rank, -1)).reshape(Wp.shape)
            if has_bias:
                convs[-1].bias.copy_(conv.bias.detach().index_select(0, ok_t))
        full = torch.zeros(W.shape, dtype=torch.float64, device=W.device)
        full[:, ik_t] = approx
        ref = W.index_select(0, ok_t).to(torch.float64)
        rel_error = float((ref - full.index_select(0, ok_t)).norm() / ref.norm().clamp_min(1e-300))
    layers: list[nn.Module] = ([ChannelSelect(ik).to(conv.weight.device)] if gather else []) + convs
    module = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    module.train(conv.training)
    return module, rel_error


def _thin_norm(bn: nn.BatchNorm2d, keep: list[int], init: str) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(keep),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=bn.weight.device if bn.affine else None,
    )
    if init == "decompose":
        idx = torch.tensor(keep, device=new.running_mean.device if new.running_mean is not None else None)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight.index_select(0, idx))
                new.bias.copy_(bn.bias.index_select(0, idx))
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean.index_select(0, idx))
                new.running_var.copy_(bn.running_var.index_select(0, idx))
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def apply_cc_(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Applier for ``cc`` plans: rebuilds every layer from the plan alone (shapes, kept indices, ranks).

    ``decompose`` takes the weights from the model's current (original) convs: kept input columns, the
    top-r SVD of them split with √S on each side, kept output rows (and BN entries) of thinned producers;
    ``empty`` only builds the shapes, for loading saved weights afterwards.

    Raises:
        CompressionError: the plan does not match the model, or names an unknown action or bad indices.
        ValueError: ``init`` is neither ``decompose`` nor ``empty``.
    """
    if init not in ("decompose", "empty"):
        raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
    todo = [e for e in plan.layers if e.action != KEEP]
    for e in todo:
        if e.action not in (PRUNE, DECOMP):
            raise CompressionError(
                f"plan names unknown cc action {e.action!r} for {e.path}; expected {PRUNE} or {DECOMP}"
            )
    convs = {e.path: planned_module(model, e, plan, (nn.Conv2d,)) for e in todo}
    norms: dict[str, list[int]] = {}
    for e in todo:
        out_keep = e.info.get("out_keep")
        for name in e.info.get("out_norms") or ():
            try:
                bn = model.get_submodule(name)
            except AttributeError:
                raise CompressionError(f"plan does not match the model: it has no BatchNorm {name!r}") from None
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != e.shape[0] or out_keep is None:
                raise CompressionError(
                    f"plan does not match the model: {name} is not a BatchNorm2d of {e.shape[0]} channels"
                )
            norms[name] = _indices(out_keep, e.shape[0], f"out_keep of {e.path}") or []
    built = {}
    with one_thread():
        for e in todo:
            module, rel_error = _build_layer(convs[e.path], e, init)
            if rel_error is not None:
                e.rel_error = rel_error
            built[e.path] = module
    for path, module in built.items():
        set_submodule(model, path, module)
    for name, keep in norms.items():
        set_submodule(model, name, _thin_norm(model.get_submodule(name), keep, init))
    return model
