"""dlfast.layer_norm: torch.nn.functional.layer_norm on fused kernels.

Every kernel backend normalises the last dim of a contiguous (..., N) input, with
N = prod(normalized_shape), through a pair of ops with one schema:

  layer_norm_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)
  layer_norm_bwd(dy, x, weight?, mean, rstd, weight_grad, bias_grad) -> (dx, dweight, dbias)

The cpu and cuda backends are torch.ops.dlfast.layer_norm_fwd/_bwd (C++, csrc/dlfast.cpp);
the triton backend is torch.ops.dlfast.layer_norm_fwd_triton/_bwd_triton, defined here.
Each pair gets the same fake (meta) implementation and autograd rule, so torch.compile
traces any backend without a graph break.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dlfast import backends, reference
from dlfast.ops.registry import grads_through, register_kernels

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwd_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    M = math.prod(x.shape[:-1])
    return (
        torch.empty_like(x),
        x.new_empty((M,), dtype=_stats_dtype(x)),
        x.new_empty((M,), dtype=_stats_dtype(x)),
    )


def _bwd_fake(dy, x, weight, mean, rstd, weight_grad: bool, bias_grad: bool):
    N = x.shape[-1]
    return torch.empty_like(x), x.new_empty((N if weight_grad else 0,)), x.new_empty((N if bias_grad else 0,))


@torch.library.custom_op("dlfast::layer_norm_fwd_triton", mutates_args=())
def _layer_norm_fwd_triton(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    from dlfast.triton_kernels.layer_norm import layer_norm_fwd

    y, mean, rstd = layer_norm_fwd(x.reshape(-1, x.shape[-1]), weight, bias, eps)
    return y.view(x.shape), mean, rstd


@torch.library.custom_op("dlfast::layer_norm_bwd_triton", mutates_args=())
def _layer_norm_bwd_triton(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from dlfast.triton_kernels.layer_norm import layer_norm_bwd

    N = x.shape[-1]
    dx, dweight, dbias = layer_norm_bwd(
        dy.reshape(-1, N), x.reshape(-1, N), weight, mean, rstd, weight_grad, bias_grad
    )
    return dx.view(x.shape), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, _bias, ctx.eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(bwd, ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    weight_grad, bias_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if torch.is_grad_enabled():  # create_graph=True: see grads_through
        # The bias shifts y and so never enters dx or dweight; its gradient is the sum of dy.
        y = reference.layer_norm(x, (x.shape[-1],), weight, None, ctx.eps)
        dx, dweight = grads_through(y, dy, (x, weight), (ctx.needs_input_grad[0], weight_grad))
        dbias = dy.reshape(-1, x.shape[-1]).sum(0) if bias_grad else None
        return dx, dweight, dbias, None
    dx, dweight, dbias = bwd(dy.contiguous(), x, weight, mean, rstd, weight_grad, bias_grad)
    return dx, (dweight if weight_grad else None), (dbias if bias_grad else None), None


# Under CUDA autocast PyTorch runs layer_norm in float32 (its fp32 op list); so do these.
# (CPU autocast leaves layer_norm alone, and so do we.)
_KERNELS = register_kernels(
    "layer_norm",
    fwd_fake=_fwd_fake,
    bwd_fake=_bwd_fake,
    setup_context=_setup_context,
    backward=_backward,
    cuda_autocast_dtype=torch.float32,
)


def _check(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None
) -> tuple[int, ...]:
    """Raises PyTorch's errors, naming the argument; returns normalized_shape as ints."""
    # Runs on every call, so it is written for the interpreter's sake: no generators, each tensor
    # property read once (with cold caches each costs microseconds; see backends.choose).
    if not isinstance(x, Tensor):
        raise TypeError(f"layer_norm: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    for n in normalized_shape:
        if not isinstance(n, (int, torch.SymInt)):
            normalized_shape = _as_ints(normalized_shape)
            break
    for n in normalized_shape:
        if n < 0:
            raise ValueError(
                f"layer_norm: normalized_shape must be non-negative ints, got {normalized_shape}"
            )
    x_shape = x.shape
    if len(normalized_shape) == 0 or x_shape[len(x_shape) - len(normalized_shape) :] != normalized_shape:
        raise ValueError(
            f"layer_norm: normalized_shape {list(normalized_shape)} must be non-empty and match the trailing "
            f"dims of x, whose shape is {list(x_shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"layer_norm: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != normalized_shape:
            raise ValueError(
                f"layer_norm: {name} must have shape {list(normalized_shape)}, got {list(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"layer_norm: {name} must be a floating-point tensor, got {t.dtype}")
    return normalized_shape


def _as_ints(normalized_shape) -> tuple[int, ...]:
    """A sequence of integer-like sizes (NumPy integers, say) as ints, as torch takes it."""
    try:
        return tuple(n if isinstance(n, torch.SymInt) else operator.index(n) for n in normalized_shape)
    except TypeError:
        raise TypeError(
            f"layer_norm: normalized_shape must be a sequence of ints, got {normalized_shape!r}"
        ) from None


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Layer normalisation over the trailing dims, as torch.nn.functional.layer_norm.

    Args:
        x: (*, *normalized_shape), float32/float64/float16/bfloat16, any strides.
        normalized_shape: the trailing dims to normalise over (an int or a sequence).
        weight, bias: optional, of shape normalized_shape. A weight or bias of another float
            dtype than x (float32 parameters under bf16 activations) is cast to x's dtype first.
        eps: added to the biased variance.
        backend: force one of dlfast.available_backends(); default from dlfast.backends.DEFAULTS.

    Returns:
        Tensor of x's shape and dtype. Statistics accumulate in float32 (float64 for float64).
        Gradients flow to x, weight and bias.
    """
    if isinstance(normalized_shape, (tuple, list)):
        shape = tuple(normalized_shape)
    elif isinstance(normalized_shape, (int, torch.SymInt)):
        shape = (normalized_shape,)
    else:
        shape = _as_ints(normalized_shape)
    shape = _check(x, shape, weight, bias)
    name = backends.choose("layer_norm", x, backend)
    if name == "torch":
        return F.layer_norm(x, shape, weight, bias, eps)
    if name == "reference":
        return reference.layer_norm(x, shape, weight, bias, eps)
    if name in ("triton", "cuda") and x.dtype == torch.float64:
        raise TypeError(f"layer_norm: the {name} backend takes float32, float16 and bfloat16, not float64")
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # PyTorch runs layer_norm in float32 under CUDA autocast. Cast x here, before the
        # parameters are cast to x's dtype below, so float32 parameters are not rounded first.
        x = x.float()
    N = shape[0] if len(shape) == 1 else math.prod(shape)
    if x.numel() == 0 or N == 0:
        # Nothing to normalise: let PyTorch produce the (empty) result and its graph, with the
        # parameters cast as on every other path.
        weight, bias = (None if t is None else t.to(x.dtype) for t in (weight, bias))
        return F.layer_norm(x, shape, weight, bias, eps)
    fwd, _bwd = _KERNELS[name]
    weight, bias = _as_row_vector(weight, x.dtype, N), _as_row_vector(bias, x.dtype, N)
    if len(shape) == 1:
        # The kernels normalise the last dim of any shape: no reshape, no view nodes in the graph.
        return fwd(x.contiguous(), weight, bias, eps)[0]
    # Several normalised dims: the kernels see them as one.
    y = fwd(x.reshape(*x.shape[: x.dim() - len(shape)], N).contiguous(), weight, bias, eps)[0]
    return y.view_as(x)


def _as_row_vector(t: Tensor | None, dtype: torch.dtype, N: int) -> Tensor | None:
    """weight or bias as the kernels take it: (N,), contiguous, in x's dtype."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.dim() != 1:
        t = t.reshape(N)
    return t.contiguous()
