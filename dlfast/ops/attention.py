"""dlfast.attention: torch.nn.functional.scaled_dot_product_attention on fused kernels.

Every kernel backend takes contiguous (B, H, Lq, D) queries and (B, Hkv, Lk, D) keys and values
through a pair of ops with one schema (csrc/dlfast.cpp):

  attention_fwd(q, k, v, key_padding_mask?, causal, causal_shift, scale, dropout_p, seed?)
      -> (out, lse)
  attention_bwd(dout, q, k, v, out, lse, key_padding_mask?, causal, causal_shift, scale,
                dropout_p, seed?, deterministic) -> (dq, dk, dv)

The cpu and cuda backends are torch.ops.dlfast.attention_fwd/_bwd (C++); the triton backend is
torch.ops.dlfast.attention_fwd_triton/_bwd_triton, defined here. Each pair gets the same fake
implementation and autograd rule, so torch.compile traces any backend without a graph break.
Dropout is drawn inside the kernels by Philox from a seed tensor (dlfast.reference
.dropout_keep_mask is the rule), so the backward redraws the forward's mask instead of storing it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from dlfast import backends, reference
from dlfast.ops.registry import autocast_inputs, grads_through, register_kernels

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CAUSAL_MODES = (False, True, "top_left", "bottom_right")
# Head dims the GPU kernels tile; the cuda backend's mma tiles also need a multiple of 8, so
# other head dims are zero-padded on the way in (zero columns change neither q.k nor the output).
_GPU_MAX_HEAD_DIM = 256
_CUDA_HEAD_DIM_MULTIPLE = 8
_CUDA_MIN_HEAD_DIM = 16


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_fake(
    q, k, v, key_padding_mask, causal: bool, causal_shift: int, scale: float, dropout_p: float, seed
):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _bwd_fake(
    dout, q, k, v, out, lse, key_padding_mask, causal, causal_shift, scale, dropout_p, seed, deterministic
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("dlfast::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    causal_shift: int,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    from dlfast.triton_kernels.attention import attention_fwd

    return attention_fwd(q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed)


@torch.library.custom_op("dlfast::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    causal_shift: int,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from dlfast.triton_kernels.attention import attention_bwd

    return attention_bwd(
        dout, q, k, v, out, lse, key_padding_mask, causal, causal_shift, scale, dropout_p, seed, deterministic
    )


def _setup_context(ctx, inputs, output):
    q, k, v, mask, ctx.causal, ctx.causal_shift, ctx.scale, ctx.dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)


def _backward(bwd, ctx, dout, _dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: see grads_through
        # The reference redraws the kernels' dropout mask from the same seed.
        out = reference.attention(
            q,
            k,
            v,
            mask,
            ctx.causal,
            ctx.causal_shift,
            ctx.scale,
            ctx.dropout_p,
            None if seed is None else int(seed),
        )
        return (*grads_through(out, dout, (q, k, v), ctx.needs_input_grad[:3]), *[None] * 6)
    # Every dlfast backward reduces in a fixed order (no atomics), so its gradients are bitwise
    # repeatable whatever this flag says; it is passed for kernels that may add a faster,
    # atomic path.
    deterministic = torch.are_deterministic_algorithms_enabled()
    options = (ctx.causal, ctx.causal_shift, ctx.scale, ctx.dropout_p, seed, deterministic)
    dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, mask, *options)
    return dq, dk, dv, None, None, None, None, None, None


_KERNELS = register_kernels(
    "attention", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward
)


def _check(q, k, v, causal, key_padding_mask, dropout_p, scale) -> None:
    # Runs on every call: each tensor property is read once (see backends.choose on why it matters).
    device = None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, heads, L, D), got shape {list(t.shape)}")
        dtype = t.dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be float32, float64, float16 or bfloat16, got {dtype}")
        if device is None:
            device, q_dtype = t.device, dtype
            continue
        if t.device != device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {device}")
        if dtype != q_dtype:
            raise TypeError(f"attention: {name} is {dtype} but q is {q_dtype}; q, k and v must share a dtype")
    B, H, _Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"attention: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}"
        )
    if k.shape[0] != B:
        raise ValueError(f"attention: k has batch size {k.shape[0]} but q has {B}")
    if k.shape[3] != D:
        raise ValueError(f"attention: k and v have head dim {k.shape[3]} but q has {D}; they must match")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"attention: k and v have {Hkv} heads, which must divide q's {H} heads")
    if causal not in _CAUSAL_MODES or not isinstance(causal, (bool, str)):
        raise ValueError(
            f"attention: causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = (
                key_padding_mask.dtype
                if isinstance(key_padding_mask, Tensor)
                else type(key_padding_mask).__name__
            )
            raise TypeError(f"attention: key_padding_mask must be a bool tensor (True = attend), got {got}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"attention: key_padding_mask must have shape (B, Lk) = {[B, Lk]}, "
                f"got {list(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != device:
            raise ValueError(
                f"attention: key_padding_mask is on {key_padding_mask.device} but q is on {device}"
            )
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool | str = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention, as F.scaled_dot_product_attention, never storing L x L scores.

    Args:
        q: (B, H, Lq, D) queries.
        k, v: (B, Hkv, Lk, D) keys and values; Hkv divides H, and query head h reads key/value
            head h // (H // Hkv) (grouped-query attention, SDPA's enable_gqa=True).
            q, k and v share one dtype: float16/bfloat16 (float32 accumulation), float32, or
            float64 (CPU backends only). Any strides. Head dims up to 256 on the GPU kernels.
        causal: False; True or "top_left": query i attends keys j <= i, the diagonal aligned
            top-left exactly as SDPA's is_causal (so with Lq > Lk the last rows see every key,
            and with Lq < Lk the last keys are never seen); "bottom_right": j <= i + Lk - Lq,
            the alignment of decoding Lq new tokens against a cache of Lk keys (rows that then
            see no key, when Lq > Lk, give zeros).
        key_padding_mask: (B, Lk) bool, True = attend (the opposite of nn.MultiheadAttention's
            key_padding_mask). A query row that may attend no key gives zeros, never NaN.
        dropout_p: probability of dropping each attention probability (survivors scaled by
            1 / (1 - dropout_p)), drawn inside the kernel by Philox; pass 0 in evaluation.
        scale: multiplies q.k; default 1 / sqrt(D).
        generator: draws the dropout seed (on q's device), making dropout reproducible.
        deterministic: ask for bitwise-repeatable gradients. Every dlfast backend's backward
            already is (it reduces in a fixed order, without atomics); on the "torch" backend
            this selects SDPA's math kernel, which is too.
        backend: force one of dlfast.available_backends(); default from dlfast.backends.DEFAULTS.

    Returns:
        (B, H, Lq, D) in q's dtype. Gradients flow to q, k and v.
    """
    if isinstance(q, Tensor):
        # SDPA runs in the autocast dtype (it is on autocast's lower-precision list); so do we.
        # Before the checks, so that they see the dtypes the kernels will.
        q, k, v = autocast_inputs(q, q, k, v)
    _check(q, k, v, causal, key_padding_mask, dropout_p, scale)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    # With no features (D = 0) the output is empty whatever the scale: 1 stands in for 1/sqrt(0).
    scale = float((D**-0.5 if D > 0 else 1.0) if scale is None else scale)
    causal_shift = Lk - Lq if causal == "bottom_right" else 0
    dropout_p = float(dropout_p)
    name = backends.choose("attention", q, backend)
    if name == "torch":
        return _sdpa(
            q, k, v, bool(causal), causal_shift, key_padding_mask, dropout_p, scale, generator, deterministic
        )
    if name == "reference" or q.numel() == 0 or k.numel() == 0:
        # Empty inputs (no query, key or feature) take the reference, which handles them exactly.
        seed = _draw_seed(q.device, generator).item() if dropout_p > 0 else None
        return reference.attention(
            q, k, v, key_padding_mask, bool(causal), causal_shift, scale, dropout_p, seed
        )
    q, k, v, D_padded = _kernel_layout(name, q, k, v)
    seed = _draw_seed(q.device, generator) if dropout_p > 0 else None
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    fwd, _bwd = _KERNELS[name]
    out, _lse = fwd(q, k, v, mask, bool(causal), causal_shift, scale, dropout_p, seed)
    return out if D_padded == D else out[..., :D]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """attention(q, k, v, causal=True, **kwargs): the masked self-attention of a GPT block."""
    return attention(q, k, v, causal=True, **kwargs)


