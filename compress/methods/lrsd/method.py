"""LRSD behind the method contract: the :class:`LowRankSparseMethod` object and its calibration images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from compress.methods.base import CALIBRATION_SAMPLES, EXCLUDE, Batches, Method, Needs, Option, rebatch, take_samples
from compress.methods.lrsd.apply import apply_lrsd, lrsd_compress_
from compress.methods.lrsd.planner import METHOD, LowRankSparseConfig, plan_lrsd
from compress.planning import one_thread
from compress.reuse import memoized
from compress.targets import Target

if TYPE_CHECKING:
    from torch import nn

    from compress.plan import Plan
    from compress.planning import FilterFn

__all__ = ["CALIBRATION_BATCH_SIZE", "LowRankSparseMethod", "calibration_images"]

CALIBRATION_BATCH_SIZE = 64
"""Images per calibration batch (the statistics are accumulated batch by batch, in this order)."""


def calibration_images(data: Batches | None, n: int) -> list[torch.Tensor] | None:
    """The first ``n`` images of ``data`` (fewer if it holds fewer) in batches of 64; ``None`` stays ``None``.

    From :class:`~compress.methods.base.CalibrationLoader` these are exactly the batches of
    :func:`~compress.methods.lrsd.statistics.calibration_batches` ``(split, n, 64, seed)``.

    Raises:
        UserInputError: ``data`` holds no images.
    """
    if data is None:
        return None

    def take() -> tuple[Batches, list[torch.Tensor]]:
        images, labels = take_samples(data, n)
        return data, [x for x, _ in rebatch(images, labels, CALIBRATION_BATCH_SIZE)]

    # kept across a latency solve's knob values: the key is the object, held by the stored value
    return memoized("lrsd calibration images", lambda: (id(data), n), take)[1]


class LowRankSparseMethod(Method):
    """``lrsd``: each layer becomes ``L + S`` fitted to its responses on calibration images (Yu et al. 2017).

    ``data`` gives the unlabelled calibration images: the first ``calibration_samples`` of it, in batches
    of 64. Without data every layer solves the weight-only problem and the plan warns. The solver runs on
    one thread (thousands of small float64 products: faster than several, and much faster on a shared
    machine, where idle OpenMP workers spin); the thread setting is restored afterwards.
    """

    name = METHOD
    config_type = LowRankSparseConfig
    needs = Needs.IMAGES
    requires_data = False
    options = (
        Option("--s-step", "s_step", "grasp (default) | hard: the sparse-part update"),
        Option("--structured", "structured", "none (default) | 2:4: NVIDIA 2:4 pattern for the sparse part"),
        Option("--lrsd-mode", "mode", "asymmetric (default) | symmetric calibration"),
        CALIBRATION_SAMPLES,
        Option("--split", "split", "search (default) | fixed: rank/cardinality split per layer"),
        Option("--lrsd-parts", "parts", "both (default, L + S) | lowrank (c = 0) | sparse (r = 0)"),
        EXCLUDE,
    )
    default_target = Target("ratio", 4.0)
    summary = "low-rank + sparse (L + S) per layer, fitted to the layer's responses on calibration images"

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
        """:func:`~compress.methods.lrsd.planner.plan_lrsd` (no data needed: the split search runs when solving)."""
        return plan_lrsd(model, config, example_input, model_name=model_name, filter_fn=filter_fn)

    def apply_(
        self, model: nn.Module, plan: Plan, *, init: str = "decompose", data: Batches | None = None
    ) -> nn.Module:
        """``empty`` builds the shapes; ``decompose`` solves on ``data``'s images, or weight-only without data."""
        if init == "empty" or data is None:
            return apply_lrsd(model, plan, init=init)
        return self.rebuild_(model, plan, data=data)

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
        """Plan, calibrate on ``data``'s first ``calibration_samples`` images, solve and apply in place."""
        batches = calibration_images(data, config.calibration_samples)
        with one_thread():  # thousands of small float64 solves: one thread is fastest
            return lrsd_compress_(model, config, example_input, batches, model_name=model_name, filter_fn=filter_fn)

    def rebuild_(self, model: nn.Module, plan: Plan, *, data: Batches | None = None) -> nn.Module:
        """Re-solve a saved plan on a fresh dense model (its ranks kept unless its config searches the split)."""
        config = LowRankSparseConfig.from_dict(plan.config)
        batches = calibration_images(data, config.calibration_samples)
        weight = next(model.parameters())
        example = torch.zeros(plan.input_shape, dtype=weight.dtype, device=weight.device)
        with one_thread():
            lrsd_compress_(model, config, example, batches, model_name=plan.model, plan=plan)
        return model
