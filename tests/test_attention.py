"""dlfast.attention: every backend against the reference, masks, dropout, GQA, errors, compile.

The accuracy bar is FlashAttention's: against the float64 reference computed from the same
rounded inputs, a backend's error may be at most twice that of PyTorch's own computation in the
input dtype (softmax(q k^T) v with no upcast), plus a small floor for results whose PyTorch
error happens to be near zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU_ISA_LEVELS,
    TOLERANCES,
    dtypes_for,
    run_on_cpu_isa,
    second_order_grads,
    skip_reason,
    tol,
)

import dlfast
from dlfast import reference
from dlfast.ops.attention import _draw_seed

# (B, H, Hkv, Lq, Lk, D, causal, mask); each row exercises what its comment says.
CASES = [
    (2, 4, 4, 17, 17, 64, False, None),  # plain, a partial block
    (2, 4, 2, 97, 97, 59, True, None),  # GQA, odd head dim, causal
    (1, 2, 1, 17, 97, 111, "bottom_right", "pad"),  # cross attention, MQA, decode alignment
    (2, 2, 2, 97, 17, 32, True, "pad"),  # Lq > Lk top-left: every row sees key 0
    (2, 2, 2, 97, 17, 16, "bottom_right", None),  # Lq > Lk bottom-right: the first 80 rows see nothing
    (2, 2, 2, 128, 128, 128, True, "pad_all"),  # batch 1 all padding: zeros, no NaN
    (1, 2, 2, 1, 128, 256, False, None),  # one query against a cache, widest head
    (1, 1, 1, 1025, 1025, 64, True, None),  # long, one element past a block multiple
    (1, 2, 2, 128, 1025, 32, "bottom_right", "pad"),  # a chunk of queries against a long cache
    (1, 1, 1, 1, 1, 16, False, None),  # the smallest
]


def case_id(case) -> str:
    B, H, Hkv, Lq, Lk, D, causal, mask = case
    return f"B{B}H{H}kv{Hkv}-{Lq}x{Lk}-D{D}-{causal}-{mask}"


def make_inputs(case, dtype, device, seed=0):
    B, H, Hkv, Lq, Lk, D, causal, mask_kind = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype)
    dout = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(B, Lk, generator=g) > 0.3
        mask[:, 0] = True  # keep rows alive unless the case says otherwise
        if mask_kind == "pad_all":
            mask[-1] = False
        mask = mask.to(device)
    return q, k, v, dout, {"causal": causal, "key_padding_mask": mask}


def same_dtype_torch(q, k, v, causal=False, key_padding_mask=None, dropout_mask=None, dropout_p=0.0):
    """PyTorch's own attention in the input dtype, no upcast: the error dlfast is held to."""
    Lq, Lk, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        shift = Lk - Lq if causal == "bottom_right" else 0
        allowed = torch.ones_like(allowed).tril(shift)
    allowed = allowed.expand(q.shape[0], 1, Lq, Lk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed & allowed.any(-1, keepdim=True), float("-inf"))
    probs = torch.softmax(scores, -1) * allowed
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1 - dropout_p)
    return probs @ v


