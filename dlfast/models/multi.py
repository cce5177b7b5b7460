"""Multi-input and multi-output models of the course notes (003 week 4, "Multi-input models",
"Multi-output models", "Loss weighting"; 004 "Multi-Input Networks"): an image branch (a CNN on
Conv2dReLU) and a tabular branch (an MLP) whose representations are concatenated; a shared image
network feeding two heads (the character and the alphabet it belongs to) trained on a weighted
sum of their losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlfast.nn import Conv2dReLU


def image_features(in_channels: int, image_size: int, out_features: int) -> nn.Sequential:
    """Conv3x3 + ReLU (fused) + MaxPool2, twice (16 and 32 channels), Flatten, Linear + ReLU."""
    size = image_size // 4
    return nn.Sequential(
        Conv2dReLU(in_channels, 16, 3, padding=1),
        nn.MaxPool2d(2),
        Conv2dReLU(16, 32, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * size * size, out_features),
        nn.ReLU(),
    )


class TwoInputClassifier(nn.Module):
    """(image (N, C, S, S), one-hot alphabet (N, num_alphabets)) -> (N, num_classes) logits:
    each input through its own branch, the two representations concatenated, a linear classifier."""

    def __init__(self, num_alphabets: int, num_classes: int, image_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.image = image_features(in_channels, image_size, 64)
        self.alphabet = nn.Sequential(nn.Linear(num_alphabets, 8), nn.ReLU())
        self.classifier = nn.Linear(64 + 8, num_classes)

    def forward(self, image: Tensor, alphabet: Tensor) -> Tensor:
        return self.classifier(torch.cat([self.image(image), self.alphabet(alphabet)], dim=1))


class TwoOutputClassifier(nn.Module):
    """image (N, C, S, S) -> (character logits (N, num_characters), alphabet logits
    (N, num_alphabets)) from one shared image network."""

    def __init__(self, num_characters: int, num_alphabets: int, image_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.image = image_features(in_channels, image_size, 64)
        self.character_head = nn.Linear(64, num_characters)
        self.alphabet_head = nn.Linear(64, num_alphabets)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        features = self.image(image)
        return self.character_head(features), self.alphabet_head(features)


def weighted_loss(
    outputs: tuple[Tensor, Tensor], characters: Tensor, alphabets: Tensor, character_weight: float = 2.0
) -> Tensor:
    """The notes' loss weighting: alphabet loss + character_weight * character loss (the
    character task, with more classes, is the harder one)."""
    character_logits, alphabet_logits = outputs
    return F.cross_entropy(alphabet_logits, alphabets) + character_weight * F.cross_entropy(
        character_logits, characters
    )
