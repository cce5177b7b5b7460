"""Builds dlfast and its C++/CUDA extension dlfast._C against the torch already installed.

Build with `pip install --no-build-isolation .` (the Makefile does): an isolated build
environment would fetch a second torch (gigabytes, and maybe not the ABI you run).

Environment:
  DLFAST_NO_CUDA=1        build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    CUDA archs to build (default "8.0;8.6;8.9;9.0a")
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import json
import os
import platform
import shutil

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only seen in a misconfigured build
    raise SystemExit(
        "dlfast builds against the torch already installed; install torch first and build with "
        "`pip install --no-build-isolation .` (torch is missing from this build environment: "
        f"{exc})"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0a"
# The baseline kernel file comes first: see csrc/cpu/kernels_default.cpp.
CPU_ISA_SOURCES = ["csrc/cpu/kernels_default.cpp"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
if X86:
    CPU_ISA_SOURCES += ["csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"]


def cuda_build_reason() -> str | None:
    """None when the CUDA kernels should be built, else why not."""
    if os.environ.get("DLFAST_NO_CUDA") == "1":
        return "DLFAST_NO_CUDA=1 was set at build time"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    no_cuda_reason = cuda_build_reason()
    with_cuda = no_cuda_reason is None
    sources = (
        ["csrc/dlfast.cpp", "csrc/autograd.cpp"]
        + CPU_ISA_SOURCES
        + [p for p in rel(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp"))) if p not in CPU_ISA_SOURCES]
    )
    # ATen's vec headers carry CUDA-style unroll pragmas and intrinsics that trip GCC's
    # maybe-uninitialized and psabi notes: header noise that would bury real warnings.
    cxx_flags = [
        "-O3",
        "-std=c++17",
        "-Wno-unknown-pragmas",
        "-Wno-psabi",
        "-Wno-maybe-uninitialized",
        "-Wno-c++20-extensions",
    ] + (["-DDLFAST_X86"] if X86 else [])
    # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs serially.
    cxx_flags.append("-fopenmp")
    extra = {"cxx": cxx_flags}
    archs = ""
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += ["csrc/cuda_ops.cpp"] + rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    write_build_info(with_cuda, archs, no_cuda_reason)
    ext_cls = CUDAExtension if with_cuda else CppExtension
    return ext_cls(
        "dlfast._C",
        sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
    )


def write_build_info(with_cuda: bool, archs: str, no_cuda_reason: str | None) -> None:
    """Records what the extension is built against; dlfast.info() reports it."""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs.replace(";", " ").split() if with_cuda else [],
        "no_cuda_reason": no_cuda_reason,
        "cpu_isa_variants": [os.path.basename(p)[len("kernels_") : -len(".cpp")] for p in CPU_ISA_SOURCES],
    }
    with open(os.path.join(ROOT, "dlfast", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time: what dlfast._C was built against."""\n\n')
        f.write(f"BUILD_INFO = {json.dumps(info, indent=4)}\n".replace("null", "None"))


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
