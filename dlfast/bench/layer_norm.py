"""LayerNorm benchmark cases: dlfast.layer_norm against F.layer_norm (eager and compiled), Liger, QuACK.

Every implementation runs on the same (M, N) input with a weight and bias of x's dtype; x, the
weight and the bias require grad, so the forward is the training-mode forward (it also writes
the mean and rstd that the backward reads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import dlfast
from dlfast.bench.runner import Case, Impl, Timed, Work, dlfast_impls

PASSES = ("fwd", "bwd", "fwd+bwd")
EPS = 1e-5
WIDTHS = (512, 1024, 2048, 4096, 8192, 16384)
DTYPES = (torch.bfloat16, torch.float32)

# Relative error (in the 2-norm) allowed against F.layer_norm computed in fp32 from the same
# rounded inputs before a result counts as wrong. This guards against timing a broken kernel; it
# is not the proof of correctness (that is tests/). y and dx are rounded once to the output dtype
# (bf16: 2^-8 relative). dweight and dbias are sums over M rows, and PyTorch's own eager bf16
# backward on the CPU was measured 7e-2 off at M = 8192, so their bf16 bound is wide: a broken
# kernel is off by O(1) or NaN.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
SUMMED_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1.5e-1}


def _rows(device: torch.device, N: int) -> int:
    """Rows M for width N."""
    if device.type == "cuda":
        # 2^25 elements (64 MiB of bf16 x) per case, and at least the 4096 rows of a typical
        # training batch: enough to keep 132 SMs busy and to swamp the launch overhead.
        return max(4096, 2**25 // N)
    # 2^22 elements (16 MiB of fp32 x) per case, which puts the CPU target 4096 x 1024 in
    # the sweep and keeps the whole run on 2 cores within a few minutes.
    return 2**22 // N


def cases(device: torch.device, quick: bool) -> list[Case]:
    """bf16 and fp32 over widths 512 to 16384; --quick: width 1024 (and 4096 on the GPU) only."""
    if quick:
        widths = (1024, 4096) if device.type == "cuda" else (1024,)
        rows = (lambda N: 4096) if device.type == "cuda" else (lambda N: 1024)
    else:
        widths, rows = WIDTHS, functools.partial(_rows, device)
    return [Case(dtype=dtype, shape={"M": rows(N), "N": N}) for dtype in DTYPES for N in widths]


def work(case: Case, pass_: str) -> Work:
    """Bytes moved by a pass that reads and writes each tensor exactly once.

    fwd: reads x, weight, bias; writes y, mean and rstd (fp32).
    bwd: reads x, dy, weight, mean, rstd; writes dx, dweight, dbias.
    """
    M, N = case.shape["M"], case.shape["N"]
    size = case.dtype.itemsize
    fwd = 2 * M * N * size + 2 * N * size + 2 * M * 4
    bwd = 3 * M * N * size + 3 * N * size + 2 * M * 4
    return Work(bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_])


def _torch_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _compiled_torch_layer_norm() -> Callable:
    # Dynamo caches compiled graphs on the code object of _torch_layer_norm, and after a few
    # shapes it stops recompiling and silently runs eagerly: start from an empty cache at every
    # case. dynamic=False gives kernels specialised to the shape, as a model with fixed shapes gets.
    torch._dynamo.reset()
    return torch.compile(_torch_layer_norm, dynamic=False, fullgraph=True)


def _dlfast(backend: str) -> Callable:
    def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return dlfast.layer_norm(x, (x.shape[-1],), weight, bias, EPS, backend=backend)

    return layer_norm


def _liger() -> Callable:
    from liger_kernel.transformers.functional import liger_layer_norm

    return lambda x, weight, bias: liger_layer_norm(x, weight, bias, EPS)


def _quack() -> Callable:
    from quack.layernorm import layernorm

    # QuACK's LayerNorm has no bias and takes only an fp32 weight (the cast of N elements is
    # negligible next to the M x N tensors).
    return lambda x, weight, bias: layernorm(x, weight.float(), EPS)


def implementations(device: torch.device, note: Callable[[str], None]) -> list[Impl]:
    """dlfast's kernel backends that run on `device`, then the peers: eager and compiled
    F.layer_norm, and Liger's and QuACK's LayerNorm where they are installed (CUDA only)."""
    impls = dlfast_impls(device, note, _dlfast)
    impls.append(Impl("torch", "peer", lambda: _torch_layer_norm))
    impls.append(Impl("torch.compile", "peer", _compiled_torch_layer_norm))
    if device.type == "cuda":
        for name, make, options in (("liger", _liger, {}), ("quack", _quack, {"bias": False})):
            try:
                make()
            except Exception as exc:  # not installed, or an API this version does not have
                note(f"peer {name} not benchmarked: {type(exc).__name__}: {exc}")
                continue
            impls.append(Impl(name, "peer", make, options))
    return impls


def _relative_error(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def prepare(case: Case, impls: list[Impl], device: torch.device) -> dict[str, dict[str, Timed] | Exception]:
    """The timed callables of each implementation at `case`, or the exception that stopped it.

    Each implementation runs forward and backward once first, which compiles what needs
    compiling and checks y and every gradient against F.layer_norm in fp32.
    """
    M, N = case.shape["M"], case.shape["N"]
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(M, N, device=device, generator=gen).to(case.dtype)
    w0 = (1 + 0.1 * torch.randn(N, device=device, generator=gen)).to(case.dtype)
    b0 = (0.1 * torch.randn(N, device=device, generator=gen)).to(case.dtype)
    dy = torch.randn(M, N, device=device, generator=gen).to(case.dtype)

    def leaves(with_bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        # Fresh leaves over the same storage: each implementation gets its own .grad fields.
        x, w = x0.detach().requires_grad_(), w0.detach().requires_grad_()
        return x, w, b0.detach().requires_grad_() if with_bias else None

    @functools.cache
    def expected(with_bias: bool) -> dict[str, Tensor]:
        # In fp32 from the same rounded inputs, so that only the implementation's own error shows.
        x, w = (t.detach().float().requires_grad_() for t in (x0, w0))
        b = b0.detach().float().requires_grad_() if with_bias else None
        y = _torch_layer_norm(x, w, b)
        y.backward(dy.float())
        out = {"y": y.detach(), "dx": x.grad, "dweight": w.grad}
        if b is not None:
            out["dbias"] = b.grad
        return out

    prepared: dict[str, dict[str, Timed] | Exception] = {}
    for impl in impls:
        try:
            with_bias = impl.options.get("bias", True)
            fn = impl.make()
            x, w, b = leaves(with_bias)
            params = [t for t in (x, w, b) if t is not None]
            y = fn(x, w, b)
            y.backward(dy, retain_graph=True)
            got = {"y": y, "dx": x.grad, "dweight": w.grad}
            if b is not None:
                got["dbias"] = b.grad
            for key, want in expected(with_bias).items():
                err = _relative_error(got[key], want)
                tol = (SUMMED_TOLERANCE if key in ("dweight", "dbias") else TOLERANCE)[case.dtype]
                if not err <= tol:  # `not <=` also catches NaN
                    raise ValueError(
                        f"{key} differs from fp32 F.layer_norm by relative error {err:.1e} (bound {tol:.0e})"
                    )
            prepared[impl.name] = {
                "fwd": Timed(lambda fn=fn, x=x, w=w, b=b: fn(x, w, b)),
                # y (from the check above) keeps its graph, so this times the backward alone.
                "bwd": Timed(lambda y=y: y.backward(dy, retain_graph=True), params),
                "fwd+bwd": Timed(lambda fn=fn, x=x, w=w, b=b: fn(x, w, b).backward(dy), params),
            }
        except Exception as exc:  # reported by the runner; the other implementations go on
            prepared[impl.name] = exc
    if device.type == "cuda":
        torch.cuda.synchronize()
    return prepared
