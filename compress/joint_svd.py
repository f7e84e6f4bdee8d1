"""Joint matrix decomposition (JSVD) of same-shaped convs in repeated blocks (Chen et al., Neurocomputing 2023).

Spec: ``docs/method-jsvd.md``. Every compressed conv becomes Tai et al.'s pair of thin convs, a vertical
F1×1 conv (``U``, carries the vertical stride) followed by a horizontal 1×F2 conv (``V``), built from the
unfolding ``W_mat[kh·I + i, kw·O + o] = w[o, i, kh, kw]`` (:func:`compress.decompose.unfold_spatial`).
Convs at the same position of the blocks of one repeated container (a ResNet stage) form a *group* whose
members share one factor:

* ``rjsvd1`` / ``rjsvd2`` — right-shared: stacked vertically, ``W^n ≈ U^n V`` (the ``V`` conv is shared).
  ``rjsvd1`` also puts the half-input-depth (HID) member — block 0's conv1, whose input is narrower — into
  the group; ``rjsvd2`` gives it plain SVD.
* ``ljsvd`` — left-shared: stacked horizontally, ``W^n ≈ U V^n`` (the ``U`` conv is shared); HID plain SVD.
* ``bijsvd`` — both terms, ``W^n ≈ U^n V_r + U_l V^n``, fitted by ``bi_iters`` block-alternating SVDs
  (R-term first from L = 0, as in the paper's Algorithm 3); two parallel branches summed before the BN.
* ``jsvd-tai`` — the paper's per-layer baseline: Tai SVD of every selected conv at the anchor rate ρ.

Ranks come from one anchor rate ρ: Tai gets ``floor(ρ·d)`` with ``d = O`` for k×k and ``min(I, O)`` for
1×1 kernels; a joint group gets ``floor(ρ_j·d)`` where ρ_j gives the group the parameter budget Tai would
spend on it (the spec's equal-budget formulas, derived here in general form, see :func:`joint_rate`).
A target compression factor (RATIO) is reached by bisecting ρ.

**Plan representation.** Every member layer is an ordinary :class:`~compress.plan.LayerPlan` with
``action`` ``rjsvd`` / ``ljsvd`` / ``bijsvd`` (or ``tai`` for plain SVD), ``ranks`` ``[r]`` (``[r_l, r_r]``
for ``bijsvd``) and ``info["group"]``: layers with the same action and group name share their factors, in
plan order (that order is the stacking order). Editing ``info.group`` / ``ranks`` / ``action`` in
``plan.json`` and re-applying changes the architecture accordingly (``target["groups"]`` is a read-only
summary written by the planner; the layer entries are what :func:`apply_joint_plan` reads). A shared
factor's parameters are booked on the group's first member (``info["shared_params"]``), so summing
``params_after`` over the layers counts it once; MACs are per member (every member runs its own convs).

**Model representation.** A shared factor is one ``nn.Parameter`` assigned as ``weight`` of one stock
``nn.Conv2d`` per member (members may differ in stride, e.g. a stride-2 block 0), so ``model.parameters()``,
optimizers, ``safetensors.save_model`` and the ONNX exporter all see a single tensor.
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

from compress.api import (
    FilterFn,
    _keep_entry,
    _set_submodule,
    check_flops,
    planned_module,
    register_applier,
    register_method,
    register_planner,
)
from compress.decompose import unfold_spatial
from compress.lowrank import LayerGeometry, dense_macs, factorization
from compress.metrics import count_params, trace_geometry
from compress.plan import LayerPlan, Plan
from lowrank_deploy.errors import CompressionError, UserInputError

__all__ = [
    "JOINT_METHODS",
    "JointGroup",
    "JointSVDConfig",
    "ParallelSum",
    "apply_joint_plan",
    "bi_jsvd",
    "find_groups",
    "joint_rate",
    "ljsvd",
    "norm_params",
    "plan_joint_svd",
    "rjsvd",
]

#: Registered method names → the scheme of their joint groups.
JOINT_METHODS = {"ljsvd": "ljsvd", "rjsvd1": "rjsvd", "rjsvd2": "rjsvd", "bijsvd": "bijsvd", "jsvd-tai": "tai"}
_JOINT_ACTIONS = ("rjsvd", "ljsvd", "bijsvd")
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
        if self.flops is not None:
            check_flops(self.flops)
        if self.ratio is not None and (not isinstance(self.ratio, (int, float)) or not self.ratio > 1.0):
            raise UserInputError(f"RATIO must be a number > 1 (parameter compression factor), got {self.ratio!r}")
        if self.rho is not None and not 0.0 < self.rho <= 1.0:
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


for _name in JOINT_METHODS:
    register_method(_name, JointSVDConfig, method=_name)


# ================================================================================================ factors
def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, computed on the tall orientation (LAPACK's gesdd is ~2× faster there for wide stacks)."""
    if matrix.shape[0] < matrix.shape[1]:
        g_t, s, vh_t = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh_t.T, s, g_t.T
    return torch.linalg.svd(matrix, full_matrices=False)


