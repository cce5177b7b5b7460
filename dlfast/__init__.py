"""dlfast: fused PyTorch kernels in CUDA, Triton and C++, with drop-in layers."""

from dlfast import nn
from dlfast.backends import BackendUnavailableError, available_backends, use_backend
from dlfast.info import info
from dlfast.ops import attention, causal_attention, layer_norm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "attention",
    "available_backends",
    "causal_attention",
    "info",
    "layer_norm",
    "nn",
    "use_backend",
]
