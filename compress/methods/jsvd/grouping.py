"""Which convs share a factor, and what a group costs: repeated containers, groups, ranks at ρ, weights, MACs.

Convs at the same position of the blocks of one repeated container (a ResNet stage) form a *group*.
Ranks come from one anchor rate ρ: Tai gets ``floor(ρ·d)`` with ``d = O`` for k×k and ``min(I, O)`` for
1×1 kernels; a joint group gets ``floor(ρ_j·d)`` where ρ_j gives the group the parameter budget Tai would
spend on it (the spec's equal-budget formulas, derived here in general form, see :func:`joint_rate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from torch import nn

from compress.factorizations import LayerGeometry

__all__ = [
    "JOINT_ACTIONS",
    "JOINT_METHODS",
    "JointGroup",
    "find_groups",
    "group_ranks",
    "joint_rate",
    "locate",
    "max_rank",
    "member_costs",
    "pair_macs",
    "repeated_containers",
]

#: Registered method names → the scheme of their joint groups.
JOINT_METHODS = {"ljsvd": "ljsvd", "rjsvd1": "rjsvd", "rjsvd2": "rjsvd", "bijsvd": "bijsvd", "jsvd-tai": "tai"}
#: Plan actions of layers that share factors with the other members of their group.
JOINT_ACTIONS = ("rjsvd", "ljsvd", "bijsvd")


@dataclass
class JointGroup:
    """Convs that share a factor: ``scheme`` ``rjsvd``/``ljsvd``/``bijsvd``, or ``tai`` for one plain layer."""

    name: str
    scheme: str
    members: list[str]


def repeated_containers(model: nn.Module) -> list[str]:
    """Paths of ``Sequential``/``ModuleList`` containers with ≥ 2 same-class children that hold convs."""
    out = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or isinstance(module[0], nn.Conv2d):
            continue
        if any(isinstance(m, nn.Conv2d) for m in module[0].modules()):
            out.append(path)
    return out


def locate(path: str, containers: list[str]) -> tuple[str, int, str] | None:
    """(innermost repeated container, block index, path inside the block) of a module path."""
    best = None
    for c in containers:
        prefix = f"{c}." if c else ""
        if path.startswith(prefix):
            idx, _, rel = path[len(prefix) :].partition(".")
            if idx.isdigit() and rel and (best is None or len(c) > len(best[0])):
                best = (c, int(idx), rel)
    return best


def find_groups(model: nn.Module, paths: Sequence[str], method: str) -> list[JointGroup]:
    """Group candidate convs: same position (path inside the block) in the blocks of one repeated container.

    Members of a position that share the majority shape (that of the last block) form the group; a member
    of another input depth (the HID conv of block 0) joins only under ``rjsvd1`` (vertical stacking needs
    equal F2·O only). Groups of one member, and every conv under ``jsvd-tai``, become plain SVD.

    Args:
        model: The model.
        paths: Candidate conv paths, in module order.
        method: A key of :data:`JOINT_METHODS`.
    """
    scheme = JOINT_METHODS[method]
    containers = repeated_containers(model)
    by_position: dict[tuple[str, str], list[str]] = {}
    singles: list[str] = []
    for path in paths:
        loc = locate(path, containers)
        if loc is None or scheme == "tai":
            singles.append(path)
        else:
            by_position.setdefault((loc[0], loc[2]), []).append(path)
    groups: dict[str, JointGroup] = {}
    for (container, rel), members in by_position.items():
        shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in members}
        ref = shapes[members[-1]]
        joined = [p for p in members if shapes[p] == ref]
        if method == "rjsvd1":
            joined = [p for p in members if (shapes[p][0], *shapes[p][2:]) == (ref[0], *ref[2:])]
        singles.extend(p for p in members if p not in joined)
        name = f"{container}.{rel}" if container else rel
        if len(joined) >= 2:
            groups[joined[0]] = JointGroup(name, scheme, joined)
        else:
            singles.extend(joined)
    for path in singles:
        groups[path] = JointGroup(path, "tai", [path])
    order = {p: k for k, p in enumerate(paths)}
    return sorted(groups.values(), key=lambda g: order[g.members[0]])


# ================================================================================================ ranks
def _dim(shape: Sequence[int]) -> int:
    """The paper's rank base: O for k×k kernels, min(I, O) for 1×1."""
    o, i, f1, f2 = shape
    return o if f1 * f2 > 1 else min(i, o)


