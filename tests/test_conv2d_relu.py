"""dlfast.conv2d_relu on every backend against dlfast.reference computed in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU_ISA_LEVELS,
    check_compiled_model,
    dtypes_for,
    grad_tol,
    run_on_cpu_isa,
    second_order_grads,
    skip_reason,
    tol,
)

import dlfast
from dlfast import reference

# (N, C, H, W, K, R, S, stride, padding, dilation, groups): each exercises a path of the kernels.
CASES = {
    "course-first-layer": (2, 3, 7, 7, 8, 3, 3, 1, 1, 1, 1),  # few input channels: direct path
    "stride2-odd": (1, 8, 13, 17, 16, 3, 3, 2, 0, 1, 1),  # odd sizes, stride 2, no padding
    "dilation2-same": (2, 8, 9, 9, 8, 3, 3, 1, "same", 2, 1),  # 'same' with dilation
    "groups2": (2, 4, 8, 8, 8, 3, 3, 1, 1, 1, 2),
    "depthwise": (1, 8, 7, 7, 8, 3, 3, 1, 1, 1, 8),
    "one-channel-5x5": (2, 1, 12, 12, 4, 5, 5, 1, 2, 1, 1),
    "few-channels-strided-dilated": (3, 2, 11, 13, 6, 3, 3, (2, 1), 1, (1, 2), 1),
    "1x1-16ch": (1, 16, 6, 6, 16, 1, 1, 1, 0, 1, 1),  # a GEMM with a 16-deep reduction
    "even-kernel-same": (2, 3, 8, 8, 4, 4, 4, 1, "same", 1, 1),  # asymmetric 'same' padding
    "stride2-pad1-24ch": (2, 24, 9, 9, 32, 3, 3, 2, 1, 1, 1),  # several reduction tiles
}


def make_inputs(case, dtype, device, bias=True, seed=0):
    N, C, H, W, K, R, S, *_rest, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    # Weights scaled by fan-in keep the outputs O(1), where the dtype tolerances are set.
    w = torch.randn(K, C // groups, R, S, generator=g) / (C // groups * R * S) ** 0.5
    b = torch.randn(K, generator=g) * 0.5 if bias else None
    return x.to(device, dtype), w.to(device, dtype), None if b is None else b.to(device, dtype)


def check_against_reference(backend, case, x, w, b):
    """Forward against the float64 reference; backward against the exact gradient of the
    linear conv under the ReLU mask of the kernel's own output (where the pre-activation is
    within rounding of 0, the kernel and the reference may rightly disagree on the mask)."""
    *_shape, stride, padding, dilation, groups = case
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = dlfast.conv2d_relu(
        leaves[0], leaves[1], leaves[2], stride, padding, dilation, groups, backend=backend
    )
    exact = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    linear = F.conv2d(exact[0], exact[1], exact[2], stride, padding, dilation, groups)
    assert y.dtype == x.dtype and y.shape == linear.shape
    torch.testing.assert_close(y.double(), torch.relu(linear), **tol(x.dtype))

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    y.backward(dy)
    linear.backward(dy.double() * (y.detach() > 0))
    N, K, P, Q = y.shape
    torch.testing.assert_close(leaves[0].grad.double(), exact[0].grad, **grad_tol(x.dtype, K))
    for got, want in zip(leaves[1:], exact[1:], strict=True):
        if got is not None:
            assert got.grad.dtype == got.dtype and got.grad.shape == got.shape
            torch.testing.assert_close(got.grad.double(), want.grad, **grad_tol(x.dtype, N * P * Q))


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(backend_device, case, dtype):
    backend, device = backend_device
    if dtype not in dtypes_for(backend, device):
        pytest.skip(f"{dtype} is not tested on {backend}/{device}")
    check_against_reference(backend, case, *make_inputs(case, dtype, device))


def test_float64_and_no_bias(backend_device):
    backend, device = backend_device
    case = CASES["stride2-odd"]
    dtype = torch.float64 if backend in ("cpu", "reference") else torch.float32
    check_against_reference(backend, case, *make_inputs(case, dtype, device, bias=False))


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "channels_last_weight"])
def test_layouts_like_torch(backend_device, layout):
    """Outputs and gradients in the memory format F.conv2d gives them, for any input strides."""
    backend, device = backend_device
    case = CASES["groups2"]
    x, w, b = make_inputs(case, torch.float32, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.cat([x, x], dim=3)[..., ::2]
    else:
        w = w.contiguous(memory_format=torch.channels_last)
    check_against_reference(backend, case, x, w, b)
    *_shape, stride, padding, dilation, groups = case
    ours = dlfast.conv2d_relu(x, w, b, stride, padding, dilation, groups, backend=backend)
    theirs = F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert ours.is_contiguous(memory_format=fmt) == theirs.is_contiguous(memory_format=fmt), fmt


@pytest.mark.parametrize(
    "case",
    [(1, 8, 1, 1, 4, 1, 2, (1, 2), 3, (1, 2), 4), (1, 6, 1, 1, 6, 3, 1, 3, 2, 2, 3)],
    ids=["groups4-strided-dilated", "groups3-stride3"],
)
def test_channels_last_with_padding_past_the_kernel(backend_device, case):
    """Padding past the dilated kernel's extent (some outputs see only padding): oneDNN's
    channels_last forward segfaulted on these (found by random testing), ATen's conv2d too."""
    backend, device = backend_device
    x, w, b = make_inputs(case, torch.float32, device)
    w = w.contiguous(memory_format=torch.channels_last)
    check_against_reference(backend, case, x, w, b)
    *_shape, stride, padding, dilation, groups = case
    y = dlfast.conv2d_relu(x, w, b, stride, padding, dilation, groups, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)  # as F.conv2d lays it out


