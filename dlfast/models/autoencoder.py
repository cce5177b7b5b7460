"""The autoencoders of the course notes: the MLP autoencoder and the variational autoencoder of
002 ("The Auto-encoder", "Variational Auto Encoders"), the 3-2-3 sigmoid autoencoder of 004
("Dimensionality Reduction"), the convolutional denoising autoencoder of 004 ("Denoising") and
the 7 x 7 conv / conv-transpose denoiser of 000 ("Image denoising"), whose conv + ReLU pairs are
dlfast.nn.Conv2dReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlfast.nn import Conv2dReLU


def _mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear layers between consecutive sizes, ReLU after all but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


class Autoencoder(nn.Module):
    """Encoder s_img^2 -> hdim[0] -> hdim[1] -> latent_dims (ReLU between), decoder the mirror
    with a sigmoid output. Defaults: the notes' 28 x 28 images, hdim (100, 50), a 2-D latent.
    Shapes: (N, 1, s_img, s_img) in [0, 1] -> same; encode(x): (N, latent_dims)."""

    def __init__(self, latent_dims: int = 2, s_img: int = 28, hdim: tuple[int, int] = (100, 50)):
        super().__init__()
        self.s_img = s_img
        self.encoder = nn.Sequential(nn.Flatten(), *_mlp([s_img * s_img, *hdim, latent_dims]))
        self.decoder = nn.Sequential(*_mlp([latent_dims, *reversed(hdim), s_img * s_img]), nn.Sigmoid())

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x)).view(-1, 1, self.s_img, self.s_img)


class TinyAutoencoder(nn.Module):
    """004's 3-2-3 autoencoder: Linear(3, 2) + sigmoid, Linear(2, 3) + sigmoid."""

    def __init__(self, input_size: int = 3, hidden: int = 2):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_size, hidden), nn.Sigmoid())
        self.decoder = nn.Sequential(nn.Linear(hidden, input_size), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class VAE(nn.Module):
    """Two encoder branches of the MLP autoencoder's shape, one giving log sigma, one mu;
    z = mu + sigma * eps with eps ~ N(0, I) (the reparameterisation trick); the MLP decoder.

    forward returns (reconstruction, kl) with the notes' KL term
    sum(sigma^2 + mu^2 - log sigma - 1/2); loss = reconstruction error + kl.
    sample(n) decodes n draws of z ~ N(0, I).
    """

    def __init__(self, latent_dims: int = 2, s_img: int = 28, hdim: tuple[int, int] = (100, 50)):
        super().__init__()
        self.s_img, self.latent_dims = s_img, latent_dims
        self.log_sigma = nn.Sequential(nn.Flatten(), *_mlp([s_img * s_img, *hdim, latent_dims]))
        self.mu = nn.Sequential(nn.Flatten(), *_mlp([s_img * s_img, *hdim, latent_dims]))
        self.decoder = nn.Sequential(*_mlp([latent_dims, *reversed(hdim), s_img * s_img]), nn.Sigmoid())

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        sigma, mu = torch.exp(self.log_sigma(x)), self.mu(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + sigma * eps
        kl = (sigma**2 + mu**2 - torch.log(sigma) - 0.5).sum()
        return self.decoder(z).view(-1, 1, self.s_img, self.s_img), kl

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        # Drawn on the CPU, so that a CPU generator seeds it wherever the model lives.
        z = torch.randn(n, self.latent_dims, generator=generator)
        return self.decoder(z.to(self.decoder[0].weight.device)).view(-1, 1, self.s_img, self.s_img)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3 (padding 1) + ReLU, fused, then 2x2 max-pooling."""
    return nn.Sequential(Conv2dReLU(in_channels, out_channels, 3, padding=1), nn.MaxPool2d(2))


def deconv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """ConvTranspose2d (stride 2) + ReLU: doubles the size (+1 for kernel 3)."""
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=2), nn.ReLU())


class DenoisingAutoencoder(nn.Module):
    """004's convolutional denoiser for 28 x 28 images: conv_block 1 -> 32 -> 16 -> 8 (28 -> 3),
    deconv_block 8 -> 8 (k3: 3 -> 7), 8 -> 16 (k2: 14), 16 -> 32 (k2: 28), a final Conv3x3 to one
    channel and a sigmoid. Shapes: (N, 1, 28, 28) -> (N, 1, 28, 28)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(conv_block(1, 32), conv_block(32, 16), conv_block(16, 8))
        self.decoder = nn.Sequential(
            deconv_block(8, 8, 3),
            deconv_block(8, 16, 2),
            deconv_block(16, 32, 2),
            nn.Conv2d(32, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))


class DenoisingAutoencoder7x7(nn.Module):
    """000's denoiser: stride 1, no padding, no pooling. Encoder Conv7x7 + ReLU (fused) twice,
    in_channels -> 4 -> 2, each taking 6 off the height and width; decoder ConvTranspose7x7
    2 -> 4 + ReLU and 4 -> in_channels, each giving the 6 back, and a sigmoid. Defaults: the
    notes' RGB photos. Shapes: (N, C, H, W) -> (N, C, H, W), H and W at least 13."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, int] = (4, 2), kernel_size: int = 7):
        super().__init__()
        wide, narrow = channels
        self.encoder = nn.Sequential(
            Conv2dReLU(in_channels, wide, kernel_size),
            Conv2dReLU(wide, narrow, kernel_size),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(narrow, wide, kernel_size),
            nn.ReLU(),
            nn.ConvTranspose2d(wide, in_channels, kernel_size),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))