def _unit_params(shapes: Sequence[Sequence[int]], scheme: str) -> int:
    """Stored weights per unit of rank of one joint term over the group (shared factor counted once)."""
    o, i, f1, f2 = shapes[-1]
    if scheme == "rjsvd":
        return sum(s[1] * s[2] for s in shapes) + f2 * o
    if scheme == "ljsvd":
        return f1 * i + sum(s[0] * s[3] for s in shapes)
    raise ValueError(scheme)


def joint_rate(shapes: Sequence[Sequence[int]], scheme: str) -> Fraction:
    """ρ_j / ρ that gives a joint group Tai's parameter budget (spec §6, general form).

    Tai spends ``Σ_n ρ·d_n·(F1·I_n + F2·O_n)``; the joint term spends ``ρ_j·d·unit`` with ``d`` the last
    member's rank base. E.g. 3×3 with I = O: 2N/(N+1); RJSVD-1 BasicBlock conv1: (2N−½)/(N+½); Bottleneck
    conv1 LJSVD 5N/(4+N), RJSVD-2 5N/(4N+1), RJSVD-1 (5N−2)/(4N−1); conv3 the mirror images.
    """
    tai = sum(_dim(s) * (s[2] * s[1] + s[3] * s[0]) for s in shapes)
    return Fraction(tai, _dim(shapes[-1]) * _unit_params(shapes, scheme))


def _clamp(rank: int, limit: int) -> int:
    return max(1, min(rank, limit))


def max_rank(shapes: Sequence[Sequence[int]], scheme: str) -> int:
    """The largest useful rank of one term over a group of member shapes (``(O, I, F1, F2)`` each)."""
    o, i, f1, f2 = shapes[-1]
    if scheme == "rjsvd":
        return min(sum(s[1] * s[2] for s in shapes), f2 * o)
    if scheme == "ljsvd":
        return min(f1 * i, sum(s[0] * s[3] for s in shapes))
    return min(f1 * i, f2 * o)


def group_ranks(shapes: Sequence[Sequence[int]], scheme: str, rho: Fraction, p: Fraction) -> tuple[int, ...]:
    """Ranks of a group at anchor rate ``rho``: ``(r,)``, or ``(r_l, r_r)`` for ``bijsvd`` (0 drops a term)."""
    d = _dim(shapes[-1])
    if scheme == "tai":
        return (_clamp(math.floor(rho * d), max_rank(shapes, "tai")),)
    if scheme in ("rjsvd", "ljsvd"):
        return (_clamp(math.floor(joint_rate(shapes, scheme) * rho * d), max_rank(shapes, scheme)),)
    r_l = min(math.floor(joint_rate(shapes, "ljsvd") * rho * p * d), max_rank(shapes, "ljsvd"))
    r_r = min(math.floor(joint_rate(shapes, "rjsvd") * rho * (1 - p) * d), max_rank(shapes, "rjsvd"))
    if r_l + r_r == 0:
        r_l, r_r = (1, 0) if p >= Fraction(1, 2) else (0, 1)
    return (r_l, r_r)


# ================================================================================================ costs
def member_costs(shapes: Sequence[Sequence[int]], scheme: str, ranks: Sequence[int]) -> tuple[list[int], int]:
    """(private weights per member, shared weights of the group) at ``ranks``."""
    if scheme == "tai":
        (r,) = ranks
        return [r * (s[1] * s[2] + s[0] * s[3]) for s in shapes], 0
    o, i, f1, f2 = shapes[-1]
    r_l, r_r = (0, ranks[0]) if scheme == "rjsvd" else (ranks[0], 0) if scheme == "ljsvd" else ranks
    private = [r_r * s[1] * s[2] + r_l * s[0] * s[3] for s in shapes]
    return private, r_r * f2 * o + r_l * f1 * i


def pair_macs(shape: Sequence[int], rank: int, geom: LayerGeometry) -> int:
    """MACs of an F1×1 → 1×F2 pair: r·F1·I·H'·W_in + r·F2·O·H'·W' (spec §3)."""
    o, i, f1, f2 = shape
    assert geom.in_hw is not None
    assert geom.out_hw is not None
    h_out, w_in = geom.out_hw[0], geom.in_hw[1]
    return rank * f1 * i * h_out * w_in + rank * f2 * o * geom.out_pixels