def run(fn, q, k, v, dout):
    """fn's output and its gradients for q, k, v against dout."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def assert_within_twice_torch_error(backend, q, k, v, dout, **kwargs):
    """The FlashAttention bar, for the output and the three gradients."""
    seed = 1234
    dropout_p = kwargs.get("dropout_p", 0.0)

    def dlfast_fn(q_, k_, v_, backend_=backend):
        return dlfast.attention(
            q_, k_, v_, generator=torch.Generator(q_.device).manual_seed(seed), backend=backend_, **kwargs
        )

    exact = run(
        lambda *t: dlfast_fn(*t, backend_="reference"), q.double(), k.double(), v.double(), dout.double()
    )
    ours = run(dlfast_fn, q, k, v, dout)
    dropout_mask = None
    if dropout_p > 0:
        drawn = _draw_seed(q.device, torch.Generator(q.device).manual_seed(seed)).item()
        dropout_mask = reference.dropout_keep_mask(
            drawn, *q.shape[:3], k.shape[2], dropout_p, device=q.device
        )
    options = {key: kwargs[key] for key in ("causal", "key_padding_mask", "dropout_p") if key in kwargs}
    theirs = run(lambda *t: same_dtype_torch(*t, dropout_mask=dropout_mask, **options), q, k, v, dout)
    floor = TOLERANCES[q.dtype][0] / 10
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact, strict=True):
        assert o.shape == e.shape and o.dtype == q.dtype, (name, o.shape, o.dtype)
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        our_err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        assert our_err <= 2 * torch_err + floor, f"{name}: error {our_err:.3g} vs PyTorch's {torch_err:.3g}"


BACKENDS = ["cpu", "triton", "reference", "torch"]


def backend_params():
    """Kernel backends on each device they run on, plus the "torch" delegation (its masks are
    translated to SDPA's, which deserves the same sweep)."""
    params = []
    for backend in BACKENDS:
        for device in ("cpu", "cuda"):
            if (backend, device) == ("cpu", "cuda"):
                continue
            marks = [pytest.mark.triton] if backend == "triton" else []
            reason = skip_reason(backend, device)
            if reason is not None:
                marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    cuda_reason = skip_reason("cuda", "cuda")
    cuda_marks = [pytest.mark.skip(reason=cuda_reason)] if cuda_reason else []
    params.append(pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=cuda_marks))
    return params


@pytest.fixture(params=backend_params())
def attention_backend(request):
    return request.param


def base_dtype(backend):
    """The dtype of the tests that are not about dtypes: float32, which the cuda backend lacks."""
    return torch.float16 if backend == "cuda" else torch.float32


def attention_dtypes(backend, device):
    if backend == "cuda":
        return [torch.float16, torch.bfloat16]
    if backend == "torch":
        # PyTorch's own kernels, swept for dlfast's mask translation; their bf16 error is not
        # ours to bound (SDPA's CPU bf16 backward exceeds 2x the naive bf16 error at L = 1025).
        return [torch.float32]
    if backend in ("cpu", "reference") and device == "cpu":
        return [torch.float32, torch.bfloat16]
    return dtypes_for(backend, device)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(attention_backend, case):
    backend, device = attention_backend
    for dtype in attention_dtypes(backend, device):
        q, k, v, dout, kwargs = make_inputs(case, dtype, device)
        assert_within_twice_torch_error(backend, q, k, v, dout, **kwargs)


def test_fully_masked_rows_give_zeros(attention_backend):
    backend, device = attention_backend
    q, k, v, dout, kwargs = make_inputs(
        (2, 2, 2, 9, 5, 16, "bottom_right", "pad_all"), base_dtype(backend), device
    )
    out, dq, dk, dv = run(lambda *t: dlfast.attention(*t, backend=backend, **kwargs), q, k, v, dout)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # batch 1: every key is padding
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))  # rows 0-3 precede every key
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dk[1], torch.zeros_like(dk[1]))


def test_non_contiguous_inputs(attention_backend):
    """(B, L, H, D) projections viewed as (B, H, L, D), as every transformer block makes them."""
    backend, device = attention_backend
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 33, 3, 4, 32, generator=g).to(device, base_dtype(backend))
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    dout = torch.randn(2, 4, 33, 32, generator=g).to(device, base_dtype(backend))
    assert_within_twice_torch_error(backend, q, k, v, dout, causal=True)


def test_dropout_output_and_gradients_match_the_drawn_mask(attention_backend):
    """Forward and backward agree with the reference run on the mask the kernel drew."""
    backend, device = attention_backend
    if backend == "torch":
        pytest.skip("SDPA draws its own dropout mask (not the Philox rule)")
    q, k, v, dout, kwargs = make_inputs((2, 4, 2, 33, 47, 32, True, "pad"), base_dtype(backend), device)
    assert_within_twice_torch_error(backend, q, k, v, dout, dropout_p=0.3, **kwargs)


