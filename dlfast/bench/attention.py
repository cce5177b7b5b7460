"""Attention benchmark cases: dlfast.attention against every SDPA backend, FlexAttention and the
naive composite softmax(q k^T) v.

On the GPU the sweep is FlashAttention's benchmark family: 16k tokens per batch, hidden 2048,
head dims 64 and 128, sequence 512 to 16k, causal and not, in bf16. FLOPs are counted as
FlashAttention counts them: 4 * B * S^2 * H * D for the forward, halved when causal; the
backward is 2.5x the forward, so fwd+bwd is 3.5x.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import dlfast
from dlfast.bench.runner import Case, Impl, Timed, Work, dlfast_impls

PASSES = ("fwd", "fwd+bwd")
GPU_TOKENS, GPU_HIDDEN = 16384, 2048

# Relative error (2-norm) against SDPA in fp32 from the same rounded inputs before a result counts
# as wrong: a guard against timing a broken kernel, not the proof of correctness (tests/ is).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def cases(device: torch.device, quick: bool) -> list[Case]:
    """GPU: the FlashAttention family in bf16. CPU: batch 4 x 8 heads x 64, L 512 to 2048, and two
    course-model sizes, fp32 and bf16. --quick: one or two sizes."""
    out = []
    if device.type == "cuda":
        seqs = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        head_dims = (128,) if quick else (64, 128)
        for D in head_dims:
            for causal in (0, 1):
                for L in seqs:
                    shape = {"B": GPU_TOKENS // L, "H": GPU_HIDDEN // D, "L": L, "D": D, "causal": causal}
                    out.append(Case(dtype=torch.bfloat16, shape=shape))
        return out
    # 32 x 4 heads x 32 x 16: a course Transformer's size, where per-call overhead decides the
    # default; 8 x 4 x 128 x 32: the course GPT's (and `bench --model gpt`'s) self-attention.
    shapes = (
        [(4, 8, 256, 64)]
        if quick
        else [(32, 4, 32, 16), (8, 4, 128, 32)] + [(4, 8, L, 64) for L in (512, 1024, 2048)]
    )
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (0, 1):
            for B, H, L, D in shapes:
                out.append(Case(dtype=dtype, shape={"B": B, "H": H, "L": L, "D": D, "causal": causal}))
    return out


def work(case: Case, pass_: str) -> Work:
    s = case.shape
    fwd = 4 * s["B"] * s["L"] ** 2 * s["H"] * s["D"] // (2 if s["causal"] else 1)
    return Work(flops=fwd if pass_ == "fwd" else int(3.5 * fwd))


def _sdpa(backend: SDPBackend | None) -> Callable:
    def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attention


def _naive(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        L = q.shape[2]
        scores = scores.masked_fill(
            torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf")
        )
    return torch.softmax(scores, dim=-1) @ v


def _flex() -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        if not causal:
            return compiled(q, k, v)
        L = q.shape[2]
        return compiled(q, k, v, block_mask=_block_mask(create_block_mask, causal_mod, L, q.device))

    return attention


@functools.cache
def _block_mask(create_block_mask, mask_mod, L: int, device: torch.device):
    return create_block_mask(mask_mod, None, None, L, L, device=device)


def _dlfast(backend: str) -> Callable:
    def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        return dlfast.attention(q, k, v, causal=causal, backend=backend)

    return attention


def implementations(device: torch.device, note: Callable[[str], None]) -> list[Impl]:
    """dlfast's kernel backends that run on `device`, then the peers: SDPA as dispatched ("torch"),
    each SDPA backend forced (CUDA), FlexAttention (CUDA) and the naive composite (CPU)."""
    impls = dlfast_impls(device, note, _dlfast)
    impls.append(Impl("torch", "peer", lambda: _sdpa(None)))
    if device.type == "cuda":
        for name, sdpa_backend in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            impls.append(Impl(name, "peer", functools.partial(_sdpa, sdpa_backend)))
        impls.append(Impl("flex_attention", "peer", _flex))
    else:
        # The composite materialises B x H x L x L scores: on the GPU's 16k sequences that is
        # tens of GB, so it is a CPU-only peer (the CPU target is set against it).
        impls.append(Impl("naive", "peer", lambda: _naive))
    return impls


def _relative_error(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def prepare(case: Case, impls: list[Impl], device: torch.device) -> dict[str, dict[str, Timed] | Exception]:
    """The timed callables of each implementation at `case`, or the exception that stopped it.

    Each implementation runs forward and backward once first (compiling what needs compiling)
    and its output and gradients are checked against SDPA in fp32 on the same rounded inputs.
    """
    s = case.shape
    causal = bool(s["causal"])
    gen = torch.Generator(device=device).manual_seed(0)
    q0, k0, v0, dout = (
        torch.randn(s["B"], s["H"], s["L"], s["D"], device=device, generator=gen).to(case.dtype)
        for _ in range(4)
    )

    @functools.cache
    def expected() -> dict[str, Tensor]:
        q, k, v = (t.detach().float().requires_grad_() for t in (q0, k0, v0))
        # fp32 on the GPU: the memory-efficient kernel (the math one would store L x L scores).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(dout.float())
        return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    prepared: dict[str, dict[str, Timed] | Exception] = {}
    for impl in impls:
        try:
            fn = impl.make()
            q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
            out = fn(q, k, v, causal)
            out.backward(dout)
            got = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
            for key, want in expected().items():
                err = _relative_error(got[key], want)
                if not err <= TOLERANCE[case.dtype]:  # `not <=` also catches NaN
                    raise ValueError(f"{key} differs from fp32 SDPA by relative error {err:.1e}")
            prepared[impl.name] = {
                # Inputs that do not require grad: the inference forward, which saves nothing.
                "fwd": Timed(lambda fn=fn: fn(q0, k0, v0, causal)),
                "fwd+bwd": Timed(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v, causal).backward(dout), [q, k, v]),
            }
        except Exception as exc:  # reported by the runner; the other implementations go on
            prepared[impl.name] = exc
    if device.type == "cuda":
        torch.cuda.synchronize()
    return prepared
