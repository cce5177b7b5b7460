"""dlfast: fused PyTorch kernels in CUDA, Triton and C++, with drop-in layers."""

from dlfast import nn
from dlfast.backends import BackendUnavailableError, available_backends, use_backend
from dlfast.info import info
from dlfast.ops import (
    attention,
    bigram_counts,
    bigram_counts_distributed,
    causal_attention,
    conv2d_relu,
    layer_norm,
    ngram_counts,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "attention",
    "available_backends",
    "bigram_counts",
    "bigram_counts_distributed",
    "causal_attention",
    "conv2d_relu",
    "info",
    "layer_norm",
    "ngram_counts",
    "nn",
    "use_backend",
]