def test_dropout_keep_rate_and_bits(attention_backend):
    """With q = 0 every allowed probability is 1/Lk and v = I reads the kept ones back:
    out[b, h, i, j] * Lk * (1 - p) is the kernel's keep mask, bit for bit the reference's."""
    backend, device = attention_backend
    if backend == "torch":
        pytest.skip("SDPA draws its own dropout mask (not the Philox rule)")
    B, H, Lq, Lk, p = 2, 3, 64, 64, 0.25
    dtype = base_dtype(backend)
    q = torch.zeros(B, H, Lq, Lk, device=device, dtype=dtype)
    k = torch.randn(B, H, Lk, Lk, device=device, dtype=dtype)
    v = torch.eye(Lk, device=device, dtype=dtype).expand(B, H, Lk, Lk)
    gen = torch.Generator(device).manual_seed(7)
    out = dlfast.attention(q, k, v, dropout_p=p, generator=gen, backend=backend)
    kept = out.float() * Lk * (1 - p)
    torch.testing.assert_close(kept, kept.round(), atol=1e-2, rtol=0)
    seed = _draw_seed(torch.device(device), torch.Generator(device).manual_seed(7)).item()
    assert torch.equal(kept.round().bool(), reference.dropout_keep_mask(seed, B, H, Lq, Lk, p, device=device))
    n = kept.numel()
    rate = kept.round().mean().item()
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5), rate


def test_reference_keep_rate_over_a_million_draws():
    p = 0.1
    mask = reference.dropout_keep_mask(99, 4, 4, 256, 256, p)
    n = mask.numel()
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


def test_generator_makes_dropout_reproducible(attention_backend):
    backend, device = attention_backend
    q, k, v, _dout, _ = make_inputs((1, 2, 2, 16, 16, 16, False, None), base_dtype(backend), device)

    def draw(seed):
        return dlfast.attention(
            q, k, v, dropout_p=0.5, generator=torch.Generator(device).manual_seed(seed), backend=backend
        )

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_backward_is_deterministic(attention_backend):
    backend, device = attention_backend
    q, k, v, dout, kwargs = make_inputs((2, 4, 2, 97, 97, 64, True, "pad"), base_dtype(backend), device)
    first, second = (
        run(lambda *t: dlfast.attention(*t, deterministic=True, backend=backend, **kwargs), q, k, v, dout)
        for _ in range(2)
    )
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_causal_attention_is_the_short_form():
    q, k, v, _dout, _ = make_inputs((1, 2, 2, 17, 17, 16, False, None), torch.float32, "cpu")
    torch.testing.assert_close(
        dlfast.causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_empty_inputs():
    for shape_q, shape_kv in (
        ((0, 2, 5, 8), (0, 2, 5, 8)),
        ((1, 2, 0, 8), (1, 2, 5, 8)),
        ((1, 2, 3, 8), (1, 2, 0, 8)),
        ((1, 2, 3, 0), (1, 2, 4, 0)),  # no features: the default scale 1/sqrt(0) must not raise
    ):
        q = torch.randn(shape_q, requires_grad=True)
        k, v = torch.randn(shape_kv), torch.randn(shape_kv)
        out = dlfast.attention(q, k, v, backend="cpu" if skip_reason("cpu", "cpu") is None else None)
        assert out.shape == shape_q and not out.isnan().any()
        out.sum().backward()


def _ops(backend):
    from dlfast.ops.attention import _KERNELS

    return _KERNELS[backend]


def test_opcheck(attention_backend):
    backend, device = attention_backend
    if backend in ("reference", "torch"):
        pytest.skip("plain PyTorch, not a custom op")
    fwd, bwd = _ops(backend)
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v, dout, kwargs = make_inputs((1, 2, 1, 9, 13, 16, True, "pad"), dtype, device)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    seed = torch.tensor(5, device=device)
    args = (q, k, v, kwargs["key_padding_mask"], True, 4, 0.25, 0.2, seed)
    torch.library.opcheck(fwd, args)
    out, lse = fwd(*args)
    # The backward op has no derivative of its own (double backward recomputes through PyTorch
    # ops: registry.grads_through), so no grad inputs.
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))
    torch.library.opcheck(bwd, (dout, q, k, v, out, lse, *args[3:], True))


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
def test_gradcheck_float64_cpu():
    q, k, v, _dout, kwargs = make_inputs((1, 2, 1, 5, 7, 8, "bottom_right", "pad"), torch.float64, "cpu")
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: dlfast.attention(*t, backend="cpu", **kwargs), inputs)


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
def test_gradgradcheck_float64_cpu():
    """Double backward (create_graph=True) of the C++ op: GQA, decode alignment with rows that
    see no key, padding."""
    q, k, v, _dout, kwargs = make_inputs((1, 2, 1, 6, 4, 8, "bottom_right", "pad"), torch.float64, "cpu")
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradgradcheck(lambda *t: dlfast.attention(*t, backend="cpu", **kwargs), inputs)


