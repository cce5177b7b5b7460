"""The functional ops: input checks, backend choice, autograd and fake implementations."""

from dlfast.ops.attention import attention, causal_attention
from dlfast.ops.layer_norm import layer_norm

__all__ = ["attention", "causal_attention", "layer_norm"]