def _kernel_layout(name: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """q, k, v as backend `name` takes them (contiguous, head dim padded where it must be);
    also returns the head dim they now have."""
    D = q.shape[-1]
    if name in ("cuda", "triton"):
        if q.dtype == torch.float64:
            raise TypeError(f"attention: the {name} backend takes float32, float16 and bfloat16, not float64")
        if D > _GPU_MAX_HEAD_DIM:
            raise ValueError(
                f"attention: the {name} backend takes head dims up to {_GPU_MAX_HEAD_DIM}, got {D}"
            )
    if name == "cuda":
        if q.dtype == torch.float32:
            raise TypeError(
                "attention: the cuda backend takes float16 and bfloat16; float32 runs on backend='triton'"
            )
        padded = max(_CUDA_MIN_HEAD_DIM, -(-D // _CUDA_HEAD_DIM_MULTIPLE) * _CUDA_HEAD_DIM_MULTIPLE)
        if padded != D:
            q, k, v = (F.pad(t, (0, padded - D)) for t in (q, k, v))
            D = padded
    return q.contiguous(), k.contiguous(), v.contiguous(), D


def _draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A 0-dim int64 Philox seed on `device`, from `generator` or the default generator there.
    It stays on the device, so no host sync is needed and CUDA graphs replay a fresh draw."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def _sdpa(
    q, k, v, causal, causal_shift, key_padding_mask, dropout_p, scale, generator, deterministic
) -> Tensor:
    """The "torch" backend: F.scaled_dot_product_attention with dlfast's masks as one boolean mask."""
    Lq, Lk = q.shape[2], k.shape[2]
    mask = None
    if causal and (causal_shift != 0 or key_padding_mask is not None):
        rows = torch.arange(Lq, device=q.device).view(Lq, 1)
        mask = torch.arange(Lk, device=q.device).view(1, Lk) <= rows + causal_shift
    if key_padding_mask is not None:
        keep = key_padding_mask.view(q.shape[0], 1, 1, Lk)
        mask = keep if mask is None else mask & keep
    is_causal = causal and mask is None
    gqa = q.shape[1] != k.shape[1]
    with contextlib.ExitStack() as stack:
        if deterministic and q.device.type == "cuda":
            stack.enter_context(torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH))
        if dropout_p > 0 and generator is not None:
            # SDPA draws from the global generator: seed it from `generator`, restoring it after.
            stack.enter_context(torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else []))
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator, device=generator.device)))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