@pytest.mark.parametrize(
    "case",
    [
        (2, 2, 1, 9, 5, 16, "bottom_right", "pad_all"),  # GQA, rows that see no key, a batch all padding
        (1, 2, 2, 7, 11, 8, True, "pad"),  # cross attention, top-left causal
        (1, 1, 1, 5, 5, 8, False, None),  # no mask at all
    ],
    ids=case_id,
)
def test_second_order_gradients_match_torch(attention_backend, case):
    """Under create_graph=True (gradient penalties, Hessian-vector products) the first-order
    gradients are themselves differentiable and their gradients are PyTorch's; no NaN from the
    rows that attend nothing."""
    backend, device = attention_backend
    if backend == "torch":
        pytest.skip("SDPA's own double backward is PyTorch's")
    dtype = base_dtype(backend)
    q, k, v, _dout, kwargs = make_inputs(case, dtype, device)
    got = second_order_grads(lambda *t: dlfast.attention(*t, backend=backend, **kwargs), q, k, v)
    want = second_order_grads(lambda *t: same_dtype_torch(*t, **kwargs), *(t.double() for t in (q, k, v)))
    for g, r in zip(got, want, strict=True):
        # Relative to the largest entry: the fp16 gradients are rounded once, then squared and summed.
        atol = (1e-5 if dtype == torch.float32 else 1e-2) * r.abs().max().item()
        torch.testing.assert_close(g, r.to(dtype), atol=atol, rtol=1e-3 if dtype == torch.float32 else 2e-2)


def test_second_order_gradients_with_dropout(attention_backend):
    """With dropout the Triton backend's double backward redraws the kernels' mask through the
    reference; the C++ backends cannot redraw it and refuse with a clear error."""
    backend, device = attention_backend
    if backend in ("torch", "reference"):
        pytest.skip("not a dlfast kernel")
    q, k, v, _dout, kwargs = make_inputs((1, 2, 2, 9, 9, 16, True, None), base_dtype(backend), device)

    def f(backend):
        gen = torch.Generator(device).manual_seed(7)
        return lambda *t: dlfast.attention(*t, dropout_p=0.3, generator=gen, backend=backend, **kwargs)

    if backend in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match="dropout_p > 0 is not supported"):
            second_order_grads(f(backend), q, k, v)
        return
    got = second_order_grads(f(backend), q, k, v)
    want = second_order_grads(f("reference"), q, k, v)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4 * r.abs().max().item(), rtol=1e-4)


