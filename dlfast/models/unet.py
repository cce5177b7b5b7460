"""U-Net segmentation (003 week 7, "U-Net: Architecture"): an encoder of double 3x3 conv + ReLU
blocks with 2x2 max-pooling, a symmetric decoder that upsamples with 2x2 transposed convolutions
and concatenates the encoder's feature map of the same size (the skip connection) before its
double conv, and a 1x1 conv head giving per-pixel class logits.

Each conv + ReLU is one dlfast.nn.Conv2dReLU (the fused op).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlfast.nn import Conv2dReLU


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convs (padding 1: the size is kept), each followed by ReLU."""
    return nn.Sequential(
        Conv2dReLU(in_channels, out_channels, 3, padding=1),
        Conv2dReLU(out_channels, out_channels, 3, padding=1),
    )


class UNet(nn.Module):
    """Shapes: (N, in_channels, H, W) -> (N, num_classes, H, W) logits, H and W divisible by
    2 ** (len(channels) - 1). Defaults: the paper's widths 64-128-256-512-1024, RGB in, 2 classes
    (the notes' example); the tests use (8, 16, 32)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        channels: tuple[int, ...] = (64, 128, 256, 512, 1024),
    ):
        super().__init__()
        self.down = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.down.append(double_conv(previous, width))
            previous = width
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for width in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            self.up_conv.append(double_conv(2 * width, width))
            previous = width
        self.head = nn.Conv2d(previous, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips[:-1]), strict=True):
            x = conv(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def iou(pred: Tensor, target: Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union
