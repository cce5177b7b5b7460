"""The small models of the course notes' first weeks: Gaussian basis-function regression and the
deep narrow tanh classifier (000, after the Little Book of Deep Learning), and the MLP classifier
(000 "Multi Layer Perceptrons"; 003 weeks 3-4). None has an op dlfast fuses; they are plain
torch.nn; their data generators are in dlfast.data.generated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianBasisRegression(nn.Module):
    """y = sum_k w_k exp(-(x - c_k)^2 / (2 s^2)): centres evenly on [-1, 1], s = 0.1, the weights
    w (initially N(0, 1)) the only parameters. Shapes: (n,) -> (n,)."""

    def __init__(self, num_centres: int = 10, scale: float = 0.1):
        super().__init__()
        self.register_buffer("centres", torch.linspace(-1, 1, num_centres))
        self.scale = scale
        self.weights = nn.Parameter(torch.randn(num_centres))

    def forward(self, x: Tensor) -> Tensor:
        basis = torch.exp(-((x.unsqueeze(-1) - self.centres) ** 2) / (2 * self.scale**2))
        return basis @ self.weights


class DeepNarrowTanh(nn.Module):
    """depth x (Linear(2, 2) + tanh) and nothing else: the last layer's two tanh outputs are the
    class scores. The notes end in a softmax over them and then train with a cross-entropy loss,
    which applies one of its own; here the loss's is the only one, so forward returns them as
    logits. forward keeps every layer's activations in self.activations, for plotting how the
    layers untangle the classes. Shapes: (N, 2) -> (N, 2)."""

    def __init__(self, depth: int = 7):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(depth))
        self.activations: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.activations = [x.detach()]
        for layer in self.layers:
            x = torch.tanh(layer(x))
            self.activations.append(x.detach())
        return x


class MLPClassifier(nn.Module):
    """Linear + ReLU (+ dropout) stacks and a linear head: (N, in_features) -> (N, num_classes)."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64, 64), dropout: float = 0.2
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
            in_features = width
        self.net = nn.Sequential(*layers, nn.Linear(in_features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