def _top_r(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``G_r Σ_r V_r`` with Σ folded into the left factor (spec §2)."""
    g, s, vh = _svd(matrix)
    return g[:, :rank] * s[:rank], vh[:rank]


def rjsvd(mats: Sequence[torch.Tensor], rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Right-shared joint SVD: ``W^n ≈ U^n V`` from the vertical stack (members may differ in row count).

    Returns:
        ``(private left factors U^n (rows_n × r), shared right factor V (r × cols))``.
    """
    left, right = _top_r(torch.cat(list(mats), dim=0), rank)
    return list(torch.split(left, [m.shape[0] for m in mats], dim=0)), right


def ljsvd(mats: Sequence[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Left-shared joint SVD: ``W^n ≈ U V^n`` from the horizontal stack.

    Returns:
        ``(shared left factor U (rows × r), private right factors V^n (r × cols_n))``.
    """
    left, right = _top_r(torch.cat(list(mats), dim=1), rank)
    return left, list(torch.split(right, [m.shape[1] for m in mats], dim=1))


@dataclass
class BiFactors:
    """Bi-JSVD factors: ``W^n ≈ u_r[n] @ v_r + u_l @ v_l[n]``; ``fit_errors[k]`` after iteration k."""

    u_r: list[torch.Tensor]
    v_r: torch.Tensor
    u_l: torch.Tensor
    v_l: list[torch.Tensor]
    fit_errors: list[float]


def _svd_r(
    matrix: torch.Tensor, rank: int, warm: torch.Tensor | None = None, *, power: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD ``matrix ≈ g·diag(s)·hᵀ`` (``g``, ``h`` orthonormal columns).

    Without ``warm`` it is the exact truncated SVD. With ``warm`` (n × r, the previous right factor) it is a
    Rayleigh–Ritz projection onto a subspace-iteration basis that contains ``span(warm)``: cheap for small
    ranks, and never worse than ``warm`` itself (the best rank-r fit inside a subspace holding it).
    """
    m, n = matrix.shape
    q = min(rank + 10, n)
    if warm is None or 2 * q >= min(m, n):
        g, s, vh = _svd(matrix)
        return g[:, :rank], s[:rank], vh[:rank].T
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    noise = torch.randn(n, q - warm.shape[1], generator=gen, dtype=matrix.dtype, device=matrix.device)
    basis = torch.linalg.qr(torch.cat([warm, noise], dim=1)).Q
    for _ in range(power):
        basis = torch.linalg.qr(matrix.T @ (matrix @ basis)).Q
    basis = torch.linalg.qr(torch.cat([basis, warm], dim=1)).Q
    g, s, vh = torch.linalg.svd(matrix @ basis, full_matrices=False)
    return g[:, :rank], s[:rank], basis @ vh[:rank].T


def bi_jsvd(
    mats: Sequence[torch.Tensor], rank_l: int, rank_r: int, iters: int = 30, *, exact: bool = False
) -> BiFactors:
    """Bi-JSVD by block-alternating SVDs (paper Algorithm 3: L = 0, then R-step, L-step, K times).

    Each step minimises the fit ``(1/N) Σ‖W^n − U^n V_r − U_l V^n‖²_F`` over one term given the other, so
    ``fit_errors`` never increases. The first iteration uses exact SVDs; later ones (unless ``exact``) use
    warm-started subspace iteration (:func:`_svd_r`), which keeps the monotone fit and costs a few
    matrix products instead of a full SVD. A zero rank drops that term (p = 0 is RJSVD, p = 1 is LJSVD).
    """
    mats = list(mats)
    n = len(mats)
    rows, cols = mats[0].shape
    u_r = [m.new_zeros(rows, 0) for m in mats]
    v_r, u_l = mats[0].new_zeros(0, cols), mats[0].new_zeros(rows, 0)
    v_l = [m.new_zeros(0, cols) for m in mats]
    left_term = right_term = [torch.zeros_like(m) for m in mats]
    errors: list[float] = []
    for k in range(iters if rank_l and rank_r else 1):
        if rank_r:
            stacked = torch.cat([w - lt for w, lt in zip(mats, left_term, strict=True)], dim=0)
            g, s, h = _svd_r(stacked, rank_r, None if exact or k == 0 else v_r.T)
            u_r, v_r = list(torch.split(g * s, rows, dim=0)), h.T
            right_term = [u @ v_r for u in u_r]
        if rank_l:
            stacked = torch.cat([w - rt for w, rt in zip(mats, right_term, strict=True)], dim=1)
            g, s, h = _svd_r(stacked.T, rank_l, None if exact or k == 0 else u_l)
            u_l, v_l = h * s, list(torch.split(g.T, cols, dim=1))
            left_term = [u_l @ v for v in v_l]
        fit = sum(
            float(torch.linalg.matrix_norm(w - rt - lt) ** 2)
            for w, rt, lt in zip(mats, right_term, left_term, strict=True)
        )
        errors.append(fit / n)
    return BiFactors(u_r=u_r, v_r=v_r, u_l=u_l, v_l=v_l, fit_errors=errors)


def _u_kernel(left: torch.Tensor, f1: int, in_ch: int) -> torch.Tensor:
    """(F1·I × r) left factor → (r, I, F1, 1) kernel of the vertical conv (spec §3)."""
    return left.reshape(f1, in_ch, -1).permute(2, 1, 0).unsqueeze(-1).contiguous()


def _v_kernel(right: torch.Tensor, f2: int, out_ch: int) -> torch.Tensor:
    """(r × F2·O) right factor → (O, r, 1, F2) kernel of the horizontal conv (spec §3)."""
    return right.reshape(-1, f2, out_ch).permute(2, 0, 1).unsqueeze(2).contiguous()


# ================================================================================================ modules
class ParallelSum(nn.Module):
    """Bi-JSVD layer: two chains of stock convs on the same input, summed (``Add`` in ONNX)."""

    def __init__(self, right: nn.Module, left: nn.Module) -> None:
        """Hold both branches.

        Args:
            right: The RJSVD term, private F1×1 conv → shared 1×F2 conv.
            left: The LJSVD term, shared F1×1 conv → private 1×F2 conv.
        """
        super().__init__()
        self.right = right
        self.left = left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``right(x) + left(x)``."""
        return self.right(x) + self.left(x)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pair_convs(module: nn.Conv2d, rank: int, *, bias: bool) -> nn.Sequential:
    """Empty F1×1 (vertical stride/pad) → 1×F2 (horizontal stride/pad) chain with ``module``'s geometry."""
    o, i, f1, f2 = (int(v) for v in module.weight.shape)
    (sh, sw), (ph, pw), (dh, dw) = _pair(module.stride), _pair(module.padding), _pair(module.dilation)
    kw = {"device": "meta" if module.weight.is_meta else module.weight.device, "dtype": module.weight.dtype}
    return nn.Sequential(
        nn.Conv2d(i, rank, (f1, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False, **kw),
        nn.Conv2d(rank, o, (1, f2), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=bias, **kw),
    )


# ================================================================================================ grouping
@dataclass
class JointGroup:
    """Convs that share a factor: ``scheme`` ``rjsvd``/``ljsvd``/``bijsvd``, or ``tai`` for one plain layer."""

    name: str
    scheme: str
    members: list[str]


def _repeated_containers(model: nn.Module) -> list[str]:
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


def _locate(path: str, containers: list[str]) -> tuple[str, int, str] | None:
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
    containers = _repeated_containers(model)
    by_position: dict[tuple[str, str], list[str]] = {}
    singles: list[str] = []
    for path in paths:
        loc = _locate(path, containers)
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


def _max_rank(shapes: Sequence[Sequence[int]], scheme: str) -> int:
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
        return (_clamp(math.floor(rho * d), _max_rank(shapes, "tai")),)
    if scheme in ("rjsvd", "ljsvd"):
        return (_clamp(math.floor(joint_rate(shapes, scheme) * rho * d), _max_rank(shapes, scheme)),)
    r_l = min(math.floor(joint_rate(shapes, "ljsvd") * rho * p * d), _max_rank(shapes, "ljsvd"))
    r_r = min(math.floor(joint_rate(shapes, "rjsvd") * rho * (1 - p) * d), _max_rank(shapes, "rjsvd"))
    if r_l + r_r == 0:
        r_l, r_r = (1, 0) if p >= Fraction(1, 2) else (0, 1)
    return (r_l, r_r)


def _member_costs(shapes: Sequence[Sequence[int]], scheme: str, ranks: Sequence[int]) -> tuple[list[int], int]:
    """(private weights per member, shared weights of the group) at ``ranks``."""
    if scheme == "tai":
        (r,) = ranks
        return [r * (s[1] * s[2] + s[0] * s[3]) for s in shapes], 0
    o, i, f1, f2 = shapes[-1]
    r_l, r_r = (0, ranks[0]) if scheme == "rjsvd" else (ranks[0], 0) if scheme == "ljsvd" else ranks
    private = [r_r * s[1] * s[2] + r_l * s[0] * s[3] for s in shapes]
    return private, r_r * f2 * o + r_l * f1 * i


def _rank_total(ranks: Sequence[int]) -> int:
    return sum(ranks)


# ================================================================================================ planning
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


def _pair_macs(shape: Sequence[int], rank: int, geom: LayerGeometry) -> int:
    """MACs of an F1×1 → 1×F2 pair: r·F1·I·H'·W_in + r·F2·O·H'·W' (spec §3)."""
    o, i, f1, f2 = shape
    assert geom.in_hw is not None
    assert geom.out_hw is not None
    h_out, w_in = geom.out_hw[0], geom.in_hw[1]
    return rank * f1 * i * h_out * w_in + rank * f2 * o * geom.out_pixels


def _skip_reason(
    path: str,
    module: nn.Module,
    config: JointSVDConfig,
    geom: LayerGeometry | None,
    containers: list[str],
    first_stage: str | None,
    filter_fn: FilterFn | None,
) -> str | None:
    import fnmatch

    if geom is None:
        return "not reached by the forward pass (unused or conditional layer)"
    if not isinstance(module, nn.Conv2d):
        return "the joint-SVD paper decomposes convs only (FC layers stay dense)"
    if _locate(path, containers) is None:
        return "outside any repeated block (stem, head): the joint-SVD paper leaves it dense"
    if config.keep_first_stage and first_stage is not None and path.startswith(f"{first_stage}."):
        return "first stage (conv2_x) is left dense by the paper's rule"
    if config.keep_shortcuts and _SHORTCUT.search(path):
        return "shortcut projection is left dense by the paper's rule"
    if any(fnmatch.fnmatchcase(path, pat) for pat in config.exclude):
        return "excluded by pattern"
    if filter_fn is not None and not filter_fn(module, path):
        return "excluded by filter_fn"
    return factorization("tai").unsupported_reason(module)


@dataclass
class _GroupSpec:
    group: JointGroup
    shapes: list[tuple[int, ...]]
    dense: int  # weights + biases of the members
    biases: int
    dense_macs: int


@register_planner(JointSVDConfig)
def plan_joint_svd(
    model: nn.Module,
    config: JointSVDConfig,
    example_input: torch.Tensor,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Group the convs, pick ρ (given, or bisected for ``config.ratio``) and the ranks of every group.

    Returns:
        The plan; ``target`` holds ``rho``, ``achieved_ratio`` (``count_params`` convention),
        ``cf_excluding_bn`` (the paper's CF) and the groups.
    """
    geometry, _, total_macs = trace_geometry(model, example_input)
    total_params = count_params(model)
    norms = norm_params(model)
    containers = _repeated_containers(model)
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
            keep[path] = _keep_entry(path, module, geom, reason)
    if not candidates:
        raise CompressionError(
            f"nothing to compress in {model_name}: no conv inside repeated blocks passes the rules; see the plan reasons"
        )
    groups = find_groups(model, candidates, config.method)
    specs = []
    for g in groups:
        mods = [model.get_submodule(p) for p in g.members]
        specs.append(
            _GroupSpec(
                group=g,
                shapes=[tuple(int(v) for v in m.weight.shape) for m in mods],
                dense=sum(int(m.weight.numel()) + _bias(m) for m in mods),
                biases=sum(_bias(m) for m in mods),
                dense_macs=sum(dense_macs(m, geometry[pth]) for pth, m in zip(g.members, mods, strict=True)),
            )
        )
    p = Fraction(str(config.bi_p))

    def params_after(rho: Fraction) -> int:
        saved = 0
        for s in specs:
            ranks = group_ranks(s.shapes, s.group.scheme, rho, p)
            private, shared = _member_costs(s.shapes, s.group.scheme, ranks)
            saved += s.dense - (sum(private) + shared + s.biases)
        return total_params - saved

    offset = norms if config.ratio_excludes_bn else 0

    def ratio_at(rho: Fraction) -> float:
        return (total_params - offset) / (params_after(rho) - offset)

    def macs_cut_at(rho: Fraction) -> float:
        saved = 0
        for s in specs:
            total = _rank_total(group_ranks(s.shapes, s.group.scheme, rho, p))
            after = sum(
                _pair_macs(shape, total, geometry[pth]) for shape, pth in zip(s.shapes, s.group.members, strict=True)
            )
            saved += s.dense_macs - after
        return saved / max(total_macs, 1)

    warnings: list[str] = []
    if config.rho is not None:
        rho = Fraction(str(config.rho))
    elif config.flops is not None:
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
    else:
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

    layers_by_path: dict[str, LayerPlan] = dict(keep)
    group_info: list[dict[str, Any]] = []
    for s in specs:
        g = s.group
        ranks = group_ranks(s.shapes, g.scheme, rho, p)
        private, shared = _member_costs(s.shapes, g.scheme, ranks)
        for k, path in enumerate(g.members):
            module = model.get_submodule(path)
            geom = geometry[path]
            info: dict[str, Any] = {"group": g.name, "member": k, "size": len(g.members)}
            if g.scheme != "tai":
                info["shared"] = {"rjsvd": "V (1×F2 conv)", "ljsvd": "U (F1×1 conv)", "bijsvd": "V_r and U_l"}[g.scheme]
            if k == 0 and shared:
                info["shared_params"] = shared
            after = private[k] + _bias(module) + (shared if k == 0 else 0)
            layers_by_path[path] = LayerPlan(
                path=path,
                type="Conv2d",
                shape=list(s.shapes[k]),
                action=g.scheme,
                ranks=list(ranks),
                reason=None,
                params_before=int(module.weight.numel()) + _bias(module),
                params_after=after,
                macs_before=dense_macs(module, geom),
                macs_after=_pair_macs(s.shapes[k], _rank_total(ranks), geom),
                in_hw=[int(v) for v in geom.in_hw] if geom.in_hw else None,
                out_hw=[int(v) for v in geom.out_hw] if geom.out_hw else None,
                info=info,
            )
        if g.scheme != "tai":
            group_info.append({"name": g.name, "scheme": g.scheme, "ranks": list(ranks), "members": g.members})

    layers = [layers_by_path[pth] for pth, _ in model.named_modules() if pth in layers_by_path]
    after = total_params - sum(e.params_before - e.params_after for e in layers)
    macs_after = total_macs - sum(e.macs_before - e.macs_after for e in layers)
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
        totals={
            "params_before": total_params,
            "params_after": after,
            "macs_before": total_macs,
            "macs_after": macs_after,
        },
        warnings=warnings,
    )


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


# ================================================================================================ applying
def _rel(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(ref - approx) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def _entries_by_group(plan: Plan) -> list[list[LayerPlan]]:
    """Factorized entries grouped for building: joint actions by ``(action, info.group)``, others alone."""
    out: dict[tuple[str, str], list[LayerPlan]] = {}
    for entry in plan.factorized_layers:
        if entry.action in _JOINT_ACTIONS:
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


@register_applier("ljsvd")
@register_applier("rjsvd1")
@register_applier("rjsvd2")
@register_applier("bijsvd")
@register_applier("jsvd-tai")
def apply_joint_plan(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Replace every planned conv of ``model`` in place (see :func:`compress.api.apply_plan_`); return ``model``.

    Members of one group get one shared ``nn.Parameter`` per shared factor. With ``init="decompose"`` the
    factors come from the joint SVD of the members' weights (float64) and each entry's ``rel_error`` is set;
    Bi-JSVD groups also record ``info["fit_errors"]`` on their first member.

    Raises:
        CompressionError: the plan does not match the model, or a group's members/ranks are inconsistent.
    """
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
            _set_submodule(model, entry.path, new)
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
        "tai": (_max_rank(shapes, "tai"),),
        "rjsvd": (_max_rank(shapes, "rjsvd"),),
        "ljsvd": (_max_rank(shapes, "ljsvd"),),
        "bijsvd": (_max_rank(shapes, "ljsvd"), _max_rank(shapes, "rjsvd")),
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
    right = [_pair_convs(m, r_r, bias=m.bias is not None and r_l == 0) for m in modules] if r_r else []
    left = [_pair_convs(m, r_l, bias=m.bias is not None) for m in modules] if r_l else []
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
                right[k][0].weight.copy_(_u_kernel(u_r[k], f1, in_k).to(ref.dtype))
                right[k][1].weight.copy_(_v_kernel(v_r, f2, o).to(ref.dtype))  # shared: same value each time
                recon += u_r[k] @ v_r
            if left:
                assert u_l is not None
                left[k][0].weight.copy_(_u_kernel(u_l, f1, in_k).to(ref.dtype))
                left[k][1].weight.copy_(_v_kernel(v_l[k], f2, o).to(ref.dtype))
                recon += u_l @ v_l[k]
            if module.bias is not None:
                last = (left[k] if left else right[k])[1]
                last.bias.copy_(module.bias.detach())
            entry.rel_error = _rel(mats[k], recon)
        if errors is not None:
            entries[0].info["fit_errors"] = [float(e) for e in errors]
