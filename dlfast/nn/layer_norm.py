"""dlfast.nn.LayerNorm, a drop-in for torch.nn.LayerNorm."""

from __future__ import annotations

import torch
from torch import Tensor

from dlfast.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by dlfast.layer_norm.

    Subclassing keeps the constructor (normalized_shape, eps, elementwise_affine, bias,
    device, dtype), the initialisation and the state_dict keys of torch.nn.LayerNorm.
    """

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
