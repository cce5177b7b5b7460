"""dlfast.conv2d_relu: relu(torch.nn.functional.conv2d(...)) in one fused op.

Every kernel backend implements one pair of ops with the schema of csrc/dlfast.cpp:

  conv2d_relu_fwd(x, weight, bias?, stride, padding, dilation, groups) -> y
  conv2d_relu_bwd(dy, y, x, weight, stride, padding, dilation, groups, output_mask) -> (dx, dweight, dbias)

with symmetric integer padding (this module turns 'same' and 'valid' into it). The cpu and
cuda backends are torch.ops.dlfast.conv2d_relu_fwd/_bwd (C++); the triton backend is
torch.ops.dlfast.conv2d_relu_fwd_triton/_bwd_triton, defined here. Both pairs get the same fake
implementation and autograd rule. The backward reads y (the forward's output) as the ReLU mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from dlfast import backends, reference
from dlfast.ops.registry import autocast_inputs, grads_through, register_kernels

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def conv_memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of the conv's outputs, as F.conv2d picks it: channels_last if x or
    weight suggests it."""
    if torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    return tuple(
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


def _fwd_fake(x, weight, bias, stride, padding, dilation, groups):
    P, Q = _output_hw(x, weight, stride, padding, dilation)
    return torch.empty(
        (x.shape[0], weight.shape[0], P, Q),
        dtype=x.dtype,
        device=x.device,
        memory_format=conv_memory_format(x, weight),
    )


def _bwd_fake(dy, y, x, weight, stride, padding, dilation, groups, output_mask):
    fmt = conv_memory_format(x, weight)
    want_dx, want_dw, want_db = output_mask
    # Each unwanted output is its own (0,) tensor: outputs of a custom op must not alias.
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        if want_dx
        else x.new_empty((0,)),
        torch.empty(weight.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        if want_dw
        else x.new_empty((0,)),
        x.new_empty((weight.shape[0] if want_db else 0,)),
    )


@torch.library.custom_op("dlfast::conv2d_relu_fwd_triton", mutates_args=())
def _conv2d_relu_fwd_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    from dlfast.triton_kernels.conv2d_relu import conv2d_relu_fwd

    y = conv2d_relu_fwd(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return y.contiguous(memory_format=conv_memory_format(x, weight))


@torch.library.custom_op("dlfast::conv2d_relu_bwd_triton", mutates_args=())
def _conv2d_relu_bwd_triton(
    dy: Tensor,
    y: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    from dlfast.triton_kernels.conv2d_relu import conv2d_relu_bwd

    fmt = conv_memory_format(x, weight)
    dx, dweight, dbias = conv2d_relu_bwd(
        dy, y, x, weight, tuple(stride), tuple(padding), tuple(dilation), groups, tuple(output_mask)
    )
    # Outputs must not alias each other or the inputs (a custom-op rule): the kernels' fresh
    # tensors are returned as they are or as a fresh copy in the conv's layout.
    return (
        dx.contiguous(memory_format=fmt) if output_mask[0] else x.new_empty((0,)),
        dweight.contiguous(memory_format=fmt) if output_mask[1] else x.new_empty((0,)),
        dbias if output_mask[2] else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, _bias, stride, padding, dilation, groups = inputs
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.save_for_backward(x, weight, output)


def _backward(bwd, ctx, dy):
    x, weight, y = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # create_graph=True: see grads_through
        # The ReLU's mask (y > 0) is constant almost everywhere: dy masked by it, taken through
        # the convolution alone (whose bias adds the sum of the masked dy).
        dy = dy * (y > 0)
        stride, padding, dilation, groups = ctx.geometry
        conv = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        dx, dweight = grads_through(conv, dy, (x, weight), mask[:2])
        return dx, dweight, (dy.sum((0, 2, 3)) if mask[2] else None), None, None, None, None
    dx, dweight, dbias = bwd(dy, y, x, weight, *ctx.geometry, mask)
    grads = [g if wanted else None for g, wanted in zip((dx, dweight, dbias), mask, strict=True)]
    return (*grads, None, None, None, None)


_KERNELS = register_kernels(
    "conv2d_relu", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward
)


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    if isinstance(value, Sequence) and len(value) == 1 and isinstance(value[0], int):
        return (int(value[0]), int(value[0]))
    raise TypeError(f"conv2d_relu: {name} must be an int or a pair of ints, got {value!r}")


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> None:
    """PyTorch's errors for the cases where F.conv2d raises, each naming the argument."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"conv2d_relu: {name} must be a Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"conv2d_relu: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 4:
        raise RuntimeError(
            f"conv2d_relu: x must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if weight.dim() != 4:
        raise RuntimeError(
            f"conv2d_relu: weight must be 4-D (K, C / groups, R, S), got shape {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise RuntimeError(f"conv2d_relu: {name} is {t.dtype} but x is {x.dtype}: they must match")
        if t.device != x.device:
            raise RuntimeError(f"conv2d_relu: {name} is on {t.device} but x is on {x.device}")
    if not isinstance(groups, int) or groups < 1:
        raise RuntimeError(f"conv2d_relu: groups must be a positive int, got {groups!r}")
    C, K = x.shape[1], weight.shape[0]
    if K % groups != 0:
        raise RuntimeError(f"conv2d_relu: groups ({groups}) must divide weight's {K} output channels")
    if weight.shape[1] * groups != C:
        raise RuntimeError(
            f"conv2d_relu: x has {C} channels but weight expects {weight.shape[1] * groups} "
            f"({weight.shape[1]} per group x {groups} groups)"
        )
    if bias is not None and tuple(bias.shape) != (K,):
        raise RuntimeError(f"conv2d_relu: bias must have shape ({K},), got {tuple(bias.shape)}")


def _same_padding(x: Tensor, weight: Tensor, stride, dilation) -> tuple[Tensor, tuple[int, int]]:
    """padding='same' as F.conv2d applies it: total dil * (k - 1) per dim, the odd extra element
    on the bottom/right (which the symmetric kernels get as an explicit pad of x)."""
    if stride != (1, 1):
        raise RuntimeError("conv2d_relu: padding='same' is not supported for strided convolutions")
    total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    left = (total[0] // 2, total[1] // 2)
    extra = (total[0] - 2 * left[0], total[1] - 2 * left[1])
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, left


def _padding_past_kernel(weight: Tensor, padding: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether some output row or column sees only padding."""
    return padding[0] > dilation[0] * (weight.shape[2] - 1) or padding[1] > dilation[1] * (
        weight.shape[3] - 1
    )


def conv2d_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    backend: str | None = None,
) -> Tensor:
    """relu(torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)), fused.

    Args:
        x: (N, C, H, W) or unbatched (C, H, W); float32/float64/float16/bfloat16; NCHW,
            channels_last or any strides.
        weight: (K, C / groups, R, S), x's dtype and device.
        bias: (K,) or None.
        stride, dilation: an int or an (h, w) pair, >= 1.
        padding: an int, an (h, w) pair, 'valid' (no padding) or 'same' (output size = input
            size; stride 1 only; an odd total padding puts the extra row/column at the
            bottom/right, as F.conv2d does).
        groups: divides C and K; groups == C == K is a depthwise convolution.
        backend: force one of dlfast.available_backends(); default from dlfast.backends.DEFAULTS.

    Returns:
        (N, K, P, Q) (or (K, P, Q)) in x's dtype, channels_last if x or weight is, as F.conv2d.
        Gradients flow to x, weight and bias; the backward reads the output as the ReLU mask.
        Under autocast the op runs in the autocast dtype, as F.conv2d does.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"conv2d_relu: x must be a Tensor, got {type(x).__name__}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    # conv2d is on autocast's lower-precision list: it runs in the autocast dtype, whatever dtypes
    # its inputs have (bf16 activations meet fp32 weights in any autocast network). Before the
    # checks, so that they see the dtypes the kernels will.
    x, weight, bias = autocast_inputs(x, x, weight, bias)
    _check(x, weight, bias, groups)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise RuntimeError(f"conv2d_relu: stride and dilation must be >= 1, got {stride} and {dilation}")
    name = backends.choose("conv2d_relu", x, backend)
    if name == "torch":
        if (
            x.is_cpu
            and not isinstance(padding, str)
            and _padding_past_kernel(weight, _pair(padding, "padding"), dilation)
        ):
            # PyTorch's channels_last CPU forward segfaults on some such convolutions (oneDNN; see
            # csrc/cpu/conv2d_relu.cpp): run them in NCHW and give the output F.conv2d's layout.
            fmt = conv_memory_format(x, weight)
            y = F.conv2d(x.contiguous(), weight.contiguous(), bias, stride, padding, dilation, groups)
            y = F.relu(y).contiguous(memory_format=fmt)
        else:
            y = F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
        return y.squeeze(0) if unbatched else y
    if padding == "same":
        x, padding = _same_padding(x, weight, stride, dilation)
    elif padding == "valid":
        padding = (0, 0)
    elif isinstance(padding, str):
        raise ValueError(f"conv2d_relu: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        padding = _pair(padding, "padding")
        if min(padding) < 0:
            raise RuntimeError(f"conv2d_relu: padding must be >= 0, got {padding}")
    for i, dim in enumerate("hw"):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < span:
            raise RuntimeError(
                f"conv2d_relu: the kernel spans {span} along {dim} (dilation included), more than "
                f"the padded input's {x.shape[2 + i] + 2 * padding[i]}"
            )
    if name == "reference" or x.shape[0] == 0:
        # The reference backend, and empty batches (PyTorch's ops handle them and their graph).
        y = reference.conv2d_relu(x, weight, bias, stride, padding, dilation, groups)
        y = y.contiguous(memory_format=conv_memory_format(x, weight))
    else:
        if name in ("triton", "cuda") and x.dtype == torch.float64:
            raise TypeError(
                f"conv2d_relu: the {name} backend takes float32, float16 and bfloat16, not float64 "
                "(use backend='torch' or 'reference')"
            )
        fwd, _bwd = _KERNELS[name]
        y = fwd(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    return y.squeeze(0) if unbatched else y
