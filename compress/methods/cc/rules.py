"""Which convs CC compresses: the layer rules of spec §7 and the limits of the compressed convs."""

from __future__ import annotations

import torch
from torch import nn

from compress.factorizations import LayerGeometry
from compress.methods.cc.config import CollaborativeConfig
from compress.planning import FilterFn, common_skip_reason

__all__ = ["skip_reason"]


def skip_reason(
    module: nn.Module,
    path: str,
    geom: LayerGeometry | None,
    stem: str | None,
    config: CollaborativeConfig,
    filter_fn: FilterFn | None,
) -> str | None:
    """Why CC leaves ``module`` dense (spec §7 and the compressed convs' limits), or ``None`` to compress it."""
    if not isinstance(module, nn.Conv2d):
        return "cc compresses convolutions only; the classifier is left dense (spec §7)"
    if geom is not None and config.keep_stem and path == stem:
        return "stem (image-input conv) is left dense by rule (spec §7)"
    reason = common_skip_reason(module, path, geom, exclude=config.exclude, filter_fn=filter_fn)
    if reason is not None:
        return reason
    if module.groups != 1:
        return f"grouped/depthwise conv (groups={module.groups}) is left dense by rule"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return "only explicit zero padding is supported by the compressed convs"
    if not torch.isfinite(module.weight).all():
        return "the weight has non-finite values"
    if module.in_channels * module.kernel_size[0] * module.kernel_size[1] < 2 and module.out_channels < 2:
        return "a single weight: nothing to remove"
    return None
