"""Model access: the CIFAR zoo (:mod:`compress.zoo`), torchvision models by name, timm models, or a factory.

Specs resolve in this order: a zoo name, optionally with a width suffix (``cifar_resnet18_w0.25``); a
``timm:<name>`` model (:mod:`compress.timm_models`, the optional ``timm`` extra); a torchvision
classification, segmentation or detection name (``resnet34``, ``deeplabv3_resnet50``,
``retinanet_resnet50_fpn``); a user factory ``path/to/file.py:fn``.

Segmentation and detection models are wrapped (:mod:`compress.task_models`) into one-input graphs whose
outputs are tensors with names (:attr:`LoadedModel.output_names`): a segmentation model's dict output in
key order, a detector's raw head outputs (NMS and box decoding are left to the application). Their
default input size comes from the weights' metadata (520 for segmentation) or the detector's transform.

Weights (``--weights``):
    * ``auto`` — torchvision's pretrained weights when they are cached or can be downloaded, otherwise
      a seeded random initialisation with a loud warning that is also recorded in every report;
    * ``imagenet`` — pretrained weights, required: fail clearly when they are unavailable;
    * ``random`` — seeded random initialisation;
    * a path — a state_dict or checkpoint (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, or
      ``.safetensors``). Checkpoints are never unpickled beyond tensors and plain containers.

Zoo models have no pretrained weights: ``auto`` is a seeded random initialisation with a recorded warning,
``imagenet`` is an error. ``in_channels`` other than 3 builds a zoo model with that many input channels;
a torchvision model gets its stem conv rebuilt for it only when its weights are ``random`` or a file (whose
stem must then match), because pretrained stems expect RGB: feed them 3 replicated channels instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.loading import (
    LoadedModel,
    check_batchnorm_statistics,
    input_channels,
    load_into,
    load_state_dict_file,
    output_features,
    task_classes,
)
from compress.task_models import DETECTION_MODELS, SEGMENTATION_MODELS, default_input_size, task_of, wrap_task_model
from compress.zoo import create_model, is_zoo_spec, list_zoo_models, parse_zoo_name
from lowrank_core.errors import UserInputError

__all__ = [
    "LoadedModel",
    "check_batchnorm_statistics",
    "has_aux_classifier",
    "input_channels",
    "list_models",
    "load_into",
    "load_model",
    "load_state_dict_file",
    "output_features",
]

log = logging.getLogger(__name__)

WEIGHT_CHOICES = ("auto", "imagenet", "random")
_DEFAULT_SIZE = {"inception_v3": 299}
_ZOO_DEFAULT_SIZE = 32
_ZOO_DEFAULT_CLASSES = 10


def list_models() -> list[str]:
    """Names of the zoo's models (first), then torchvision's classification, segmentation and detection models.

    ``timm:<name>`` models are not listed (``timm.list_models()`` lists them).
    """
    import torchvision

    classifiers = sorted(torchvision.models.list_models(module=torchvision.models))
    return list_zoo_models() + classifiers + list(SEGMENTATION_MODELS) + list(DETECTION_MODELS)


def load_model(
    spec: str,
    weights: str = "auto",
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    seed: int = 0,
    in_channels: int | None = None,
    aux_loss: bool | None = None,
) -> LoadedModel:
    """Build a model from a zoo name, a torchvision name or ``path/to/file.py:fn`` and load its weights.

    Args:
        spec: Zoo name (``cifar_resnet34``, ``cifar_resnet18_w0.25``), torchvision model name (``resnet34``)
            or a factory ``path/to/file.py:function``.
        weights: ``auto``, ``imagenet``, ``random`` or a path to a weights file.
        num_classes: Output classes of a zoo model (default 10) or a randomly initialised torchvision model
            (default 1000).
        input_size: Square input size (default 32 for zoo models, 224 otherwise; 299 for inception_v3).
        seed: Seed of the random initialisation (so ``random`` is reproducible).
        in_channels: Input channels (default 3). Zoo models are built for it; a torchvision model gets a
            new stem conv (same kernel, stride, padding) only with ``random`` or file weights; a factory's
            model must already have it.
        aux_loss: Segmentation models with ``random`` or file weights: build the auxiliary classifier (its
            output becomes the second named output, ``aux``). Default: when the weights file holds
            ``aux_classifier.*`` tensors (a checkpoint saved from a model built with ``aux_loss=True``).
            Pretrained weights (``auto``/``imagenet``) bring their own head.

    Raises:
        UserInputError: unknown model, unavailable pretrained weights, unreadable weights file, or input
            channels the model cannot take.
    """
    if not spec:
        raise UserInputError("no model given; pass MODEL=<zoo or torchvision name> or MODEL=path/to/file.py:fn")
    if in_channels is not None and in_channels < 1:
        raise UserInputError(f"in_channels={in_channels} is not a channel count; pass 1 (grayscale) or 3 (RGB)")
    if is_zoo_spec(spec):
        return _load_zoo(
            spec, weights, num_classes=num_classes, input_size=input_size, seed=seed, in_channels=in_channels
        )
    if spec.startswith("timm:"):
        from compress.timm_models import load_timm

        return load_timm(
            spec, weights, num_classes=num_classes, input_size=input_size, seed=seed, in_channels=in_channels
        )
    is_factory = ":" in spec and spec.split(":", 1)[0].endswith(".py")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_factory:
            factory, name = _from_factory(spec), Path(spec.split(":", 1)[0]).stem + "." + spec.split(":", 1)[1]
            # compress.json records the spec and later stages rebuild the model from it, maybe from another
            # working directory: record the factory file as an absolute path.
            recorded_spec = f"{os.path.abspath(spec.split(':', 1)[0])}:{spec.split(':', 1)[1]}"
        else:
            _check_torchvision_name(spec)
            if in_channels not in (None, 3) and weights in ("auto", "imagenet"):
                raise UserInputError(
                    f"{spec} with WEIGHTS={weights} has a pretrained 3-channel stem, not {in_channels} channels; feed it "
                    f"3 channels (load_data(channels=3) replicates the {in_channels}-channel input; the CLI does this) or use WEIGHTS=random"
                )
            factory, name = None, spec
        model, source, warning = _with_weights(
            spec, weights, factory, num_classes=num_classes, in_channels=in_channels, aux_loss=aux_loss
        )
    check_batchnorm_statistics(model, f"the model {spec!r} (weights {source})")  # a factory's own statistics too
    model.eval()
    size = input_size or _DEFAULT_SIZE.get(name) or default_input_size(name, model) or 224
    channels = input_channels(model)
    if in_channels is not None and in_channels != channels:
        raise UserInputError(
            f"the factory {spec!r} builds a model with {channels} input channels, not {in_channels}; "
            f"load the data with channels={channels} (the CLI does this) or change the factory"
        )
    return LoadedModel(
        model=model,
        spec=recorded_spec if is_factory else spec,
        name=name,
        weights=source,
        weights_requested=weights,
        warning=warning,
        input_shape=(channels, size, size),
        num_classes=output_features(model) if task_of(name) is None else task_classes(model),
        task=task_of(name) or "classification",
        output_names=tuple(getattr(model, "output_names", ("output",))),
    )


def _with_weights(
    spec: str,
    weights: str,
    factory_model: nn.Module | None,
    *,
    num_classes: int | None,
    in_channels: int | None,
    aux_loss: bool | None,
) -> tuple[nn.Module, str, str | None]:
    """A torchvision model (``factory_model=None``) or a factory's model, with ``weights`` loaded.

    Returns:
        The model, where its weights came from (``random``, a pretrained tag or the file's absolute path)
        and a warning or ``None``.
    """
    model = factory_model
    source, warning = "random", None
    if weights in ("auto", "imagenet") and factory_model is None:
        model, source, warning = _torchvision_pretrained(spec, weights, num_classes)
    elif weights in ("auto", "imagenet"):
        if weights == "imagenet":
            raise UserInputError(
                f"WEIGHTS=imagenet needs a torchvision model name, not the factory {spec!r}; "
                "pass WEIGHTS=path/to/weights.pt"
            )
        warning = (
            f"no pretrained weights are known for the user factory {spec!r}: using its own initialisation; "
            "pass WEIGHTS=path/to/weights.pt to compress trained weights"
        )
    else:
        state = None if weights == "random" else load_state_dict_file(weights)
        if factory_model is None:
            aux = aux_loss if aux_loss is not None else state is not None and has_aux_classifier(state)
            model = _torchvision_build(spec, num_classes=num_classes, aux_loss=aux)
            if in_channels not in (None, 3):
                _replace_stem_(model, spec, in_channels)
        if state is not None:
            load_into(model, state, weights)
            source = os.path.abspath(weights)  # the same file from any working directory
    assert model is not None
    return model, source, warning


# ------------------------------------------------------------------------------------------------ zoo
def _load_zoo(
    spec: str, weights: str, *, num_classes: int | None, input_size: int | None, seed: int, in_channels: int | None
) -> LoadedModel:
    parse_zoo_name(spec)  # bad widths fail before anything is built
    if weights == "imagenet":
        raise UserInputError(
            f"WEIGHTS=imagenet: no pretrained weights exist for the zoo model {spec}; pass WEIGHTS=path/to/weights.pt "
            "(train one with `python -m compress train`) or WEIGHTS=random"
        )
    channels = 3 if in_channels is None else in_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(spec, num_classes=num_classes or _ZOO_DEFAULT_CLASSES, in_channels=channels)
    source, warning = "random", None
    if weights == "auto":
        warning = (
            f"RANDOM WEIGHTS: no pretrained weights exist for {spec}; the model uses a seeded random initialisation, "
            "so accuracy-related numbers (agreement, EVBMF ranks) say nothing about a trained model. Train it with "
            "`python -m compress train` or pass WEIGHTS=path/to/weights.pt."
        )
        print(f"WARNING: {warning}", file=sys.stderr)
    elif weights != "random":
        load_into(model, load_state_dict_file(weights), weights)
        source = os.path.abspath(weights)  # the same file from any working directory
    model.eval()
    size = input_size or _ZOO_DEFAULT_SIZE
    return LoadedModel(
        model=model,
        spec=spec,
        name=spec,
        weights=source,
        weights_requested=weights,
        warning=warning,
        input_shape=(channels, size, size),
        num_classes=output_features(model),
    )


# ------------------------------------------------------------------------------------------------ torchvision
def _check_torchvision_name(name: str) -> None:
    known = list_models()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserInputError(
            f"unknown model {name!r}{hint}; use a zoo or torchvision classification/segmentation/detection model "
            "name (python -m compress models lists them), timm:<name> or path/to/file.py:function"
        )


def has_aux_classifier(state: dict[str, torch.Tensor]) -> bool:
    """Whether a segmentation state_dict (plain, or of the :mod:`compress.task_models` wrapper) has an aux head."""
    return any(k.removeprefix("model.").startswith("aux_classifier.") for k in state)


def _torchvision_build(name: str, *, num_classes: int | None, weights: Any = None, aux_loss: bool = False) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {}
    if aux_loss and task_of(name) == "segmentation" and weights is None:
        if name.startswith("lraspp"):
            raise UserInputError(
                f"{name} has no auxiliary classifier, but the weights hold aux_classifier.* tensors; "
                "check MODEL (deeplabv3_*/fcn_* have one)"
            )
        kwargs["aux_loss"] = True
    if num_classes is not None and weights is None:
        kwargs["num_classes"] = num_classes
    if name == "inception_v3" or name.startswith("googlenet"):
        kwargs["init_weights"] = weights is None
        kwargs.setdefault("aux_logits", weights is not None)
    if task_of(name) is not None:
        kwargs["weights_backbone"] = None  # never download an ImageNet backbone behind the user's back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wrap_task_model(name, torchvision.models.get_model(name, weights=weights, **kwargs))


def _torchvision_pretrained(name: str, mode: str, num_classes: int | None) -> tuple[nn.Module, str, str | None]:
    """Pretrained weights if cached or downloadable; ``auto`` falls back to random with a warning."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        enum = None
    reason: str
    if enum is None:
        reason = "torchvision publishes no pretrained weights for it"
    elif num_classes is not None and num_classes != len(enum.meta.get("categories", [])):
        reason = f"its pretrained weights have {len(enum.meta['categories'])} classes, not {num_classes}"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        try:
            model = _torchvision_build(name, num_classes=None, weights=enum)
            tag = f"imagenet:{type(enum).__name__}.{enum.name}"
            if not cached.exists():
                log.info("downloaded %s", enum.url)
            return model, tag, None
        except (OSError, RuntimeError, ValueError) as exc:  # network down, corrupt cache, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = f"they are not cached in {cached.parent} and could not be downloaded ({first})"
    if mode == "imagenet":
        raise UserInputError(
            f"WEIGHTS=imagenet: pretrained weights for {name} are unavailable: {reason}; "
            "copy the .pth file into the torch hub cache or pass WEIGHTS=path/to/weights.pth"
        )
    warning = (
        f"RANDOM WEIGHTS: pretrained weights for {name} are unavailable ({reason}); the model uses a seeded "
        "random initialisation, so accuracy-related numbers (agreement, EVBMF ranks) say nothing about a trained "
        "model. Pass WEIGHTS=path/to/weights.pth or cache the torchvision weights."
    )
    print(f"WARNING: {warning}", file=sys.stderr)
    return _torchvision_build(name, num_classes=num_classes), "random", warning


def _replace_stem_(model: nn.Module, name: str, in_channels: int) -> None:
    """Swap the first conv (the stem) for one taking ``in_channels`` (same geometry; kaiming-normal fan_out init)."""
    path, stem = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if stem is None or stem.in_channels != 3 or stem.groups != 1:
        raise UserInputError(
            f"cannot rebuild the stem of {name} for {in_channels} input channels; feed it 3 channels "
            "(load_data(channels=3) replicates them; the CLI does this)"
        )
    new = nn.Conv2d(
        in_channels,
        stem.out_channels,
        stem.kernel_size,  # type: ignore[arg-type]
        stride=stem.stride,  # type: ignore[arg-type]
        padding=stem.padding,  # type: ignore[arg-type]
        dilation=stem.dilation,  # type: ignore[arg-type]
        bias=stem.bias is not None,
        padding_mode=stem.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)


# ------------------------------------------------------------------------------------------------ factories
def _from_factory(spec: str) -> nn.Module:
    file_part, fn_name = spec.split(":", 1)
    path = Path(file_part)
    if not path.is_file():
        raise UserInputError(f"model factory file {file_part!r} does not exist; use MODEL=path/to/file.py:function")
    module_name = f"_lowrank_user_model_{abs(hash(path.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserInputError(f"cannot import {file_part!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's own code: report it in one line
        raise UserInputError(f"importing {file_part!r} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise UserInputError(f"{file_part!r} has no function {fn_name!r}; use MODEL=path/to/file.py:function")
    try:
        model = factory()
    except (Exception, SystemExit) as exc:  # a factory that raises or calls sys.exit: one line, no traceback
        raise UserInputError(f"the model factory {spec!r} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
