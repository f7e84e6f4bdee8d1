"""``MODEL=timm:<name>``: timm models, built without downloading anything (the optional ``timm`` extra).

``pip install 'lowrank-deploy[timm]'`` adds timm. Models are always built with ``pretrained=False`` (no
Hugging Face Hub access); weights come from a file:

* ``WEIGHTS=path`` — a timm checkpoint or state_dict (``.pth``/``.pt`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``; the ``state_dict`` entry of a timm training
  checkpoint is found), e.g. ``pytorch_model.bin``/``model.safetensors`` from a hub snapshot;
* ``auto`` — a seeded random initialisation with a loud warning recorded in every report;
* ``random`` — the same without the warning;
* ``imagenet`` — an error: download the checkpoint yourself and pass it as a path.

The default input size is the model's ``pretrained_cfg["input_size"]`` (224 for most).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from lowrank_core.errors import UserInputError

if TYPE_CHECKING:
    from compress.loading import LoadedModel

__all__ = ["PREFIX", "load_timm"]

PREFIX = "timm:"


def _timm():  # the timm module, or a one-line install hint
    try:
        import timm
    except ImportError:
        raise UserInputError(
            "MODEL=timm:<name> needs timm: pip install 'lowrank-deploy[timm]' (or pip install 'timm>=1.0')"
        ) from None
    return timm


def load_timm(
    spec: str,
    weights: str = "auto",
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    seed: int = 0,
    in_channels: int | None = None,
) -> LoadedModel:
    """Build ``timm:<name>`` with ``pretrained=False`` and load its weights (see the module doc).

    Raises:
        UserInputError: timm missing, unknown name, ``WEIGHTS=imagenet``, or a weights file that does not fit.
    """
    from compress.loading import LoadedModel, input_channels, load_into, load_state_dict_file, output_features

    timm = _timm()
    name = spec.removeprefix(PREFIX)
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise UserInputError(f"unknown timm model {name!r}{hint}; timm.list_models() lists them")
    if weights == "imagenet":
        raise UserInputError(
            f"WEIGHTS=imagenet: timm models are never downloaded here; fetch {name}'s checkpoint yourself "
            "(e.g. model.safetensors from its Hugging Face Hub page) and pass WEIGHTS=path/to/it"
        )
    kwargs: dict[str, int] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
    source, warning = "random", None
    if weights == "auto":
        warning = (
            f"RANDOM WEIGHTS: {spec} is built without downloading pretrained weights; the model uses a seeded random "
            "initialisation, so accuracy-related numbers (agreement, EVBMF ranks) say nothing about a trained model. "
            "Pass WEIGHTS=path/to/checkpoint (a timm .pth/.safetensors file)."
        )
        print(f"WARNING: {warning}", file=sys.stderr)
    elif weights != "random":
        state = load_state_dict_file(weights)
        load_into(model, state, weights)
        source = str(weights)
    model.eval()
    cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    size = input_size or int(cfg_size[-1])
    return LoadedModel(
        model=model,
        spec=spec,
        name=spec,
        weights=source,
        weights_requested=weights,
        warning=warning,
        input_shape=(input_channels(model), size, size),
        num_classes=output_features(model),
    )
