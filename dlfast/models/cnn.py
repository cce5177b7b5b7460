"""The convolutional classifiers of the course notes: the small CNN (004 "CNN in PyTorch",
003 "CNNs") and the small ResNet (000 "Convolutional networks - resnets").

Every Conv2d followed by a ReLU is one dlfast.nn.Conv2dReLU (the fused op); dlfast.nn.revert
turns each into torch.nn.Conv2d + ReLU with the same parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlfast.nn import Conv2dReLU


class CNNClassifier(nn.Module):
    """[Conv3x3(padding 1) + ReLU + MaxPool2] x len(channels), Flatten, Linear.

    Defaults are the notes' binary classifier of 100 x 100 grey images (1 -> 3 -> 2 channels,
    Linear(1250, 1)); for sklearn's 8 x 8 digits use image_size=8, num_classes=10.
    Shapes: (N, in_channels, image_size, image_size) -> (N, num_classes) logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (3, 2),
        image_size: int = 100,
        num_classes: int = 1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        size, previous = image_size, in_channels
        for width in channels:
            layers += [Conv2dReLU(previous, width, 3, padding=1), nn.MaxPool2d(2)]
            size, previous = size // 2, width
        layers += [nn.Flatten(), nn.Linear(previous * size * size, num_classes)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class ResBlock(nn.Module):
    """conv3x3 + ReLU, conv3x3 + ReLU, plus the identity (channels unchanged)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv2dReLU(channels, channels, 3, padding=1)
        self.conv2 = Conv2dReLU(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + x


class SimpleResNet(nn.Module):
    """The notes' small ResNet for 28 x 28 digits: Conv(1, 32, 3) + ReLU, ResBlock(32),
    Conv(32, 64, 3) + ReLU, ResBlock(64), MaxPool2, Dropout(0.25), Flatten,
    Linear(64 * 12 * 12, 128) + ReLU, Dropout(0.5), Linear(128, 10).

    image_size sets the flattened width for other inputs (8 for sklearn's digits: 64 * 2 * 2).
    Shapes: (N, in_channels, image_size, image_size) -> (N, num_classes) logits.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = Conv2dReLU(in_channels, 32, 3)
        self.resblock1 = ResBlock(32)
        self.conv2 = Conv2dReLU(32, 64, 3)
        self.resblock2 = ResBlock(64)
        self.dropout1 = nn.Dropout(0.25)
        pooled = (image_size - 4) // 2
        self.fc1 = nn.Linear(64 * pooled * pooled, 128)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.resblock1(self.conv1(x))
        x = self.resblock2(self.conv2(x))
        x = self.dropout1(torch.nn.functional.max_pool2d(x, 2)).flatten(1)
        return self.fc2(self.dropout2(torch.relu(self.fc1(x))))