def test_torch_compile_fullgraph(attention_backend):
    backend, device = attention_backend
    if backend == "triton" and device == "cpu":
        pytest.skip("inductor compiles for the CPU, where triton kernels only run interpreted")
    torch._dynamo.reset()
    q, k, v, dout, kwargs = make_inputs(
        (2, 2, 1, 17, 23, 16, "bottom_right", "pad"), base_dtype(backend), device
    )

    def f(q, k, v):
        return dlfast.attention(q, k, v, backend=backend, **kwargs)

    eager = run(f, q, k, v, dout)
    compiled = run(torch.compile(f, fullgraph=True), q, k, v, dout)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, **tol(a.dtype))


def _bad(**overrides):
    args = {
        "q": torch.randn(2, 4, 5, 8),
        "k": torch.randn(2, 2, 6, 8),
        "v": torch.randn(2, 2, 6, 8),
    }
    kwargs = {key: overrides.pop(key) for key in list(overrides) if key not in args}
    args.update(overrides)
    return (args["q"], args["k"], args["v"]), kwargs


@pytest.mark.parametrize(
    "call,error,match",
    [
        (_bad(q=torch.randn(4, 5, 8)), ValueError, "q must be 4-D"),
        (_bad(k=torch.randn(2, 2, 6, 4)), ValueError, "k and v must have the same shape"),
        (_bad(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), ValueError, "head dim"),
        (_bad(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "must divide"),
        (_bad(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), ValueError, "batch size"),
        (_bad(v=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "v is torch.float64"),
        (_bad(q=torch.ones(2, 4, 5, 8, dtype=torch.int32)), TypeError, "q must be float32"),
        (_bad(q=torch.randn(2, 4, 5, 8, device="meta")), ValueError, "k is on cpu"),
        (
            _bad(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask must have shape",
        ),
        (_bad(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask must be a bool"),
        (_bad(dropout_p=1.0), ValueError, "dropout_p"),
        (_bad(dropout_p=-0.1), ValueError, "dropout_p"),
        (_bad(causal="diagonal"), ValueError, "causal must be"),
        (_bad(scale="big"), TypeError, "scale"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    args, kwargs = call
    with pytest.raises(error, match=match):
        dlfast.attention(*args, **kwargs)


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("isa", CPU_ISA_LEVELS)
def test_every_cpu_isa_variant(isa):
    """Each CPU kernel build (chosen at run time, forced here by ATEN_CPU_CAPABILITY) is correct."""
    run_on_cpu_isa(
        isa,
        "import torch\n"
        "from test_attention import CASES, make_inputs, assert_within_twice_torch_error\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for case in CASES[:6]:\n"
        "        q, k, v, dout, kwargs = make_inputs(case, dtype, 'cpu')\n"
        "        assert_within_twice_torch_error('cpu', q, k, v, dout, dropout_p=0.2, **kwargs)\n",
    )


def test_autocast_runs_in_the_autocast_dtype_like_sdpa(attention_backend):
    backend, device = attention_backend
    dtype = torch.float16 if device == "cuda" or backend == "triton" else torch.bfloat16
    q, k, v, _dout, kwargs = make_inputs((1, 2, 2, 9, 9, 16, True, None), torch.float32, device)
    with torch.autocast(device, dtype=dtype):
        ours = dlfast.attention(q, k, v, backend=backend, **kwargs)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, **tol(dtype))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_with_a_fresh_dropout_seed(backend):
    """Kernels launch on the current stream and read the seed from device memory, so a captured
    graph replays correctly, and its dropout mask follows the seed tensor it was captured with."""
    reason = skip_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)
    q, k, v, _dout, _ = make_inputs((2, 4, 2, 130, 130, 64, True, None), torch.float16, "cuda")
    seed = torch.tensor(11, device="cuda")
    fwd, _bwd = _ops(backend)

    def call():
        return fwd(q, k, v, None, True, 0, 0.125, 0.2, seed)[0]

    call()  # compiles Triton outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call()
    for new_seed in (11, 12):
        seed.fill_(new_seed)
        graph.replay()
        want = reference.attention(q, k, v, causal=True, scale=0.125, dropout_p=0.2, seed=new_seed)
        torch.testing.assert_close(static_out, want, **tol(torch.float16))