def test_torch_backend_with_padding_past_the_kernel_does_not_crash():
    """The "torch" backend (where DEFAULTS delegate) runs these in NCHW too, in F.conv2d's layout."""
    case = (1, 8, 1, 1, 4, 1, 2, (1, 2), 3, (1, 2), 4)
    x, w, b = make_inputs(case, torch.float32, "cpu")
    w = w.contiguous(memory_format=torch.channels_last)
    *_shape, stride, padding, dilation, groups = case
    y = dlfast.conv2d_relu(x, w, b, stride, padding, dilation, groups, backend="torch")
    torch.testing.assert_close(y, F.relu(F.conv2d(x, w.contiguous(), b, stride, padding, dilation, groups)))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_first_layer_gradients_without_an_input_gradient(backend_device):
    """A first layer's input needs no gradient: dweight and dbias alone (the CPU's direct
    route computes them without ATen), as torch's conv + relu gives them, and no dx."""
    backend, device = backend_device
    x, w, b = make_inputs(CASES["one-channel-5x5"], torch.float32, device)
    grads = []
    for conv in (
        lambda x, w, b: dlfast.conv2d_relu(x, w, b, padding=2, backend=backend),
        lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=2)),
    ):
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        (conv(x, wl, bl) * torch.arange(x.shape[-1], device=device)).sum().backward()
        grads.append((wl.grad, bl.grad))
    assert not x.requires_grad and x.grad is None
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, **tol(torch.float32))


def test_unbatched_input(backend_device):
    backend, device = backend_device
    case = CASES["course-first-layer"]
    x, w, b = make_inputs(case, torch.float32, device)
    y = dlfast.conv2d_relu(x[0], w, b, padding=1, backend=backend)
    torch.testing.assert_close(y, F.relu(F.conv2d(x[0], w, b, padding=1)), **tol(torch.float32))


