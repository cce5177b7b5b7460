"""Drop-in layers: same constructor, defaults and state_dict keys as the torch.nn layer."""

from dlfast.nn.convert import convert, revert
from dlfast.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm", "convert", "revert"]
