"""Which backends exist here, and which one runs an op.

Backends:
  cuda       hand-written CUDA C++ (dlfast._C built with CUDA), CUDA tensors
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cpu        C++ CPU kernels (dlfast._C), CPU tensors
  reference  dlfast/reference.py, plain PyTorch written from the definition (the tests' oracle)
  torch      the PyTorch op dlfast replaces (F.layer_norm, ...), where dlfast delegates when its
             own kernel is slower or not yet proven on a device

Choice, first match wins: the `backend=` keyword, `use_backend(...)`, `DLFAST_BACKEND`, then
the DEFAULTS table.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference", "torch")

# The default backends per (op, device type): rows of (largest input numel the row covers or None
# for any size, the dtypes it covers or None for any, backends fastest first). The first row that
# covers the input and the first of its backends available here run. Each row comes from a
# committed benchmark result (benchmarks/results/). A kernel that has never passed the suite on a
# real GPU is never a default, so CUDA tensors go to PyTorch's own op until a GPU run under
# benchmarks/results/ shows dlfast's kernel correct and faster.
DefaultRow = tuple[int | None, tuple[torch.dtype, ...] | None, tuple[str, ...]]
DEFAULTS: dict[tuple[str, str], tuple[DefaultRow, ...]] = {
    # benchmarks/results/cpu-epyc-2core-avx512/layer_norm.json (2 threads): fwd+bwd 1.06-1.50x
    # F.layer_norm in bf16, but 0.84-0.92x in fp32, so fp32 (and the unmeasured fp64) stay with
    # PyTorch. Below 2^18 elements the ~12 us that a call through a Python-registered custom op
    # costs outweighs the kernel's lead.
    ("layer_norm", "cpu"): (
        (2**18, None, ("torch",)),
        (None, (torch.bfloat16, torch.float16), ("cpu", "torch")),
        (None, None, ("torch",)),
    ),
    # benchmarks/results/h100/layer_norm.json (2^25 elements per case, widths 512-16384): the CUDA
    # kernel runs fwd at 81-96% of copy bandwidth, 1.1-2.3x F.layer_norm, and bwd at 1.2-3.0x.
    # Timed alone, fwd+bwd is bound by the Python custom-op and autograd overhead (about 0.22 ms
    # a call whatever the size), where bf16 widths 2048-8192 lose (0.74-0.97x). Smaller inputs
    # are unmeasured on the GPU and stay with PyTorch. The Triton kernel is slower than both.
    ("layer_norm", "cuda"): (
        (2**25 - 1, None, ("torch",)),
        (None, (torch.float32, torch.float16, torch.bfloat16), ("cuda", "torch")),
        (None, None, ("torch",)),
    ),
    # benchmarks/results/cpu-epyc-2core-avx512/attention.json: the C++ kernel beats SDPA's CPU
    # flash kernel in fp32 and bf16, fwd and fwd+bwd, from 4 x 8 x 512 x 64 up; at a course
    # model's 32 x 4 x 32 x 16 the ~20 us of a Python custom-op call make its fp32 fwd+bwd lose,
    # so small fp32 (and float64, timed alike) stay with SDPA. 16-bit inputs gain at every size.
    ("attention", "cpu"): (
        (2**16, (torch.float32, torch.float64), ("torch",)),
        (None, None, ("cpu", "torch")),
    ),
    # benchmarks/results/h100/attention.json (bf16, D 128, 16k tokens): both dlfast kernels pass
    # the suite on the H100 but lose to SDPA's cuDNN backend everywhere (Triton fwd 0.63-0.77x,
    # fwd+bwd 0.39-0.58x; the mma.sync CUDA kernel 0.28-0.50x): SDPA keeps CUDA attention.
    ("attention", "cuda"): ((None, None, ("torch",)),),
    # benchmarks/results/cpu-epyc-2core-avx512/conv2d_relu.json: the C++ route wins only on the
    # 3-channel 64x64 first layer (direct kernel: fp32 fwd 2.0x, fwd+bwd 1.3x; bf16 1.4x, 1.1x);
    # elsewhere it is 0.76-1.06x of F.conv2d + relu (within this machine's noise at best), and the
    # table cannot yet select by channel count, so PyTorch keeps the CPU default.
    ("conv2d_relu", "cpu"): ((None, None, ("torch",)),),
    # benchmarks/results/h100/conv2d_relu.json (bf16, course and ResNet shapes): both kernels pass
    # the suite on the H100 but lose to cuDNN conv + relu in fwd+bwd everywhere (CUDA 0.29-0.77x,
    # Triton 0.16-0.61x); only Triton's forward of the 3-channel first layer wins (2.1-2.3x).
    ("conv2d_relu", "cuda"): ((None, None, ("torch",)),),
    # "torch" for n-gram counting is the torch.bincount composite (dlfast.reference.ngram_counts).
    # benchmarks/results/cpu-epyc-2core-avx512/bigram_counts.json: the C++ kernel is 2.0-3.2x the
    # composite at 1e6 tokens and 13-20x at 1e7 for V <= 256; at V = 4096 0.94x (1e6), 1.4x (1e7).
    ("ngram_counts", "cpu"): ((None, None, ("cpu", "torch")),),
    # benchmarks/results/h100/bigram_counts.json: the CUDA kernel beats the bincount composite at
    # every measured size and vocabulary (1e6 to 1e9 tokens: 2.2-22x for V <= 65, 2.1-3.2x at
    # V = 256, 1.4-1.5x at V = 4096); Triton 0.9-1.7x.
    ("ngram_counts", "cuda"): ((None, None, ("cuda", "torch")),),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _load_extension() -> str | None:
    """Imports dlfast._C (registering the C++ ops); returns why it failed, or None."""
    try:
        importlib.import_module("dlfast._C")
    except Exception as exc:  # any failure (missing file, ABI mismatch) leaves Python backends
        return f"{type(exc).__name__}: {exc}"
    return None


EXTENSION_ERROR: str | None = _load_extension()


def _no_cuda_build_reason() -> str | None:
    """Why dlfast._C has no CUDA kernels, or None when it has them."""
    try:
        from dlfast._build_info import BUILD_INFO
    except ImportError:
        return "no build record (dlfast/_build_info.py) was found"
    return BUILD_INFO["no_cuda_reason"]


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable_reason(backend: str) -> str | None:
    if backend in ("reference", "torch"):
        return None
    if backend in ("cpu", "cuda") and EXTENSION_ERROR is not None:
        return f"the compiled extension dlfast._C did not load ({EXTENSION_ERROR})"
    if backend == "cuda":
        no_cuda = _no_cuda_build_reason()
        if no_cuda is not None:
            return f"dlfast._C was built without CUDA kernels: {no_cuda}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not triton_interpreted():
            return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
    return None


_REASONS: dict[str, str | None] = {}


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run here, or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend not in _REASONS:
        _REASONS[backend] = _unavailable_reason(backend)
    return _REASONS[backend]


def available_backends() -> list[str]:
    """The backends that can run on this machine."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend` takes tensors on `device`."""
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return True


_forced: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs every dlfast op inside the block on backend `name` (raises if it cannot run here).

    Not thread-local: like torch.backends flags, it applies to the whole process.
    """
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"dlfast backend {name!r} is unavailable: {reason}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def choose(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs `op` on input `x` (its device, size and dtype decide the default)."""
    device = x.device
    name = backend or (_forced[-1] if _forced else None) or os.environ.get("DLFAST_BACKEND") or None
    if name is not None:
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailableError(f"dlfast backend {name!r} is unavailable: {reason}")
        if not runs_on(name, device):
            raise ValueError(f"dlfast backend {name!r} cannot run {op} on {device.type} tensors")
        return name
    for max_numel, dtypes, candidates in DEFAULTS.get((op, device.type), ()):
        if (max_numel is None or x.numel() <= max_numel) and (dtypes is None or x.dtype in dtypes):
            for candidate in candidates:
                if unavailable_reason(candidate) is None and runs_on(candidate, device):
                    return candidate
            break
    return "torch"
