"""Applying a joint-SVD plan: group the entries, build each group's convs with shared parameters, fill them.

A shared factor is one ``nn.Parameter`` assigned as ``weight`` of one stock ``nn.Conv2d`` per member
(members may differ in stride, e.g. a stride-2 block 0), so ``model.parameters()``, optimizers,
``safetensors.save_model`` and the ONNX exporter all see a single tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.decompose import unfold_spatial
from compress.methods.jsvd.factors import bi_jsvd, ljsvd, rjsvd, u_kernel, v_kernel
from compress.methods.jsvd.grouping import JOINT_ACTIONS, max_rank
from compress.methods.jsvd.modules import ParallelSum, pair_convs
from compress.plan import LayerPlan, Plan
from compress.planning import planned_module, relative_error, set_submodule
from lowrank_core.errors import CompressionError

__all__ = ["apply_joint_plan"]


def _entries_by_group(plan: Plan) -> list[list[LayerPlan]]:
    """Factorized entries grouped for building: joint actions by ``(action, info.group)``, others alone."""
    out: dict[tuple[str, str], list[LayerPlan]] = {}
    for entry in plan.factorized_layers:
        if entry.action in JOINT_ACTIONS:
            name = entry.info.get("group")
            if not isinstance(name, str) or not name:
                raise CompressionError(f"plan entry {entry.path} ({entry.action}) has no info.group; add one")
            key = (entry.action, name)
        elif entry.action == "tai":
            key = ("tai", entry.path)
        else:
            raise CompressionError(
                f"plan entry {entry.path} has action {entry.action!r}; joint-SVD plans take tai, rjsvd, ljsvd, bijsvd or keep"
            )
        out.setdefault(key, []).append(entry)
    return list(out.values())


def apply_joint_plan(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Replace every planned conv of ``model`` in place (see :func:`compress.api.apply_plan_`); return ``model``.

    Members of one group get one shared ``nn.Parameter`` per shared factor. With ``init="decompose"`` the
    factors come from the joint SVD of the members' weights (float64) and each entry's ``rel_error`` is set;
    Bi-JSVD groups also record ``info["fit_errors"]`` on their first member. ``init="empty"`` only builds
    the shapes, for loading saved weights afterwards.

    Raises:
        CompressionError: the plan does not match the model, or a group's members/ranks are inconsistent.
    """
    if init not in ("decompose", "empty"):
        raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
    iters = int(plan.config.get("bi_iters", 30) or 30)
    for entries in _entries_by_group(plan):
        modules = [planned_module(model, entry, plan, (nn.Conv2d,)) for entry in entries]
        action = entries[0].action
        ranks = [tuple(int(r) for r in e.ranks or ()) for e in entries]
        if len(set(ranks)) != 1:
            raise CompressionError(
                f"group {entries[0].info.get('group')!r} has members with different ranks {sorted(set(ranks))}; give them one rank"
            )
        replacements = _build_group(action, modules, ranks[0], init=init, iters=iters, entries=entries)
        for entry, module, new in zip(entries, modules, replacements, strict=True):
            new.train(module.training)
            set_submodule(model, entry.path, new)
    return model


def _check_group(action: str, shapes: list[tuple[int, ...]], ranks: tuple[int, ...], name: str) -> None:
    o, i, f1, f2 = shapes[-1]
    want = 2 if action == "bijsvd" else 1
    if len(ranks) != want or any(r < 0 for r in ranks) or sum(ranks) < 1:
        raise CompressionError(
            f"group {name!r} ({action}) needs {want} rank(s) ≥ 0 with a positive sum, got {list(ranks)}"
        )
    same_right = all((s[0], s[3]) == (o, f2) for s in shapes)
    same_left = all((s[1], s[2]) == (i, f1) for s in shapes)
    if (action in ("rjsvd", "bijsvd", "tai") and not same_right) or (action in ("ljsvd", "bijsvd") and not same_left):
        raise CompressionError(
            f"group {name!r} cannot be {action}: member shapes {sorted(set(shapes))} differ in the shared dimension; "
            "split the group in plan.json"
        )
    if action == "tai" and len(shapes) != 1:
        raise CompressionError(f"plain SVD entry {name!r} must stand alone")
    limits = {
        "tai": (max_rank(shapes, "tai"),),
        "rjsvd": (max_rank(shapes, "rjsvd"),),
        "ljsvd": (max_rank(shapes, "ljsvd"),),
        "bijsvd": (max_rank(shapes, "ljsvd"), max_rank(shapes, "rjsvd")),
    }[action]
    if any(r > m for r, m in zip(ranks, limits, strict=True)):
        raise CompressionError(
            f"group {name!r} ({action}) ranks {list(ranks)} exceed the maximum {list(limits)}; lower them"
        )


