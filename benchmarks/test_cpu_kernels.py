"""CPU regression suite: dlfast's C++ CPU kernels against the PyTorch op each replaces, at the sizes
of the course models, with pytest-benchmark.

Every case times the dlfast `cpu` backend and the PyTorch op in one benchmark group. What is
judged is the ratio of the two medians (dlfast / torch), not the absolute times, so a faster or
slower machine does not move it: `make bench-cpu-regression` runs this file with
--benchmark-json and `python -m dlfast.bench.report --regression` fails when a case's ratio got
worse than the committed baseline's (benchmarks/results/cpu-epyc-2core-avx512/
pytest-benchmark-baseline.json) by more than its factor. Not collected by `make test` (which runs
`pytest tests`).

    pytest benchmarks/test_cpu_kernels.py --benchmark-json build/bench-cpu-regression/run.json

Each case is timed in its pass that matters in training: forward and backward for the ops with a
gradient, the count for bigram counting. Two things would otherwise make the times measure the
machine rather than the kernels:

- The kernels run on one thread (DLFAST_BENCH_THREADS to change it): on a small shared machine,
  two threads that meet at a barrier wait for whichever the scheduler has put aside.
- glibc's malloc is told to keep freed memory (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD,
  256 MiB): with its defaults, buffers of a MiB or so are sometimes mapped afresh and page-faulted
  on every call and sometimes reused, and the median of dlfast's fp32 LayerNorm here moved 4x
  between otherwise identical runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import dlfast
from dlfast import backends
from dlfast.bench.runner import keep_freed_memory

if backends.unavailable_reason("cpu") is not None:
    pytest.skip(f"dlfast's cpu backend: {backends.unavailable_reason('cpu')}", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _quiet_machine() -> Iterator[None]:
    keep_freed_memory()
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DLFAST_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class Case:
    """One benchmark group: make() -> (inputs, {impl: fn(*inputs) -> output to backpropagate or
    return}), with the inputs that require grad among them."""

    name: str
    make: Callable[[], tuple[tuple[Tensor, ...], dict[str, Callable]]]


def _rand(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = True) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_(grad)


def _layer_norm(dtype: torch.dtype) -> Callable:
    # The course GPT's LayerNorm: batch 32, block 64, n_embd 128 (2^18 elements).
    def make():
        x, w, b = _rand(32, 64, 128, dtype=dtype), _rand(128, dtype=dtype), _rand(128, dtype=dtype)
        return (x, w, b), {
            "dlfast": lambda x, w, b: dlfast.layer_norm(x, 128, w, b, backend="cpu"),
            "torch": lambda x, w, b: F.layer_norm(x, (128,), w, b),
        }

    return make


def _attention(dtype: torch.dtype) -> Callable:
    # The course GPT's causal self-attention: 4 heads, block 64, head dim 32, a batch of 8.
    def make():
        q, k, v = (_rand(8, 4, 64, 32, dtype=dtype) for _ in range(3))
        return (q, k, v), {
            "dlfast": lambda q, k, v: dlfast.attention(q, k, v, causal=True, backend="cpu"),
            "torch": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }

    return make


def _conv2d_relu():
    # The course CNN's first layer on 28x28 digits: 16 images, 1 -> 32 channels, 3x3, padding 1.
    x, w, b = _rand(16, 1, 28, 28), _rand(32, 1, 3, 3), _rand(32)
    return (x, w, b), {
        "dlfast": lambda x, w, b: dlfast.conv2d_relu(x, w, b, padding=1, backend="cpu"),
        "torch": lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1)),
    }


def _bigram_counts():
    # A names file's worth of characters (2^18 tokens, 27-letter vocabulary), as int64 ids.
    tokens = torch.randint(0, 27, (2**18,), generator=torch.Generator().manual_seed(0))
    return (tokens,), {
        "dlfast": lambda t: dlfast.bigram_counts(t, 27, backend="cpu"),
        "torch": lambda t: torch.bincount(t[:-1] * 27 + t[1:], minlength=27 * 27).view(27, 27),
    }


CASES = (
    Case("layer_norm-float32", _layer_norm(torch.float32)),
    Case("layer_norm-bfloat16", _layer_norm(torch.bfloat16)),
    Case("attention-float32", _attention(torch.float32)),
    Case("attention-bfloat16", _attention(torch.bfloat16)),
    Case("conv2d_relu-float32", _conv2d_relu),
    Case("bigram_counts-int64", _bigram_counts),
)


def _step(fn: Callable, inputs: tuple[Tensor, ...]) -> Callable[[], object]:
    """One call of fn in its training pass: forward and backward when an input requires grad,
    with the gradients set to None first so that they are written fresh, not accumulated."""
    leaves = [t for t in inputs if t.requires_grad]
    if not leaves:
        return lambda: fn(*inputs)

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        fn(*inputs).sum().backward()

    return fwd_bwd


# A short, fixed budget per benchmark (~0.5 s after warm-up), so the whole file takes well under
# a minute on 2 cores. The comparison uses the fastest round of each (see benchmarks/README.md).
@pytest.mark.benchmark(max_time=0.5, min_rounds=20, warmup=True, warmup_iterations=20)
@pytest.mark.parametrize("impl", ["dlfast", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu_kernel(benchmark, case: Case, impl: str) -> None:
    inputs, impls = case.make()
    if impl == "dlfast":
        # A broken kernel is not worth timing: the same result as the PyTorch op first.
        want, got = impls["torch"](*inputs), impls["dlfast"](*inputs)
        if got.is_floating_point():
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(got, want)
    benchmark.group = case.name
    benchmark.extra_info.update(op=case.name.split("-")[0], impl=impl, threads=torch.get_num_threads())
    benchmark(_step(impls[impl], inputs))
