"""Backend discovery and choice: the table, the overrides, and the errors for missing backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlfast
from dlfast import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_and_torch_always_available():
    assert {"reference", "torch"} <= set(dlfast.available_backends())


def test_every_default_names_a_known_backend_and_ends_with_a_catch_all():
    for (op, device), rows in backends.DEFAULTS.items():
        for _max_numel, _dtypes, names in rows:
            assert names and set(names) <= set(backends.BACKENDS), (op, device)
        assert rows[-1][:2] == (None, None), f"{op} on {device}: the last row must cover every input"


def test_cuda_defaults_cite_a_committed_gpu_result():
    """A dlfast kernel is a CUDA default only where a committed GPU benchmark shows it faster; the
    comment above each CUDA row of DEFAULTS names that file, and the file must exist."""
    source = Path(backends.__file__).read_text()
    root = Path(backends.__file__).resolve().parents[1]
    for (op, device), rows in backends.DEFAULTS.items():
        if device != "cuda" or all(names == ("torch",) for _, _, names in rows):
            continue
        above = source[: source.index(f'("{op}", "cuda"): (')].splitlines()[:-1]
        comment = []
        while above and above[-1].strip().startswith("#"):
            comment.append(above.pop())
        cited = [
            word.rstrip(":.,;)")
            for line in comment
            for word in line.split()
            if word.startswith("benchmarks/results/")
        ]
        assert cited, f"the CUDA default of {op} cites no committed GPU result"
        assert all((root / path).is_file() for path in cited), cited


@pytest.mark.parametrize(
    "shape,dtype,expected",
    [
        ((8, 1024), torch.bfloat16, "torch"),  # small: the call overhead dominates
        ((512, 1024), torch.bfloat16, "cpu"),
        ((512, 1024), torch.float16, "cpu"),
        ((512, 1024), torch.float32, "torch"),  # PyTorch's fp32 kernel is faster on 2 threads
        ((512, 1024), torch.float64, "torch"),
    ],
)
def test_cpu_defaults_by_size_and_dtype(shape, dtype, expected):
    if backends.unavailable_reason("cpu") is not None:
        pytest.skip("the C++ extension did not load")
    assert backends.choose("layer_norm", torch.empty(shape, dtype=dtype)) == expected


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        with dlfast.use_backend("fastest"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        dlfast.layer_norm(torch.ones(2, 3), 3, backend="fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_missing_backend_says_why():
    with pytest.raises(dlfast.BackendUnavailableError, match="no CUDA GPU|without CUDA"):
        with dlfast.use_backend("cuda"):
            pass


def test_backend_that_cannot_take_the_device():
    if backends.unavailable_reason("cpu") is not None:
        pytest.skip("the C++ extension did not load")
    with pytest.raises(ValueError, match="cannot run layer_norm on meta tensors"):
        dlfast.layer_norm(torch.ones(2, 3, device="meta"), 3, backend="cpu")


def test_overrides_in_priority_order(monkeypatch):
    x = torch.empty(2, 5)
    monkeypatch.setenv("DLFAST_BACKEND", "reference")
    assert backends.choose("layer_norm", x) == "reference"
    with dlfast.use_backend("torch"):
        assert backends.choose("layer_norm", x) == "torch"
        assert backends.choose("layer_norm", x, backend="reference") == "reference"
    monkeypatch.delenv("DLFAST_BACKEND")
    assert backends.choose("layer_norm", x) == "torch"


def test_use_backend_restores_on_error():
    with pytest.raises(KeyError):
        with dlfast.use_backend("reference"):
            raise KeyError
    assert backends._forced == []


def test_every_backend_gives_the_same_answer():
    x = torch.randn(4, 50)
    results = {
        b: dlfast.layer_norm(x, 50, backend=b)
        for b in ("cpu", "reference", "torch")
        if b in dlfast.available_backends()
    }
    for result in results.values():
        torch.testing.assert_close(result, results["torch"])


def test_import_without_the_extension():
    """A missing or broken dlfast._C leaves the Python backends, and info() says why."""
    script = (
        "import sys; sys.modules['dlfast._C'] = None\n"
        "import torch, dlfast\n"
        "assert 'cpu' not in dlfast.available_backends(), dlfast.available_backends()\n"
        "assert 'did not load' in dlfast.info()['backends']['cpu']\n"
        "assert dlfast.info()['extension'].startswith('not loaded')\n"
        "x = torch.randn(3, 8)\n"
        "torch.testing.assert_close(dlfast.layer_norm(x, 8), torch.nn.functional.layer_norm(x, (8,)))\n"
        "try:\n"
        "    dlfast.layer_norm(x, 8, backend='cpu')\n"
        "except dlfast.BackendUnavailableError as e:\n"
        "    assert 'did not load' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_info_command():
    done = subprocess.run([sys.executable, "-m", "dlfast", "info"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for key in ("torch:", "triton:", "device:", "built_with:", "backends:", "reference: available"):
        assert key in done.stdout
