"""The functional ops: input checks, backend choice, autograd and fake implementations."""

from dlfast.ops.attention import attention, causal_attention
from dlfast.ops.conv2d_relu import conv2d_relu
from dlfast.ops.layer_norm import layer_norm
from dlfast.ops.ngram_counts import bigram_counts, bigram_counts_distributed, ngram_counts

__all__ = [
    "attention",
    "bigram_counts",
    "bigram_counts_distributed",
    "ngram_counts",
    "causal_attention",
    "conv2d_relu",
    "layer_norm",
]
