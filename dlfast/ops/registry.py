"""The registration every dlfast op with a gradient shares.

An op `name` has a C++ pair, torch.ops.dlfast.<name>_fwd/_bwd (the cpu and cuda backends, present
when the extension loaded), and a Triton pair, <name>_fwd_triton/_bwd_triton (custom ops defined
in dlfast/ops/<name>.py). Both pairs take the same arguments, so both get the same fake
implementations and compute the same gradients, and torch.compile traces any backend alike.
The Triton pair's autograd rule is the Python `backward` given here; the C++ pair's is the same
rule written in C++ (csrc/autograd.cpp), because a Python autograd.Function costs ~0.1 ms a call
on the host, more than a small LayerNorm or attention takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from dlfast import backends

OpPair = tuple[torch._ops.OpOverload, torch._ops.OpOverload]


def register_kernels(
    name: str,
    *,
    fwd_fake: Callable,
    bwd_fake: Callable,
    setup_context: Callable,
    backward: Callable,
    cuda_autocast_dtype: torch.dtype | None = None,
) -> dict[str, OpPair]:
    """Registers the fakes on every (fwd, bwd) pair of op `name` and the autograd rule on the
    Triton pair; returns {kernel backend: (fwd, bwd)}. backward(bwd, ctx, *grads) gets the pair's
    bwd op first; csrc/autograd.cpp must compute the same gradients.
    cuda_autocast_dtype: the dtype the forward runs in under CUDA autocast, if it is cast."""
    pairs = [("triton", f"{name}_fwd_triton", f"{name}_bwd_triton")]
    if backends.EXTENSION_ERROR is None:
        pairs.append(("cpu", f"{name}_fwd", f"{name}_bwd"))
    kernels: dict[str, OpPair] = {}
    for backend, fwd_name, bwd_name in pairs:
        fwd = getattr(torch.ops.dlfast, fwd_name).default
        bwd = getattr(torch.ops.dlfast, bwd_name).default
        torch.library.register_fake(fwd)(fwd_fake)
        torch.library.register_fake(bwd)(bwd_fake)
        if backend == "triton":  # the C++ pair's autograd rule is C++ (csrc/autograd.cpp)
            torch.library.register_autograd(
                fwd, functools.partial(backward, bwd), setup_context=setup_context
            )
        if cuda_autocast_dtype is not None:
            torch.library.register_autocast(fwd, "cuda", cuda_autocast_dtype)
        kernels[backend] = (fwd, bwd)
    if "cpu" in kernels:
        kernels["cuda"] = kernels["cpu"]  # one C++ op, with CPU and CUDA kernels
    return kernels


def grads_through(
    out: torch.Tensor, grad_out: torch.Tensor, inputs: Sequence[torch.Tensor | None], wanted: Sequence[bool]
) -> list[torch.Tensor | None]:
    """The gradients of `out` (recomputed by differentiable PyTorch ops from the saved inputs)
    for grad_out, with a graph of their own; None where not wanted, zeros where out does not
    depend on the input.

    For a backward run under create_graph=True (the only time a backward runs with grad mode
    on): the kernels' bwd ops have no derivative, so their gradients would be constants and any
    second-order gradient through them wrong. csrc/autograd.cpp does the same for the C++ pair.
    """
    targets = [t for t, w in zip(inputs, wanted, strict=True) if w]
    grads = iter(
        torch.autograd.grad(out, targets, grad_out, create_graph=True, allow_unused=True) if targets else ()
    )
    result = []
    for t, w in zip(inputs, wanted, strict=True):
        g = next(grads) if w else None
        result.append(torch.zeros_like(t) if w and g is None else g)
    return result


def autocast_inputs(lead: torch.Tensor, *tensors):
    """The tensors as autocast, where it is on for lead's device type, hands them to an op of its
    lower-precision list (conv2d, SDPA): floating tensors other than float64 cast to the autocast
    dtype, anything else (None, integer masks, float64) as it is."""
    # Asked on every op call: for CPU and CUDA tensors (where autocast always exists) one C call
    # answers, with no torch.device built and no availability lookup.
    device_type = "cpu" if lead.is_cpu else "cuda" if lead.is_cuda else lead.device.type
    if device_type in ("cpu", "cuda"):
        if not torch.is_autocast_enabled(device_type):
            return tensors
    elif not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )
