"""CC behind the method contract: the :class:`CollaborativeMethod` object and the one-call ``cc_compress_``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress.methods.base import (
    CALIBRATION_SAMPLES,
    EXCLUDE,
    ROUND_TO,
    Batches,
    Method,
    Needs,
    Option,
    finite_float,
    nonneg_int,
    rebatch,
    take_samples,
)
from compress.methods.cc.apply import apply_cc_
from compress.methods.cc.config import DEFAULT_FLOPS, METHOD, CollaborativeConfig
from compress.methods.cc.planner import plan_cc
from compress.methods.cc.scores import GRADIENT_BATCH_SIZE
from compress.metrics import count_macs, count_params
from compress.plan import Plan
from compress.planning import FilterFn
from compress.reuse import memoized
from compress.targets import Target
from lowrank_core.errors import UserInputError

__all__ = ["MODES", "CollaborativeMethod", "calibration_batches", "cc_compress_", "mode_fields"]

MODES = ("both", "prune", "decompose")
"""``--cc-mode``: both kinds of units, the pruning-only arm, the decomposition-only arm."""


def mode_fields(mode: str) -> dict[str, bool]:
    """The config fields ``--cc-mode`` sets: ``prune`` → ``{decompose: False, prune: True}``."""
    return {"decompose": mode != "prune", "prune": mode != "decompose"}


def calibration_batches(
    data: Batches | None, n: int, batch_size: int = GRADIENT_BATCH_SIZE
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The first ``n`` labelled images of ``data`` (fewer if it holds fewer) in batches of ``batch_size``.

    From :class:`~compress.methods.base.CalibrationLoader` these are exactly the images of
    :func:`~compress.methods.cc.scores.gradient_batches` ``(split, n, 128, seed)``, in the same order.
    ``None`` stays ``None`` (the weight-only fallback).

    Raises:
        UserInputError: ``data`` is empty or its batches carry no labels.
    """
    if data is None:
        return None

    def take() -> tuple[Batches, list[tuple[torch.Tensor, torch.Tensor]]]:
        images, labels = take_samples(data, n)
        if labels.numel() != images.shape[0]:
            raise UserInputError(
                "cc needs labelled calibration data ((images, labels) batches) for its gradients; "
                "give a labelled DataLoader, or none for the weight-only fallback"
            )
        return data, rebatch(images, labels, batch_size)

    # kept across a latency solve's knob values: the key is the object, held by the stored value
    return memoized("cc calibration batches", lambda: (id(data), n, batch_size), take)[1]


def cc_compress_(
    model: nn.Module,
    config: CollaborativeConfig,
    example_input: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan (with gradient statistics from ``batches``) and apply cc in place; return the plan.

    Args:
        model: The dense model; modified in place.
        config: The method config.
        example_input: One input batch (shapes and MACs).
        batches: ``(images, labels)`` calibration batches, or ``None`` for the weight-only fallback.
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; False leaves the layer untouched.
    """
    plan = plan_cc(model, config, example_input, batches, model_name=model_name, filter_fn=filter_fn)
    apply_cc_(model, plan)
    plan.totals["params_after_measured"] = count_params(model)
    plan.totals["macs_after_measured"] = count_macs(model, example_input)
    return plan


class CollaborativeMethod(Method):
    """``cc``: input-channel pruning and SVD together, per conv, from gradient sensitivities (Li et al. 2021).

    ``data`` gives the labelled images of the gradient statistics: the first ``calibration_samples`` of
    it, in batches of 128. Without data every score is weight-only and the plan warns.
    """

    name = METHOD
    config_type = CollaborativeConfig
    needs = Needs.LABELLED
    requires_data = False
    options = (
        Option("--cc-gamma", "gamma", "weight γ of the remaining-space term (default 0.9)", type=finite_float),
        Option(
            "--cc-mode",
            "decompose",  # with "prune": both set by ``mode_fields``
            "both (default) | prune (pruning-only arm) | decompose (decomposition-only arm)",
            choices=MODES,
            convert=mode_fields,
        ),
        Option("--cc-weighting", "weighting", "slope (default: the code's equal slope) | lagrangian"),
        Option(
            "--cc-curve-points",
            "curve_points",
            "removal counts per sensitivity curve (default 32; 0 = every count, as the code)",
            type=nonneg_int,
        ),
        CALIBRATION_SAMPLES,
        ROUND_TO,
        EXCLUDE,
    )
    default_target = Target("flops", DEFAULT_FLOPS)
    summary = "collaborative compression: input-channel pruning + SVD from gradient sensitivities (Li et al. 2021)"

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
        """:func:`~compress.methods.cc.planner.plan_cc` on the calibration images of ``data`` (None: weight-only)."""
        batches = calibration_batches(data, config.calibration_samples)
        return plan_cc(model, config, example_input, batches, model_name=model_name, filter_fn=filter_fn)

    def apply_(
        self, model: nn.Module, plan: Plan, *, init: str = "decompose", data: Batches | None = None
    ) -> nn.Module:
        """CC's own applier (:func:`~compress.methods.cc.apply.apply_cc_`); ``data`` is not used."""
        return apply_cc_(model, plan, init=init)

    def compress_(
        self,
        model: nn.Module,
        config: Any,
        example_input: torch.Tensor,
        *,
        data: Batches | None = None,
        model_name: str = "model",
        filter_fn: FilterFn | None = None,
    ) -> Plan:
        """Plan on the calibration images of ``data`` and apply in place (:func:`cc_compress_`); return the plan."""
        batches = calibration_batches(data, config.calibration_samples)
        return cc_compress_(model, config, example_input, batches, model_name=model_name, filter_fn=filter_fn)

    def rebuild_(self, model: nn.Module, plan: Plan, *, data: Batches | None = None) -> nn.Module:
        """Apply a saved plan, filling every layer from the model's own weights (no gradients needed)."""
        return apply_cc_(model, plan, init="decompose")