@pytest.mark.parametrize(
    "padding,stride,dilation",
    [("valid", 1, 1), ("same", 1, (2, 1)), ((2, 0), (2, 1), 1), ([1, 2], 2, (1, 2))],
    ids=["valid", "same-dil21", "pad20-str21", "pad12-str2-dil12"],
)
def test_argument_forms_like_torch(backend_device, padding, stride, dilation):
    """Strings, tuples and lists for padding, stride and dilation, as F.conv2d takes them."""
    backend, device = backend_device
    x, w, b = make_inputs((2, 3, 9, 10, 4, 3, 2, 1, 0, 1, 1), torch.float32, device)
    ours = dlfast.conv2d_relu(x, w, b, stride, padding, dilation, backend=backend)
    theirs = F.relu(F.conv2d(x, w, b, stride, padding, dilation))
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = dlfast.conv2d_relu(x, w, padding=1, backend="reference")
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


# Each case: (x shape, weight shape, kwargs) for which F.conv2d raises too.
BAD_INPUTS = {
    "channel mismatch": ((1, 3, 8, 8), (4, 2, 3, 3), {}),
    "groups do not divide C": ((1, 3, 8, 8), (4, 1, 3, 3), {"groups": 2}),
    "groups do not divide K": ((1, 4, 8, 8), (3, 2, 3, 3), {"groups": 2}),
    "kernel larger than input": ((1, 3, 4, 4), (4, 3, 5, 5), {}),
    "dilated kernel too large": ((1, 3, 5, 5), (4, 3, 3, 3), {"dilation": 3}),
    "same with stride": ((1, 3, 8, 8), (4, 3, 3, 3), {"padding": "same", "stride": 2}),
    "bias shape": ((1, 3, 8, 8), (4, 3, 3, 3), {"bias": torch.zeros(5)}),
    "2-D weight": ((1, 3, 8, 8), (4, 27), {}),
    "negative padding": ((1, 3, 8, 8), (4, 3, 3, 3), {"padding": -1}),
    "zero stride": ((1, 3, 8, 8), (4, 3, 3, 3), {"stride": 0}),
    "unknown padding mode": ((1, 3, 8, 8), (4, 3, 3, 3), {"padding": "full"}),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_where_torch_raises(backend_device, name):
    backend, device = backend_device
    x_shape, w_shape, kwargs = BAD_INPUTS[name]
    x, w = torch.randn(x_shape, device=device), torch.randn(w_shape, device=device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises((RuntimeError, ValueError)):
        F.conv2d(x, w, **kwargs)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        dlfast.conv2d_relu(x, w, **kwargs, backend=backend)


def test_dtype_errors_name_the_argument():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="weight is torch.float64"):
        dlfast.conv2d_relu(x, w.double(), backend="reference")
    with pytest.raises(TypeError, match="floating-point"):
        dlfast.conv2d_relu(x.long(), w, backend="reference")
    with pytest.raises(TypeError, match="x must be a Tensor"):
        dlfast.conv2d_relu(x.numpy(), w)


def _kernel_ops(backend):
    from dlfast.ops.conv2d_relu import _KERNELS

    return _KERNELS[backend]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(backend_device, layout):
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not a custom op")
    fwd, bwd = _kernel_ops(backend)
    x, w, b = make_inputs(CASES["groups2"], torch.float32, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(fwd, (x, w, b, *geometry))
    y = fwd(x, w, b, *geometry)
    dy = torch.randn_like(y)
    torch.library.opcheck(bwd, (dy, y, x, w, *geometry, [True, True, True]))
    torch.library.opcheck(bwd, (dy, y, x, w, *geometry, [False, True, False]))


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_and_gradgradcheck_float64_cpu(groups):
    """First and second (create_graph=True) derivatives of the C++ op."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    # A pre-activation within gradcheck's step (1e-6) of 0 would straddle the ReLU's kink.
    with torch.no_grad():
        assert F.conv2d(x, w, b, padding=1, groups=groups).abs().min() > 1e-5

    def f(x, w, b):
        return dlfast.conv2d_relu(x, w, b, padding=1, groups=groups, backend="cpu")

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["course-first-layer", "groups2", "stride2-odd"])
def test_second_order_gradients_match_torch(backend_device, case):
    """Under create_graph=True (gradient penalties, Hessian-vector products) the first-order
    gradients are themselves differentiable and their gradients are PyTorch's."""
    backend, device = backend_device
    *_shape, stride, padding, dilation, groups = CASES[case]
    x, w, b = make_inputs(CASES[case], torch.float32, device)
    with torch.no_grad():  # no pre-activation within float32 rounding of the ReLU's kink
        assert F.conv2d(x, w, b, stride, padding, dilation, groups).abs().min() > 1e-4

    def f(x, w, b):
        return dlfast.conv2d_relu(x, w, b, stride, padding, dilation, groups, backend=backend)

    def torch_f(x, w, b):
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    got = second_order_grads(f, x, w, b)
    want = second_order_grads(torch_f, *(t.double() for t in (x, w, b)))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r.float(), atol=1e-4 * r.abs().max().item(), rtol=1e-4)


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("isa", CPU_ISA_LEVELS)
def test_every_cpu_isa_variant(isa):
    """The CPU's direct backward (few channels per group) is built once per ISA: each build (forced
    here by ATEN_CPU_CAPABILITY) is correct on the cases that take it."""
    direct = ["course-first-layer", "groups2", "depthwise", "one-channel-5x5", "few-channels-strided-dilated"]
    run_on_cpu_isa(
        isa,
        "import torch\n"
        "from test_conv2d_relu import CASES, make_inputs, check_against_reference\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        f"    for name in {direct!r}:\n"
        "        check_against_reference('cpu', CASES[name], *make_inputs(CASES[name], dtype, 'cpu'))\n",
    )


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
def test_cpu_backward_does_not_depend_on_the_thread_count():
    """The CPU's direct backward (few channels per group) sums dweight and dbias in fixed chunks
    of images, whatever the threads: bitwise the same gradients on one thread and on two."""
    x, w, b = make_inputs((5, 3, 9, 9, 8, 3, 3, 1, 1, 1, 1), torch.float32, "cpu")
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
            dlfast.conv2d_relu(*leaves, padding=1, backend="cpu").sum().backward()
            grads.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*grads, strict=True):
        assert torch.equal(one, two)


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        dlfast.nn.Conv2dReLU(3, 8, 3, padding=1), dlfast.nn.Conv2dReLU(8, 8, 3, stride=2), torch.nn.Flatten()
    ).to(device)
    check_compiled_model(model, torch.randn(2, 3, 9, 9, device=device), backend, device)


