"""dlfast.layer_norm on every backend against dlfast.reference computed in float64."""

from __future__ import annotations

import math

import numpy as np
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

# (x shape, normalized_shape): each exercises a path of the kernels.
SHAPES = [
    ((4, 1), (1,)),  # N=1: zero variance, the output is the bias
    ((3, 7), (7,)),  # N below one vector: tail-only rows
    ((5, 1023), (1023,)),  # odd N: vector body plus a ragged tail, misaligned rows
    ((1, 384), (384,)),  # a single row
    ((4, 4096), (4096,)),  # a row that fills the register path
    ((2, 65536), (65536,)),  # too wide for registers: the looped path
    ((2, 3, 8, 16), (8, 16)),  # 4-D input, 2-D normalized_shape
    ((2, 3, 100), (100,)),  # several leading dims
]
AFFINE = ["weight+bias", "weight", "none"]


def make_inputs(shape, normalized_shape, dtype, device, affine="weight+bias", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    w = torch.randn(normalized_shape, generator=g) if "weight" in affine else None
    b = torch.randn(normalized_shape, generator=g) if "bias" in affine else None
    w = None if w is None else w.to(device=device, dtype=dtype)
    b = None if b is None else b.to(device=device, dtype=dtype)
    return x, w, b


def check_against_reference(backend, x, normalized_shape, w, b, eps=1e-5):
    """Forward and backward of `backend` against the float64 reference from the same inputs."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = dlfast.layer_norm(leaves[0], normalized_shape, leaves[1], leaves[2], eps, backend=backend)
    exact = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y_exact = reference.layer_norm(exact[0], normalized_shape, exact[1], exact[2], eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_exact, **tol(x.dtype))

    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    y.backward(dy)
    y_exact.backward(dy.double())
    rows = x.numel() // max(1, math.prod(normalized_shape))
    torch.testing.assert_close(leaves[0].grad.double(), exact[0].grad, **tol(x.dtype))
    for got, want in zip(leaves[1:], exact[1:], strict=True):
        if got is not None:
            assert got.grad.dtype == got.dtype
            torch.testing.assert_close(got.grad.double(), want.grad, **grad_tol(x.dtype, rows))


@pytest.mark.parametrize("shape,normalized_shape", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(backend_device, shape, normalized_shape, dtype):
    backend, device = backend_device
    if dtype not in dtypes_for(backend, device):
        pytest.skip(f"{backend} on {device} is not tested in {dtype}")
    x, w, b = make_inputs(shape, normalized_shape, dtype, device)
    check_against_reference(backend, x, normalized_shape, w, b)


@pytest.mark.parametrize("affine", AFFINE)
def test_optional_weight_and_bias(backend_device, affine):
    backend, device = backend_device
    x, w, b = make_inputs((6, 257), (257,), torch.float32, device, affine)
    check_against_reference(backend, x, (257,), w, b)


def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    base, w, b = make_inputs((96, 10), (10,), torch.float32, device)
    x = base.t()  # (10, 96), rows strided in memory
    assert not x.is_contiguous()
    check_against_reference(backend, x, (96,), w[:1].expand(96).contiguous(), b[:1].expand(96).contiguous())
    sliced = base[:, :7]  # rows shorter than their stride
    check_against_reference(backend, sliced, (7,), w[:7], b[:7])


def test_eps_and_constant_rows(backend_device):
    backend, device = backend_device
    x = torch.full((3, 64), 2.5, device=device)
    x[1] = torch.linspace(-1, 1, 64)
    check_against_reference(backend, x, (64,), None, None, eps=0.1)


def test_nan_and_inf_propagate_like_torch(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 33, device=device)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    y = dlfast.layer_norm(x, (33,), backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (33,)), equal_nan=True)


def test_float64_on_cpu():
    x, w, b = make_inputs((5, 129), (129,), torch.float64, "cpu")
    for backend in ("cpu", "reference"):
        if skip_reason(backend, "cpu") is None:
            check_against_reference(backend, x, (129,), w, b)


def test_mixed_precision_parameters(backend_device):
    """float32 parameters under bfloat16 activations, as F.layer_norm accepts them on the CPU:
    computed in float32, returned in the activations' dtype. (PyTorch's CUDA layer_norm rejects
    the mix; dlfast accepts it on every device, so the expectation is computed in float32.)"""
    backend, device = backend_device
    dtype = torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16
    x, w, b = make_inputs((8, 64), (64,), dtype, device)
    w32, b32 = w.float().requires_grad_(True), b.float().requires_grad_(True)
    y = dlfast.layer_norm(x, 64, w32, b32, backend=backend)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.layer_norm(x.float(), (64,), w32, b32).to(dtype), **tol(dtype))
    if device == "cpu":
        torch.testing.assert_close(y, F.layer_norm(x, (64,), w32, b32), **tol(dtype))
    y.sum().backward()
    assert w32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32


def test_empty_input():
    x = torch.randn(0, 16, requires_grad=True)
    y = dlfast.layer_norm(x, 16)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    # dlfast's kernel backends cast parameters of another dtype to x's, empty x included.
    for backend in ("cpu", "reference"):
        if skip_reason(backend, "cpu") is None:
            w = torch.ones(16, dtype=torch.float64)
            assert dlfast.layer_norm(x, 16, w, backend=backend).dtype == torch.float32


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
def test_gradcheck_float64_cpu():
    x, w, b = make_inputs((3, 11), (11,), torch.float64, "cpu")
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: dlfast.layer_norm(x, 11, w, b, backend="cpu"), inputs)


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(
    "shape,normalized_shape", [((3, 11), (11,)), ((11,), (11,)), ((2, 3, 4), (3, 4))], ids=str
)
def test_gradgradcheck_float64_cpu(shape, normalized_shape, affine):
    """Double backward (create_graph=True) of the C++ op, weight and bias absent or present."""
    inputs = [
        t.requires_grad_(True)
        for t in make_inputs(shape, normalized_shape, torch.float64, "cpu", affine)
        if t is not None
    ]

    def f(x, weight=None, bias=None):
        return dlfast.layer_norm(x, normalized_shape, weight, bias, backend="cpu")

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize(
    "shape,normalized_shape", [((5, 40), (40,)), ((40,), (40,)), ((2, 3, 8, 5), (8, 5))], ids=str
)
def test_second_order_gradients_match_torch(backend_device, shape, normalized_shape):
    """Under create_graph=True (gradient penalties, Hessian-vector products) the first-order
    gradients are themselves differentiable and their gradients are PyTorch's."""
    backend, device = backend_device
    x, w, b = make_inputs(shape, normalized_shape, torch.float32, device)
    got = second_order_grads(
        lambda *t: dlfast.layer_norm(t[0], normalized_shape, *t[1:], backend=backend), x, w, b
    )
    want = second_order_grads(
        lambda *t: F.layer_norm(t[0], normalized_shape, *t[1:]), *(t.double() for t in (x, w, b))
    )
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r.float(), atol=1e-4, rtol=1e-4)


