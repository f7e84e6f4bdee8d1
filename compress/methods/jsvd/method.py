"""The joint-SVD :class:`~compress.methods.base.Method`: one class, registered once per scheme name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.methods.base import EXCLUDE, Batches, Method, Option, finite_float, positive_int
from compress.methods.jsvd.apply import apply_joint_plan
from compress.methods.jsvd.planner import JointSVDConfig, plan_joint_svd
from compress.plan import Plan
from compress.planning import FilterFn
from compress.targets import Target
from lowrank_core.errors import UserInputError

__all__ = ["BI_ITERS", "BI_P", "RHO", "JointSVDMethod"]

RHO = Option("--rho", "rho", "anchor rank rate ρ of the paper instead of RATIO/FLOPS (0.04, 0.08)", type=finite_float)
BI_P = Option("--bi-p", "bi_p", "bijsvd: left proportion p = r_l/(r_l+r_r) (default 0.5)", type=finite_float)
BI_ITERS = Option("--bi-iters", "bi_iters", "bijsvd: alternating iterations K (default 30)", type=positive_int)

_SUMMARIES = {
    "ljsvd": "left-shared joint SVD of same-position convs across a stage's blocks (Chen et al. 2023)",
    "rjsvd1": "right-shared joint SVD, block 0's narrower conv1 in the group (Chen et al. 2023)",
    "rjsvd2": "right-shared joint SVD, block 0's narrower conv1 by plain SVD (Chen et al. 2023)",
    "bijsvd": "Bi-JSVD: a right- and a left-shared term summed, fitted by alternating SVDs (Chen et al. 2023)",
    "jsvd-tai": "the joint-SVD paper's per-layer baseline: Tai SVD of its layer selection at rate ρ",
}


class JointSVDMethod(Method):
    """Joint SVD (``docs/method-jsvd.md``); ``JointSVDMethod("ljsvd", method="ljsvd")`` etc.

    The target is exactly one of RATIO, FLOPS and the method's own knob ``--rho``: with ``rho`` given the
    default ``RATIO=4`` is not used.
    """

    config_type = JointSVDConfig
    options = (RHO, BI_P, BI_ITERS, EXCLUDE)

    def __init__(self, name: str, **fixed: Any) -> None:
        super().__init__(name, **fixed)
        self.summary = _SUMMARIES.get(self.name, "joint SVD of same-shaped convs across repeated blocks")

    def make_config(self, target: Target | None = None, *, use_default_target: bool = True, **options: Any) -> Any:
        """As :meth:`Method.make_config`; ``rho`` replaces the target (and the default ``RATIO=4``).

        Raises:
            UserInputError: ``rho`` together with a target, or any error of :meth:`Method.make_config`.
        """
        rho = options.get("rho")
        if rho is not None:
            if target is not None:
                raise UserInputError(
                    f"give one target, not {target.text()} and --rho {rho} (--rho replaces RATIO and FLOPS)"
                )
            use_default_target = False
        return super().make_config(target, use_default_target=use_default_target, **options)

    def plan(
        self,
        model: nn.Module,
        config: Any,
        example_input: torch.Tensor,
        *,
        data: Batches | None = None,
        model_name: str = "model",
        filter_fn: FilterFn | None = None,
    ) -> Plan:
        """See :func:`compress.methods.jsvd.planner.plan_joint_svd` (``data`` is not used)."""
        return plan_joint_svd(model, config, example_input, model_name=model_name, filter_fn=filter_fn)

    def apply_(
        self, model: nn.Module, plan: Plan, *, init: str = "decompose", data: Batches | None = None
    ) -> nn.Module:
        """See :func:`compress.methods.jsvd.apply.apply_joint_plan` (``data`` is not used)."""
        return apply_joint_plan(model, plan, init=init)
