"""What dlfast is running on: versions, device, how the extension was built, which backends work."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from dlfast import backends


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _C_attribute(name: str) -> str | None:
    if backends.EXTENSION_ERROR is not None:
        return None
    from dlfast import _C

    return getattr(_C, name)


def info() -> dict:
    """A dict describing this installation; `python -m dlfast info` prints it."""
    try:
        from dlfast._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = None
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return {
        "dlfast": _version("dlfast"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": _C_attribute("cpu_isa"),
        "extension": "loaded"
        if backends.EXTENSION_ERROR is None
        else f"not loaded: {backends.EXTENSION_ERROR}",
        "built_with": BUILD_INFO,
        "backends": {b: backends.unavailable_reason(b) or "available" for b in backends.BACKENDS},
    }


def format_info(d: dict) -> str:
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