def test_autocast_runs_in_the_autocast_dtype_like_torch(backend_device):
    backend, device = backend_device
    dtype = torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16
    x, w, b = make_inputs(CASES["course-first-layer"], torch.float32, device)
    with torch.autocast(device, dtype=dtype):
        ours = dlfast.conv2d_relu(x, w, b, padding=1, backend=backend)
        theirs = F.relu(F.conv2d(x, w, b, padding=1))
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, **tol(dtype))
    # The second layer of an autocast network: low-precision activations, float32 weights.
    with torch.autocast(device, dtype=dtype):
        ours = dlfast.conv2d_relu(x.to(dtype), w, b, padding=1, backend=backend)
        theirs = F.relu(F.conv2d(x.to(dtype), w, b, padding=1))
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, **tol(dtype))


def test_reference_matches_torch():
    """The reference (im2col from the definition) against F.conv2d, in float64."""
    for case in CASES.values():
        *_shape, stride, padding, dilation, groups = case
        x, w, b = make_inputs(case, torch.float64, "cpu")
        if padding == "same":
            continue  # the reference takes explicit symmetric padding; the op turns 'same' into it
        want = F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))
        pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
        got = reference.conv2d_relu(x, w, b, pair(stride), pair(padding), pair(dilation), groups)
        torch.testing.assert_close(got, want, **tol(torch.float64))
