"""Tiny model builders for demos and tests: they train on the digits in seconds on 2 cores."""

from __future__ import annotations

import torch
from torch import nn

from fastprune.models.resnet import ResNet, resnet18, resnet50

__all__ = ["ResNet", "lenet_300_100", "resnet18", "resnet50", "small_cnn"]


def lenet_300_100(in_features: int = 64, num_classes: int = 10, dropout: float = 0.0) -> nn.Sequential:
    """LeNet-300-100 (the MLP of Han et al. 2015 and WoodFisher's MNIST experiment), for any input
    size: Flatten, Linear(in, 300), ReLU, Linear(300, 100), ReLU, Linear(100, classes); optional
    dropout before each hidden Linear's successor (Han et al. rescale it after pruning)."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, 300), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(300, 100), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(100, num_classes))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, a strided conv, global average pooling, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = _Residual(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> SmallCNN:
    """The small CNN with BN and one residual block (8 x 8 inputs; any size works)."""
    return SmallCNN(in_channels, num_classes, width)
