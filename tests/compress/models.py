"""Tiny CNNs for fast tests (timm/torchvision-style model table)."""

from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    """Stem, two residual blocks of 3×3 convs, a strided stage with a 1×1 projection, FC."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.proj = nn.Conv2d(width, 2 * width, 1, stride=2, bias=False)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.proj(x))
        x = torch.relu(self.depthwise(x))
        return self.head(x.mean((2, 3)))


def tiny_resnet() -> nn.Module:
    """Factory used by the ``file.py:fn`` model-spec tests."""
    torch.manual_seed(0)
    return TinyResNet()
