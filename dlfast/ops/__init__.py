"""The functional ops: input checks, backend choice, autograd and fake implementations."""

from dlfast.ops.layer_norm import layer_norm

__all__ = ["layer_norm"]