def _kernel_ops(backend):
    from dlfast.ops.layer_norm import _KERNELS

    return _KERNELS[backend]


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40)], ids=str)
def test_opcheck(backend_device, affine, shape):
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not a custom op")
    fwd, bwd = _kernel_ops(backend)
    x, w, b = make_inputs(shape, (40,), torch.float32, device, affine)
    torch.library.opcheck(fwd, (x, w, b, 1e-5))
    _y, mean, rstd = fwd(x, w, b, 1e-5)
    dy = torch.randn_like(x)
    torch.library.opcheck(bwd, (dy, x, w, mean, rstd, w is not None, b is not None))


def test_leading_dims_take_no_reshape(backend_device):
    """The kernel ops normalise the last dim of any shape, so a (B, T, C) input becomes one
    autograd node whose input is x itself, not a node between two views."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not a custom op")
    x, w, b = make_inputs((2, 3, 40), (40,), torch.float32, device)
    x.requires_grad_()
    y = dlfast.layer_norm(x, 40, w, b, backend=backend)
    assert "View" not in y.grad_fn.name()
    assert y.grad_fn.next_functions[0][0].variable is x


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), dlfast.nn.LayerNorm(48), torch.nn.GELU()).to(device)
    check_compiled_model(model, torch.randn(6, 32, device=device), backend, device)


def test_compiled_backward_runs_the_fused_kernel(backend_device):
    """Double backward recomputes through PyTorch ops only under create_graph=True; the backward
    AOTAutograd traces for torch.compile must still be the fused bwd op."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("plain PyTorch, no fused kernel")
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return make_boxed_func(gm.forward)

    x, w, b = make_inputs((4, 16), (16,), torch.float32, device)
    x.requires_grad_(True)
    f = aot_function(lambda x, w, b: dlfast.layer_norm(x, 16, w, b, backend=backend), keep, keep)
    f(x, w, b).sum().backward()
    suffix = "_triton" if backend == "triton" else ""
    assert f"dlfast.layer_norm_bwd{suffix}.default" in graphs[1]


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.ones(2, 4, dtype=torch.int64), (4,)), TypeError, "float32"),
        ((torch.ones(2, 4), (5,)), ValueError, "trailing dims"),
        ((torch.ones(2, 4), (2, 4, 1)), ValueError, "trailing dims"),
        ((torch.ones(2, 4), (4,), torch.ones(3)), ValueError, "weight must have shape"),
        ((torch.ones(2, 4), (4,), None, torch.ones(2, 2)), ValueError, "bias must have shape"),
        ((torch.ones(2, 4), (4,), torch.ones(4, device="meta")), ValueError, "weight is on meta"),
        ((torch.ones(2, 4), (4,), torch.ones(4, dtype=torch.int32)), TypeError, "weight must be a floating"),
        (([1.0, 2.0], (2,)), TypeError, "x must be a Tensor"),
        ((torch.ones(2, 4), (-4,)), ValueError, "non-negative"),
        ((torch.ones(2, 4), (4.0,)), TypeError, "normalized_shape must be a sequence of ints"),
        ((torch.ones(2, 4), 4.0), TypeError, "normalized_shape must be a sequence of ints"),
        ((torch.ones(2, 4), (4,), [1.0] * 4), TypeError, "weight must be a Tensor or None"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        dlfast.layer_norm(*args)


def test_integer_like_normalized_shape_like_torch():
    x = torch.randn(3, 2, 5)
    for shape in ((np.int64(5),), [np.int32(2), 5], torch.Size([5])):
        torch.testing.assert_close(dlfast.layer_norm(x, shape), F.layer_norm(x, shape))


def test_layer_norm_matches_torch_nn_functional_signature():
    x = torch.randn(3, 8)
    torch.testing.assert_close(dlfast.layer_norm(x, [8]), F.layer_norm(x, [8]))
    torch.testing.assert_close(dlfast.layer_norm(x, torch.Size([8])), F.layer_norm(x, [8]))


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("stores", ["cached", "streamed"])
@pytest.mark.parametrize("isa", CPU_ISA_LEVELS)
def test_every_cpu_isa_variant(isa, stores):
    """Each CPU kernel build (chosen at run time, forced here by ATEN_CPU_CAPABILITY) is correct,
    with y and dx written by plain stores and by the non-temporal ones large outputs get (forced
    here for every size; rows that are not vector-aligned, such as 1023 floats, keep plain ones)."""
    run_on_cpu_isa(
        isa,
        "import torch\n"
        "from test_layer_norm import make_inputs, check_against_reference\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):\n"
        "    for shape in ((5, 1023), (3, 7), (2, 4096)):\n"
        "        x, w, b = make_inputs(shape, shape[1:], dtype, 'cpu')\n"
        "        check_against_reference('cpu', x, shape[1:], w, b)\n",
        DLFAST_LN_STREAM_MIN="0" if stores == "streamed" else str(2**62),
    )


def test_weight_gradients_are_deterministic(backend_device):
    """dweight/dbias are reduced in a fixed order (no float atomics): bitwise repeatable."""
    backend, device = backend_device
    x, w, b = make_inputs((64, 300), (300,), torch.float32, device)
    grads = []
    for _ in range(2):
        w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        dlfast.layer_norm(x, 300, w_, b_, backend=backend).square().sum().backward()
        grads.append((w_.grad, b_.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_cuda_graph_capture_and_side_stream(gpu_kernel_backend):
    """Kernels launch on the current stream, so a captured graph replays them correctly."""
    backend = gpu_kernel_backend
    x, w, b = make_inputs((128, 512), (512,), torch.float16, "cuda")
    expected = reference.layer_norm(x, (512,), w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = dlfast.layer_norm(x, 512, w, b, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(on_side, expected, **tol(torch.float16))

    static_x = x.clone()
    dlfast.layer_norm(static_x, 512, w, b, backend=backend)  # warm-up (compiles Triton) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = dlfast.layer_norm(static_x, 512, w, b, backend=backend)
    new_x, _, _ = make_inputs((128, 512), (512,), torch.float16, "cuda", seed=3)
    static_x.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_y, reference.layer_norm(new_x, (512,), w, b), **tol(torch.float16))


def test_large_offsets_and_outliers(backend_device):
    """Rows whose mean dwarfs their spread, and rows whose first element is an outlier: the
    cases where a one-pass variance formula loses digits. Here float32 itself cannot hold the
    centred values exactly, so the bar is PyTorch's own float32 error (at most 2x it)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1000, generator=g, dtype=torch.float64)
    x[:2] = x[:2] * 1e-1 + 1e3  # mean 1e3, spread 1e-1
    x[2, 0] = 1e4  # first element far out
    x[3, 0] = -3e3
    x[4, 500] = 5e3  # an outlier elsewhere in the row
    x32 = x.float().to(device)
    dy = torch.randn(x.shape, generator=g).to(device)
    exact_in = x32.double().requires_grad_(True)
    exact = reference.layer_norm(exact_in, (1000,))
    exact.backward(dy.double())
    errors = {}
    for name, fn in (
        ("dlfast", lambda t: dlfast.layer_norm(t, 1000, backend=backend)),
        ("torch", lambda t: F.layer_norm(t, (1000,))),
    ):
        xin = x32.clone().requires_grad_(True)
        y = fn(xin)
        y.backward(dy)
        errors[name] = (
            (y.double() - exact).abs().max().item(),
            (xin.grad.double() - exact_in.grad).abs().max().item(),
        )
    for ours, theirs in zip(errors["dlfast"], errors["torch"], strict=True):
        assert ours <= 2 * theirs + 1e-5, errors


def test_cuda_autocast_runs_in_float32_like_torch(gpu_kernel_backend):
    """Under CUDA autocast layer_norm returns float32, as PyTorch's does, computed in float32 from
    the bfloat16 activations (checked against float64: PyTorch's own result is not the bar, see
    the message)."""
    backend = gpu_kernel_backend
    x, w, b = make_inputs((16, 256), (256,), torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = x.to(torch.bfloat16)
        ours = dlfast.layer_norm(h, 256, w, b, backend=backend)
        theirs = F.layer_norm(h, (256,), w, b)
    assert ours.dtype == theirs.dtype == torch.float32
    exact = F.layer_norm(h.double(), (256,), w.double(), b.double()).float()
    torch_error = (theirs - exact).abs().max().item()
    torch.testing.assert_close(
        ours, exact, **tol(torch.float32), msg=lambda m: f"{m}\n(PyTorch's max error: {torch_error:.2e})"
    )


def test_cpu_autocast_keeps_the_input_dtype_like_torch(backend_device):
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("CPU autocast")
    x, w, b = make_inputs((16, 256), (256,), torch.float16, device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dlfast.layer_norm(x, 256, w, b, backend=backend).dtype == F.layer_norm(x, (256,), w, b).dtype


def test_torch_compile_dynamic_shapes():
    """normalized_shape taken from a dynamic x.shape arrives as SymInts."""
    if skip_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ extension did not load")
    torch._dynamo.reset()

    def f(x):
        return dlfast.layer_norm(x, x.shape[-1:], backend="cpu")

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for rows, cols in ((3, 40), (5, 72)):
        x = torch.randn(rows, cols)
        torch.testing.assert_close(compiled(x), F.layer_norm(x, (cols,)), **tol(torch.float32))
