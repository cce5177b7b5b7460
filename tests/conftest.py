"""Shared test fixtures: which (backend, device) pairs to sweep, and the tolerance table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from dlfast import backends
from dlfast.backends import use_backend as dlfast_backend

# Kernel backends under test ("torch" is PyTorch itself, so it is not swept).
SWEPT_BACKENDS = ("cpu", "cuda", "triton", "reference")
DEVICES = ("cpu", "cuda")

# (atol, rtol) per dtype for an O(1) result compared with a float64 computation from the same
# rounded inputs. The floor is one rounding of the result to the dtype (half an ulp: 2^-8 for
# bfloat16, 2^-11 for float16, 2^-24 for float32) plus float32 accumulation error, which for
# sums of up to 65536 terms stays below ~1e-6 relative. Each entry leaves about 2x headroom
# over that floor; summed gradients (dweight, dbias) scale atol by sqrt(rows), see grad_tol().
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),  # float64 accumulation: only summation-order differences
    torch.float32: (2e-5, 2e-5),  # float32 accumulation over up to 65536 elements
    torch.float16: (2e-3, 2e-3),  # one float16 rounding of values up to ~4 (ulp 2^-9 there)
    torch.bfloat16: (1.6e-2, 1.6e-2),  # one bfloat16 rounding (2^-8 relative) with 2x headroom
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def grad_tol(dtype: torch.dtype, rows: int) -> dict:
    """Tolerance for a gradient summed over `rows` rows: the absolute error of a sum grows
    like sqrt(rows) for random-sign terms, while the relative rounding of the result does not."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * max(1.0, rows**0.5), "rtol": rtol}


def skip_reason(backend: str, device: str) -> str | None:
    """Why (backend, device) cannot be tested here, or None."""
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        return f"backend {backend!r} unavailable: {reason}"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    if not backends.runs_on(backend, torch.device(device)):
        return (
            f"backend {backend!r} does not run on {device} tensors here (CPU triton needs TRITON_INTERPRET=1)"
        )
    return None


def _backend_params():
    params = []
    for backend in SWEPT_BACKENDS:
        for device in DEVICES:
            if (backend, device) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue
            marks = [pytest.mark.triton] if backend == "triton" else []
            reason = skip_reason(backend, device)
            if reason is not None:
                marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


BACKEND_DEVICE_PARAMS = _backend_params()


@pytest.fixture(params=[p for p in BACKEND_DEVICE_PARAMS if p.id in ("cuda-cuda", "triton-cuda")])
def gpu_kernel_backend(request):
    """ "cuda" and "triton" on CUDA tensors; skipped (with the reason) where they cannot run."""
    return request.param[0]


@pytest.fixture(params=BACKEND_DEVICE_PARAMS)
def backend_device(request):
    """(backend, device) for every kernel backend and device it runs on; unavailable ones skip."""
    return request.param


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """The dtypes a (backend, device) pair is tested in. The Triton interpreter has no bfloat16."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


CPU_ISA_LEVELS = ("default", "avx2", "avx512")


def run_on_cpu_isa(isa: str, script: str, **env_vars: str) -> None:
    """Runs `script` in a fresh process whose CPU kernels are the `isa` build (ATEN_CPU_CAPABILITY
    picks it at load), with tests/ importable and `env_vars` set; skips levels above this CPU's,
    fails on an error."""
    this_cpu = torch.backends.cpu.get_cpu_capability().lower()
    if this_cpu in CPU_ISA_LEVELS and CPU_ISA_LEVELS.index(isa) > CPU_ISA_LEVELS.index(this_cpu):
        pytest.skip(f"this CPU tops out at {this_cpu}")
    script = f"import dlfast._C\nassert dlfast._C.cpu_isa == {isa.upper()!r}, dlfast._C.cpu_isa\n" + script
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, PYTHONPATH=os.path.join(root, "tests"), **env_vars)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr


def check_compiled_model(model: torch.nn.Module, x: torch.Tensor, backend: str, device: str) -> None:
    """torch.compile(model, fullgraph=True) on `backend` gives the eager outputs and parameter
    gradients: the op's fake implementation and autograd rule trace without a graph break.
    Triton on CPU tensors is skipped (inductor compiles for the CPU, where Triton kernels only
    run interpreted)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("inductor compiles for the CPU, where triton kernels only run interpreted")
    torch._dynamo.reset()
    with dlfast_backend(backend):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, **tol(torch.float32))
        compiled.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
    for got, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, **tol(torch.float32))


def free_port() -> int:
    """A TCP port free on loopback now: the rendezvous of the two-process gloo tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def second_order_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients for `inputs` of a loss made of fn's first-order gradients, taken with
    create_graph=True (the sum of their squares, a gradient penalty's shape, plus a term in the
    output so every input enters): wrong wherever a backward's own gradient is missing."""
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    out = fn(*inputs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    first = torch.autograd.grad((out * weights).sum() + out.square().sum(), inputs, create_graph=True)
    penalty = sum(g.float().square().sum() for g in first)
    return torch.autograd.grad(penalty, inputs)
