"""Drop-in layers: same constructor, defaults and state_dict keys as the torch.nn layer."""

from dlfast.nn.attention import CausalSelfAttention, MultiheadAttention, SDPACausalSelfAttention
from dlfast.nn.conv import Conv2dReLU, Conv2dThenReLU
from dlfast.nn.convert import convert, revert
from dlfast.nn.layer_norm import LayerNorm

__all__ = [
    "CausalSelfAttention",
    "Conv2dReLU",
    "Conv2dThenReLU",
    "LayerNorm",
    "MultiheadAttention",
    "SDPACausalSelfAttention",
    "convert",
    "revert",
]
