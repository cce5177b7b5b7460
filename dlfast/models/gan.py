"""Generative adversarial nets of the course notes (003 week 8; 004 "Generative Adversarial
Networks"): the linear GAN (generator blocks Linear + BatchNorm1d + ReLU, discriminator blocks
Linear + LeakyReLU(0.2)) and DCGAN (generator ConvTranspose2d + BatchNorm2d + ReLU ending in
Tanh, discriminator Conv2d + BatchNorm2d + LeakyReLU(0.2) ending in Sigmoid, N(0, 0.02)
initialisation, Adam(lr, betas=(0.5, 0.999)), binary cross-entropy).

No conv here is followed by a plain ReLU (the discriminator's are LeakyReLU after BatchNorm),
so there is nothing for dlfast.conv2d_relu to fuse: these are torch.nn as they stand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Generator(nn.Module):
    """z (N, z_dim) -> images flattened (N, im_dim) in (0, 1): blocks of Linear + BatchNorm1d +
    ReLU of widths hidden, 2 hidden, 4 hidden, 8 hidden, then Linear + Sigmoid."""

    def __init__(self, z_dim: int = 16, im_dim: int = 784, hidden: int = 128):
        super().__init__()
        widths = [z_dim, hidden, 2 * hidden, 4 * hidden, 8 * hidden]
        blocks: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            blocks += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.gen = nn.Sequential(*blocks, nn.Linear(widths[-1], im_dim), nn.Sigmoid())

    def forward(self, z: Tensor) -> Tensor:
        return self.gen(z)


class Discriminator(nn.Module):
    """images flattened (N, im_dim) -> (N, 1) logits: Linear + LeakyReLU(0.2) blocks of widths
    4 hidden, 2 hidden, hidden, then Linear(hidden, 1)."""

    def __init__(self, im_dim: int = 784, hidden: int = 128):
        super().__init__()
        widths = [im_dim, 4 * hidden, 2 * hidden, hidden]
        blocks: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            blocks += [nn.Linear(a, b), nn.LeakyReLU(0.2, inplace=True)]
        self.disc = nn.Sequential(*blocks, nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.disc(x)


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """z (N, z_dim, 1, 1) -> (N, channels, 4 * 2^(len(widths) - 1), ...) in (-1, 1): a 4x4
    ConvTranspose2d from the latent, then stride-2 ConvTranspose2d doublings, each + BatchNorm2d
    + ReLU, the last one to `channels` + Tanh. Defaults give 32 x 32 single-channel images."""

    def __init__(self, z_dim: int = 100, channels: int = 1, widths: tuple[int, ...] = (256, 128, 64)):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    """(N, channels, S, S) -> (N, 1) probabilities: stride-2 4x4 convs, each + BatchNorm2d (not
    on the first) + LeakyReLU(0.2), then a 4x4 conv to one value and a Sigmoid; S = 4 * 2^len(widths)."""

    def __init__(self, channels: int = 1, widths: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        previous = channels
        for i, width in enumerate(widths):
            layers.append(nn.Conv2d(previous, width, 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = width
        layers += [nn.Conv2d(previous, 1, 4, 1, 0, bias=False), nn.Flatten(), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def gan_step(
    generator, discriminator, real: Tensor, z: Tensor, opt_g, opt_d, probabilities: bool
) -> tuple[float, float]:
    """One discriminator step (real -> 1, fake -> 0) and one generator step (fake -> 1) with
    binary cross-entropy; `probabilities`: the discriminator ends in a Sigmoid (DCGAN) rather
    than giving logits. Returns (discriminator loss, generator loss)."""
    bce = F.binary_cross_entropy if probabilities else F.binary_cross_entropy_with_logits
    fake = generator(z)
    d_real, d_fake = discriminator(real), discriminator(fake.detach())
    d_loss = (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))) / 2
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    d_fake = discriminator(fake)
    g_loss = bce(d_fake, torch.ones_like(d_fake))
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    return d_loss.item(), g_loss.item()
