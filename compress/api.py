"""Public compression API: one entry point for every method, dispatched through the method registry.

Follows torchao's ``quantize_(model, config, filter_fn)``: :func:`compress_` takes a model and a method
config, plans, applies the plan in place and returns the plan with the measured errors recorded. The
data-aware methods (``lrsd``, ``cc``) take their calibration batches from ``data``, any iterable of
``(images, labels)`` batches such as a ``torch.utils.data.DataLoader``. Planning and applying are also
available separately (:func:`plan_compression`, :func:`apply_plan_`), so a plan can be inspected,
edited and re-applied to a fresh base model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.methods import get_method, load_methods, method_config, method_names
from compress.methods.base import Batches, Method, register
from compress.methods.lowrank import LowRankConfig
from compress.metrics import count_macs, count_params
from compress.plan import Plan
from compress.planning import FilterFn

__all__ = [
    "FilterFn",
    "LowRankConfig",
    "Method",
    "apply_plan_",
    "compress_",
    "compress_onnx",
    "get_method",
    "method_config",
    "method_for",
    "method_names",
    "plan_compression",
    "register",
]


def method_for(config: Any) -> Method:
    """The registered method a config belongs to (by its ``method`` name)."""
    name = getattr(config, "method", None)
    if not isinstance(name, str):
        raise TypeError(f"{type(config).__name__} is not a method config (it has no `method` name)")
    return get_method(name)


def plan_compression(
    model: nn.Module,
    config: Any,
    example_input: torch.Tensor,
    *,
    data: Batches | None = None,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Decide, without changing ``model``, what each layer becomes.

    Args:
        model: The dense model (not modified).
        config: A registered method's config, e.g. :class:`LowRankConfig`.
        example_input: One input batch (shapes and MACs are measured on it).
        data: ``(images, labels)`` batches for methods that plan on data.
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; layers where it returns False stay dense.
    """
    method = method_for(config)
    return method.plan(model, config, example_input, data=data, model_name=model_name, filter_fn=filter_fn)


def apply_plan_(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Replace every planned layer of ``model`` in place; return ``model``.

    Args:
        model: A fresh base model of the architecture the plan was made for.
        plan: The plan.
        init: ``decompose`` fills the factors from the layer's weights (and records each layer's
            relative weight error in ``plan``); ``empty`` only builds the shapes, for loading saved
            weights afterwards.

    Raises:
        CompressionError: the plan does not match the model (missing layer, other shape).
        UserInputError: the plan names an unknown method.
    """
    if init not in ("decompose", "empty"):
        raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
    return get_method(plan.method).apply_(model, plan, init=init)


def compress_(
    model: nn.Module,
    config: Any,
    example_input: torch.Tensor,
    *,
    data: Batches | None = None,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan, apply in place and record: the one-call entry point for every method.

    Args:
        model: The dense model; compressed in place.
        config: A registered method's config (:func:`method_config` builds one by name).
        example_input: One input batch (shapes and MACs are measured on it).
        data: ``(images, labels)`` batches (e.g. a ``DataLoader``); the data-aware methods draw their
            calibration images from it, the others ignore it.
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; layers where it returns False stay dense.

    Returns:
        The plan, with per-layer weight errors and the measured whole-model params/MACs after compression.
    """
    method = method_for(config)
    plan = method.compress_(model, config, example_input, data=data, model_name=model_name, filter_fn=filter_fn)
    plan.totals["params_after_measured"] = count_params(model)
    plan.totals["macs_after_measured"] = count_macs(model, example_input)
    return plan


def compress_onnx(source: Any, config: Any, **options: Any) -> Any:
    """Compress a model given only as ONNX (a path or a ``ModelProto``): see :func:`compress.onnx_in.compress_onnx`.

    Args:
        source: The ``.onnx`` file (external data beside it is read) or a loaded ``ModelProto``.
        config: A :class:`LowRankConfig` (``tucker2``/``svd``/``tai``/``cp``) or a method name.
        **options: ``input_size=``, ``filter_fn=``, and config fields when ``config`` is a name (``ratio=4``).

    Returns:
        :class:`compress.onnx_in.OnnxCompression`: ``.model`` (the rewritten graph), ``.dense`` (the validated
        original) and ``.plan``.
    """
    from compress.onnx_in import compress_onnx as compress_graph

    return compress_graph(source, config, **options)


load_methods()