def _build_group(
    action: str,
    modules: list[nn.Conv2d],
    ranks: tuple[int, ...],
    *,
    init: str,
    iters: int,
    entries: list[LayerPlan],
) -> list[nn.Module]:
    shapes = [tuple(int(v) for v in m.weight.shape) for m in modules]
    name = str(entries[0].info.get("group", entries[0].path))
    _check_group(action, shapes, ranks, name)
    r_l, r_r = (0, ranks[0]) if action in ("rjsvd", "tai") else (ranks[0], 0) if action == "ljsvd" else ranks
    # Branch R: private U (F1×1) → shared V (1×F2). Branch L: shared U → private V. "tai": R unshared.
    right = [pair_convs(m, r_r, bias=m.bias is not None and r_l == 0) for m in modules] if r_r else []
    left = [pair_convs(m, r_l, bias=m.bias is not None) for m in modules] if r_l else []
    if action != "tai":
        if right:
            shared_v = right[0][1].weight
            for chain in right[1:]:
                chain[1].weight = shared_v
        if left:
            shared_u = left[0][0].weight
            for chain in left[1:]:
                chain[0].weight = shared_u
    if init == "decompose":
        _fill(action, modules, right, left, r_l, r_r, iters, entries)
    if right and left:
        return [ParallelSum(a, b) for a, b in zip(right, left, strict=True)]
    return right or left


def _fill(
    action: str,
    modules: list[nn.Conv2d],
    right: list[nn.Sequential],
    left: list[nn.Sequential],
    r_l: int,
    r_r: int,
    iters: int,
    entries: list[LayerPlan],
) -> None:
    """Compute the factors in float64 and copy them into the (possibly shared) conv weights."""
    ref = modules[0].weight
    mats = [unfold_spatial(m.weight.detach().to(torch.float64)) for m in modules]
    o, _, f1, f2 = (int(v) for v in modules[-1].weight.shape)
    if action in ("rjsvd", "tai"):
        u_r, v_r = rjsvd(mats, r_r)
        u_l, v_l, errors = [], None, None
    elif action == "ljsvd":
        u_l, v_l = ljsvd(mats, r_l)
        u_r, v_r, errors = [], None, None
    else:
        bi = bi_jsvd(mats, r_l, r_r, iters)
        u_r, v_r, u_l, v_l, errors = bi.u_r, bi.v_r, bi.u_l, bi.v_l, bi.fit_errors
        u_r, v_r = (u_r, v_r) if r_r else ([], None)
        u_l, v_l = (u_l, v_l) if r_l else (None, [])
    with torch.no_grad():
        for k, (module, entry) in enumerate(zip(modules, entries, strict=True)):
            in_k = int(module.weight.shape[1])
            recon = torch.zeros_like(mats[k])
            if right:
                assert v_r is not None
                right[k][0].weight.copy_(u_kernel(u_r[k], f1, in_k).to(ref.dtype))
                right[k][1].weight.copy_(v_kernel(v_r, f2, o).to(ref.dtype))  # shared: same value each time
                recon += u_r[k] @ v_r
            if left:
                assert u_l is not None
                left[k][0].weight.copy_(u_kernel(u_l, f1, in_k).to(ref.dtype))
                left[k][1].weight.copy_(v_kernel(v_l[k], f2, o).to(ref.dtype))
                recon += u_l @ v_l[k]
            if module.bias is not None:
                last = (left[k] if left else right[k])[1]
                last.bias.copy_(module.bias.detach())
            entry.rel_error = relative_error(mats[k], recon)
        if errors is not None:
            entries[0].info["fit_errors"] = [float(e) for e in errors]
