"""CIFAR-style ResNets behind a small timm-style model registry.

Two families, both with torchvision's module names (``conv1, bn1, relu, maxpool, layer1.., avgpool, fc``
and, inside blocks, ``conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.0/downsample.1``) and built from
torchvision's own :class:`~torchvision.models.resnet.BasicBlock` / :class:`~torchvision.models.resnet.Bottleneck`:

* ``cifar_resnet18/34/50`` — the CIFAR ResNets of the joint-SVD paper (Chen et al. 2023, Table I): a 3×3
  stride-1 stem of 64 channels, no max-pool (``maxpool`` is an ``nn.Identity`` so names match torchvision),
  stages 64/128/256/512 (×4 for Bottleneck) with stride on the 3×3 conv2 (v1.5), 1×1 conv + BN projection
  shortcuts where the channel count or stride changes, global average pool, FC;
* ``cifar_resnet20/32/44/56`` — He et al. (2016) CIFAR ResNets: a 3×3 stem of 16, three stages of n
  BasicBlocks with 16/32/64 channels, projection shortcuts (option B) where the shape changes.

A spec may carry a width multiplier in its name: ``cifar_resnet18_w0.25`` is ``cifar_resnet18`` with
``width=0.25`` (every stage width ``max(1, round(width * base))``). :func:`parse_zoo_name` is the one
place that reads such names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowrank_core.errors import UserInputError

if TYPE_CHECKING:  # torchvision is imported when a model is built, not with this module
    from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "CifarResNet",
    "create_model",
    "is_zoo_spec",
    "list_zoo_models",
    "parse_zoo_name",
    "register_model",
]

INIT_CHOICES = ("kaiming", "trunc_normal")

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_WIDTH_SUFFIX = re.compile(r"^(?P<base>.+)_w(?P<width>[^_]*)$")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name (timm's ``register_model``).

    Raises:
        ValueError: a model of that name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"zoo model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_zoo_models() -> list[str]:
    """Names of the registered zoo models (without width suffixes), sorted."""
    return sorted(_MODELS)


def is_zoo_spec(spec: str) -> bool:
    """Whether ``spec`` names a zoo model, with or without a ``_w<width>`` suffix (valid or not)."""
    if spec in _MODELS:
        return True
    match = _WIDTH_SUFFIX.match(spec)
    return bool(match and match["base"] in _MODELS)


def parse_zoo_name(spec: str) -> tuple[str, dict[str, float]]:
    """Split a zoo spec into its registered name and keyword arguments.

    ``cifar_resnet18`` → ``("cifar_resnet18", {})``; ``cifar_resnet18_w0.25`` → ``("cifar_resnet18",
    {"width": 0.25})``.

    Raises:
        UserInputError: unknown zoo model, or a width that is not a finite number > 0.
    """
    if spec in _MODELS:
        return spec, {}
    match = _WIDTH_SUFFIX.match(spec)
    if not match or match["base"] not in _MODELS:
        import difflib

        base = match["base"] if match else spec
        close = difflib.get_close_matches(base, list_zoo_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserInputError(
            f"unknown zoo model {spec!r}{hint}; use one of {', '.join(list_zoo_models())}, "
            "optionally with a width suffix such as _w0.5"
        )
    base, text = match["base"], match["width"]
    try:
        width = float(text)
    except ValueError:
        width = math.nan
    if not (math.isfinite(width) and width > 0):
        raise UserInputError(
            f"bad width {text!r} in model spec {spec!r}; use a positive number such as {base}_w0.5 or {base}_w2"
        )
    return base, {"width": width}


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """Build a zoo model by name (a ``_w<width>`` suffix is allowed); ``None`` kwargs keep the model defaults.

    Args:
        name: Registered name, e.g. ``cifar_resnet34`` or ``cifar_resnet18_w0.25``.
        num_classes: Output classes of the FC layer.
        in_channels: Input channels of the stem (1 for grayscale data such as Fashion-MNIST).
        **kwargs: Passed to the factory (``width``, ``zero_init_residual``, ``init``).

    Raises:
        UserInputError: unknown name, bad width, or a ``width`` that contradicts the name's suffix.
    """
    base, parsed = parse_zoo_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "width" in parsed and "width" in kwargs and float(kwargs["width"]) != parsed["width"]:  # type: ignore[arg-type]
        raise UserInputError(
            f"model spec {name!r} says width {parsed['width']:g} but width={kwargs['width']} was also given; "
            "give the width once"
        )
    return _MODELS[base](num_classes=num_classes, in_channels=in_channels, **{**kwargs, **parsed})


class CifarResNet(nn.Module):
    """ResNet for small inputs: 3×3 stride-1 stem, no max-pool, torchvision stages and module names.

    Args:
        block: torchvision ``BasicBlock`` or ``Bottleneck``.
        layers: Blocks per stage, e.g. ``[3, 4, 6, 3]``.
        widths: Base width (``planes``) of each stage; the first stage runs at stride 1, the others at 2.
        stem_width: Output channels of the stem conv.
        num_classes: Output classes.
        in_channels: Input channels.
        zero_init_residual: Zero the last BN weight of every block (each block starts as an identity).
        init: ``kaiming`` (torchvision: kaiming-normal fan_out for convs, BN weight 1 / bias 0, FC as
            ``nn.Linear``) or ``trunc_normal`` (the joint-SVD paper: truncated normal, std 0.01, cut at
            ±2 std, for conv and FC weights; FC bias 0; BN weight 1 / bias 0).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        widths: list[int],
        *,
        stem_width: int,
        num_classes: int = 10,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if init not in INIT_CHOICES:
            raise UserInputError(f"unknown init {init!r}; use one of {', '.join(INIT_CHOICES)}")
        if in_channels < 1 or num_classes < 1:
            raise UserInputError(
                f"in_channels={in_channels} and num_classes={num_classes} must both be ≥ 1; pass positive values"
            )
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(layers)))
        for i, (name, blocks, planes) in enumerate(zip(self.stage_names, layers, widths, strict=True)):
            setattr(self, name, self._make_layer(block, planes, blocks, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights(init, zero_init_residual)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # Bottleneck's inner width is int(planes * base_width / 64) * groups: the defaults keep it == planes.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, init: str, zero_init_residual: bool) -> None:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.02, b=0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear) and init == "trunc_normal":
                nn.init.trunc_normal_(m.weight, std=0.01, a=-0.02, b=0.02)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes) for input (N, in_channels, H, W); any H, W ≥ 1 works."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _scaled(width: float, base: int) -> int:
    return max(1, round(width * base))


def _paper_resnet(
    block_name: str,
    layers: list[int],
    *,
    num_classes: int,
    in_channels: int,
    width: float,
    zero_init_residual: bool,
    init: str,
) -> CifarResNet:
    from torchvision.models import resnet

    return CifarResNet(
        getattr(resnet, block_name),
        layers,
        [_scaled(width, base) for base in (64, 128, 256, 512)],
        stem_width=_scaled(width, 64),
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
        init=init,
    )


def _he_resnet(
    depth: int, *, num_classes: int, in_channels: int, width: float, zero_init_residual: bool, init: str
) -> CifarResNet:
    from torchvision.models.resnet import BasicBlock

    n = (depth - 2) // 6
    return CifarResNet(
        BasicBlock,
        [n, n, n],
        [_scaled(width, base) for base in (16, 32, 64)],
        stem_width=_scaled(width, 16),
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
        init=init,
    )


@register_model
def cifar_resnet18(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    zero_init_residual: bool = False,
    init: str = "kaiming",
) -> CifarResNet:
    """CIFAR ResNet-18 of the joint-SVD paper: BasicBlock [2, 2, 2, 2]; 11.16 M weights without BN, 11.11E8 FLOPs.

    Torchvision's init by default; the paper trains from truncated normal std 0.01 (``init="trunc_normal"``).
    """
    return _paper_resnet(
        "BasicBlock",
        [2, 2, 2, 2],
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        zero_init_residual=zero_init_residual,
        init=init,
    )


@register_model
def cifar_resnet34(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    zero_init_residual: bool = False,
    init: str = "kaiming",
) -> CifarResNet:
    """CIFAR ResNet-34 of the joint-SVD paper: BasicBlock [3, 4, 6, 3]; 21.27 M weights without BN, 23.19E8 FLOPs.

    Torchvision's init by default; the paper trains from truncated normal std 0.01 (``init="trunc_normal"``).
    """
    return _paper_resnet(
        "BasicBlock",
        [3, 4, 6, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        zero_init_residual=zero_init_residual,
        init=init,
    )


@register_model
def cifar_resnet50(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    zero_init_residual: bool = False,
    init: str = "kaiming",
) -> CifarResNet:
    """CIFAR ResNet-50 of the joint-SVD paper: Bottleneck [3, 4, 6, 3]; 23.47 M weights without BN, 25.96E8 FLOPs.

    Stride on the 3×3 conv2 (v1.5). The paper's Table II prints 23.50 M, but its FLOPs (original, and Tai-SVD
    compressed at ρ = 0.04 / 0.08) match this net exactly. Torchvision's init by default; the paper trains from
    truncated normal std 0.01 (``init="trunc_normal"``).
    """
    return _paper_resnet(
        "Bottleneck",
        [3, 4, 6, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        zero_init_residual=zero_init_residual,
        init=init,
    )


def _he_factory(depth: int) -> Callable[..., CifarResNet]:
    def factory(
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        zero_init_residual: bool = False,
        init: str = "kaiming",
    ) -> CifarResNet:
        return _he_resnet(
            depth,
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
            zero_init_residual=zero_init_residual,
            init=init,
        )

    factory.__name__ = factory.__qualname__ = f"cifar_resnet{depth}"
    factory.__doc__ = (
        f"He et al. (2016) CIFAR ResNet-{depth}: 3 stages of {(depth - 2) // 6} BasicBlocks, 16/32/64 channels, "
        "projection (option B) shortcuts."
    )
    return factory


cifar_resnet20 = register_model(_he_factory(20))
cifar_resnet32 = register_model(_he_factory(32))
cifar_resnet44 = register_model(_he_factory(44))
cifar_resnet56 = register_model(_he_factory(56))


class CifarVGG(nn.Module):
    """VGG-style net for small inputs with an FC-heavy head (the LRSD paper's VGG-16 / AlexNet regime).

    ``features`` is Conv3×3–BN–ReLU stacks separated by 2×2 max-pools, ``avgpool`` a global average pool
    (so 28×28 and 32×32 inputs both work), ``classifier`` two hidden FC layers (ReLU) and the output FC.

    Args:
        config: Conv widths with ``"M"`` for a max-pool, e.g. ``[64, "M", 128, ...]``.
        fc_width: Width of the two hidden FC layers.
        num_classes: Output classes.
        in_channels: Input channels.
    """

    def __init__(self, config: list[int | str], *, fc_width: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or fc_width < 1:
            raise UserInputError(
                f"in_channels={in_channels}, num_classes={num_classes} and fc_width={fc_width} must be ≥ 1"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(item)
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(channels, fc_width),
            nn.ReLU(),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(),
            nn.Linear(fc_width, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def cifar_vgg11(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarVGG:
    """VGG-11 layout for small inputs: 8 convs 64–512 with 4 max-pools, then FC 2048 → 2048 → classes.

    The hidden FC width is 4 × the last conv width, so the head holds about a third of the weights, as
    VGG's FC layers dominate on ImageNet. ``cifar_vgg11_w0.25`` has 16–128 channels and FC 512.
    """
    c = [max(1, round(width * v)) for v in (64, 128, 256, 256, 512, 512, 512, 512)]
    config: list[int | str] = [c[0], "M", c[1], "M", c[2], c[3], "M", c[4], c[5], "M", c[6], c[7]]
    return CifarVGG(config, fc_width=4 * c[-1], num_classes=num_classes, in_channels=in_channels)
