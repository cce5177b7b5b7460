"""Smoke test of an installed dlfast wheel, run by .ci/wheel_smoke.sh from outside the source tree.

Checks that the wheel (not the source tree) is what `import dlfast` finds, that its compiled
extension loaded, that its version label and torch pin name the torch running, and that every op
and drop-in layer gives PyTorch's result and gradients on the CPU: with the C++ kernels forced
(backend="cpu") and with the default backend. Prints one line per check and a closing count;
exits non-zero on the first failure.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import sysconfig
import time

import torch
import torch.nn.functional as F

import dlfast

# float32 against PyTorch's own float32 op: only summation order differs (small shapes).
TOL = {"atol": 1e-4, "rtol": 1e-4}
BACKENDS = ("cpu", None)  # None: the default from dlfast.backends.DEFAULTS


PASSED: list[str] = []


def report(name: str, start: float) -> None:
    PASSED.append(name)
    print(f"  ok  {name} ({time.perf_counter() - start:.2f} s)")


def check_same(fn_dlfast, fn_torch, *inputs: torch.Tensor) -> None:
    """fn_dlfast(*inputs) equals fn_torch(*inputs), and so do the gradients of every input."""
    outs, grads = [], []
    for fn in (fn_dlfast, fn_torch):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([t.grad for t in leaves if t.requires_grad])
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, **TOL)


def check_install() -> None:
    start = time.perf_counter()
    site = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    where = os.path.realpath(dlfast.__file__)
    assert any(where.startswith(s + os.sep) for s in site), f"dlfast imported from {where}, not {site}"
    info = dlfast.info()
    assert info["extension"] == "loaded", info["extension"]
    major_minor = ".".join(torch.__version__.split(".")[:2])
    version = importlib.metadata.version("dlfast")
    assert f"+torch{major_minor}." in version, f"version {version} does not name torch {major_minor}"
    requires = importlib.metadata.requires("dlfast")
    assert any(r.startswith("torch") and f">={major_minor}" in r for r in requires), requires
    print(f"dlfast {version} from {where}")
    runtime = [r for r in requires if "extra ==" not in r]
    print(f"requires {runtime}; torch {torch.__version__}; CPU kernels {info['cpu_kernels']}")
    report("installed wheel, extension loaded", start)


def check_ops(backend: str | None) -> None:
    torch.manual_seed(0)
    name = backend or "default"

    start = time.perf_counter()
    x, w, b = torch.randn(4, 16, 64), torch.randn(64), torch.randn(64)
    check_same(
        lambda x, w, b: dlfast.layer_norm(x, (64,), w, b, backend=backend),
        lambda x, w, b: F.layer_norm(x, (64,), w, b),
        x,
        w,
        b,
    )
    report(f"layer_norm [{name}]", start)

    start = time.perf_counter()
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    check_same(
        lambda q, k, v: dlfast.attention(q, k, v, causal=True, backend=backend),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        q,
        k,
        v,
    )
    report(f"attention causal [{name}]", start)

    start = time.perf_counter()
    x, w, b = torch.randn(2, 3, 17, 15), torch.randn(8, 3, 3, 3), torch.randn(8)
    check_same(
        lambda x, w, b: dlfast.conv2d_relu(x, w, b, padding=1, backend=backend),
        lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1)),
        x,
        w,
        b,
    )
    report(f"conv2d_relu [{name}]", start)

    start = time.perf_counter()
    vocab = 27
    tokens = torch.randint(0, vocab, (10_000,))
    want = torch.bincount(tokens[:-1] * vocab + tokens[1:], minlength=vocab * vocab).view(vocab, vocab)
    torch.testing.assert_close(dlfast.bigram_counts(tokens, vocab, backend=backend), want)
    report(f"bigram_counts [{name}]", start)


def check_layers(backend: str | None) -> None:
    torch.manual_seed(0)
    name = backend or "default"
    with dlfast.use_backend(backend) if backend else contextlib.nullcontext():
        start = time.perf_counter()
        x = torch.randn(4, 16, 64)
        theirs = torch.nn.LayerNorm(64)
        ours = dlfast.nn.LayerNorm(64)
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        report(f"nn.LayerNorm [{name}]", start)

        start = time.perf_counter()
        x = torch.randn(2, 3, 16, 16)
        theirs = torch.nn.Conv2d(3, 8, 3, padding=1)
        ours = dlfast.nn.Conv2dReLU(3, 8, 3, padding=1)
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), F.relu(theirs(x)), **TOL)
        report(f"nn.Conv2dReLU [{name}]", start)

        start = time.perf_counter()
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.LayerNorm(8 * 16 * 16),
            torch.nn.Linear(8 * 16 * 16, 10),
        )
        original = copy.deepcopy(model)
        converted = dlfast.nn.convert(model)
        swapped = {type(m).__name__ for m in converted.modules() if type(m).__module__.startswith("dlfast")}
        assert swapped == {"Conv2dReLU", "LayerNorm"}, swapped
        torch.testing.assert_close(converted(x), original(x), **TOL)
        report(f"nn.convert(Sequential) [{name}]", start)


def main() -> None:
    start = time.perf_counter()
    check_install()
    for backend in BACKENDS:
        check_ops(backend)
        check_layers(backend)
    print(f"wheel smoke test: all checks passed in {time.perf_counter() - start:.1f} s")
    print(f"wheel-smoke: {len(PASSED)} passed, 0 failed")


if __name__ == "__main__":
    main()
