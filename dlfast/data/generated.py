"""Generated data of the course notes' examples and of the tests: small, seeded by a
torch.Generator, no download."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def semicircle(n: int = 50, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x, y): n sorted points x ~ U(-1, 1) and y = sqrt(1 - x^2)."""
    x = torch.sort(torch.rand(n, generator=generator) * 2 - 1).values
    return x, torch.sqrt(1 - x**2)


def c_shapes(n: int = 1000, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two interlocking noisy C shapes: (2n, 2) points and their 0/1 labels."""

    def c_shape(x_offset: float, y_offset: float, flip: bool) -> Tensor:
        theta = torch.rand(n, generator=generator) * math.pi + math.pi / 2
        x = torch.cos(theta) + 0.1 * torch.randn(n, generator=generator) + x_offset
        y = torch.sin(theta) + 0.1 * torch.randn(n, generator=generator) + y_offset
        return torch.stack([1 - x if flip else x, y], dim=1)

    points = torch.cat([c_shape(1.25, -0.5, False), c_shape(0.0, 0.0, True)])
    return points, torch.cat([torch.zeros(n), torch.ones(n)]).long()


def noisy_seasonal_series(n: int = 600, period: int = 50, generator: torch.Generator | None = None) -> Tensor:
    """A sine of the given period with a slow trend and noise: the synthetic stand-in series."""
    t = torch.arange(n, dtype=torch.float32)
    return torch.sin(2 * math.pi * t / period) + 0.002 * t + 0.1 * torch.randn(n, generator=generator)


def shapes_with_masks(
    n: int, size: int = 32, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """n noisy grey images, each with one bright filled disc or square at a random place and
    size, and its (n, size, size) int64 mask (1 inside the shape)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        r = int(torch.randint(size // 8, size // 3, (1,), generator=generator))
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=generator))
        if bool(torch.rand(1, generator=generator) < 0.5):
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        images.append(mask.float() + 0.3 * torch.randn(size, size, generator=generator))
        masks.append(mask.long())
    return torch.stack(images).unsqueeze(1), torch.stack(masks)


def images_with_boxes(
    n: int, size: int = 16, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """n noisy (n, 1, size, size) images with one bright rectangle each, its box (x1, y1, x2, y2)
    scaled to [0, 1] (n, 4), and its class (n,) int64: 0 for a filled rectangle, 1 for only its
    one-pixel outline."""
    images = 0.2 * torch.randn(n, 1, size, size, generator=generator)
    boxes = torch.empty(n, 4)
    corners = []
    for i in range(n):
        x1, y1 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
        w, h = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
        images[i, 0, y1 : y1 + h, x1 : x1 + w] += 1.0
        boxes[i] = torch.tensor([x1, y1, x1 + w, y1 + h]) / size
        corners.append((x1, y1, w, h))
    # Drawn after all the boxes, so that the classes leave the boxes a seed gives unchanged.
    labels = torch.randint(0, 2, (n,), generator=generator)
    for i in labels.nonzero().flatten().tolist():
        x1, y1, w, h = corners[i]
        images[i, 0, y1 + 1 : y1 + h - 1, x1 + 1 : x1 + w - 1] -= 1.0
    return images, boxes, labels
