"""Swaps dlfast layers into an existing model, and back."""

from __future__ import annotations

import torch

from dlfast.nn.attention import MultiheadAttention
from dlfast.nn.layer_norm import LayerNorm

# torch.nn class -> its dlfast drop-in. Each drop-in subclasses the torch class and adds no
# state, so swapping an instance's class keeps its parameters, buffers, hooks and device.
_DROP_INS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.MultiheadAttention: MultiheadAttention,
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces, in place, every layer of `model` that dlfast has a drop-in for; returns `model`.

    Only exact instances are converted: a user subclass of a torch.nn layer may override
    forward, so it is left as it is.
    """
    for module in model.modules():
        drop_in = _DROP_INS.get(type(module))
        if drop_in is not None:
            module.__class__ = drop_in
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes convert(): every dlfast drop-in in `model` becomes its torch.nn layer again."""
    originals = {drop_in: original for original, drop_in in _DROP_INS.items()}
    for module in model.modules():
        original = originals.get(type(module))
        if original is not None:
            module.__class__ = original
    return model
