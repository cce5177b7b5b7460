"""Every dlfast op in a few lines of plain PyTorch, written from the definition.

This is the oracle of the tests and the `reference` backend. It computes in float32
(float64 for float64 input) from the given, already rounded inputs and rounds once at the end,
which is what the fused kernels do too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims.

    The variance is biased (divides by N), as in torch.nn.functional.layer_norm.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(_acc_dtype(x))
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).square().mean(dims, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)
