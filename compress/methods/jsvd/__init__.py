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

Modules: :mod:`~compress.methods.jsvd.factors` (the factor math), :mod:`~compress.methods.jsvd.grouping`
(groups, ranks at ρ, costs), :mod:`~compress.methods.jsvd.modules` (the layers built),
:mod:`~compress.methods.jsvd.planner` (config, layer selection, bisection of ρ),
:mod:`~compress.methods.jsvd.apply` (the applier) and :mod:`~compress.methods.jsvd.method` (the
:class:`~compress.methods.base.Method` registered under each of the five names).
"""

from __future__ import annotations

from compress.methods.base import register
from compress.methods.jsvd.apply import apply_joint_plan
from compress.methods.jsvd.factors import BiFactors, bi_jsvd, ljsvd, rjsvd
from compress.methods.jsvd.grouping import JOINT_METHODS, JointGroup, find_groups, group_ranks, joint_rate, max_rank
from compress.methods.jsvd.method import JointSVDMethod
from compress.methods.jsvd.modules import ParallelSum
from compress.methods.jsvd.planner import JointSVDConfig, norm_params, plan_joint_svd

__all__ = [
    "JOINT_METHODS",
    "BiFactors",
    "JointGroup",
    "JointSVDConfig",
    "JointSVDMethod",
    "ParallelSum",
    "apply_joint_plan",
    "bi_jsvd",
    "find_groups",
    "group_ranks",
    "joint_rate",
    "ljsvd",
    "max_rank",
    "norm_params",
    "plan_joint_svd",
    "rjsvd",
]

for _name in JOINT_METHODS:
    register(JointSVDMethod(_name, method=_name))
