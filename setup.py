"""Builds dlfast and its C++/CUDA extension dlfast._C against the torch already installed.

Build with `pip install --no-build-isolation .`, or a wheel with `make wheel` (pip wheel
--no-build-isolation): an isolated build environment would fetch a second torch (gigabytes, and
maybe not the ABI you run).

What a build records, computed here from the torch it is built against:
  version       0.1.0+torch2.13.cpu, 0.1.0+torch2.11.cu130: a PEP 440 local label naming the torch
                minor release and what the extension carries (cuXYZ: CUDA kernels for that CUDA;
                cpu: CPU kernels only), so a wheel's file name says which torch it serves.
  dependencies  torch>=2.13,<2.14: dlfast._C is written against torch's unstable C++ API (at::Tensor,
                the dispatcher, ATen's vec and oneDNN calls), whose ABI holds only within one minor
                release (docs/stable-abi.md: why the stable ABI cannot carry it yet).
  dlfast/_build_info.py  torch, CUDA, archs, CPU variants: `python -m dlfast info` prints them, and
                dlfast does not load dlfast._C under another torch minor release (it says why).

CUDA archs (TORCH_CUDA_ARCH_LIST, default "8.0;8.6;8.9+PTX;9.0a"): torch.utils.cpp_extension turns
"X.Y" into machine code (SASS) for sm_XY and "X.Y+PTX" into that plus PTX for compute_XY, which
the driver compiles on first use for any GPU of compute capability X.Y or newer. The kernels use
only sm_80 features (mma.sync, ldmatrix, cp.async): SASS for sm_80, 86 (also runs on 8.7 and 8.8),
89 and 90a covers Ampere, Ada and Hopper, and the PTX covers Blackwell and whatever comes next.
Which PTX: not "9.0a+PTX", since compute_90a PTX uses arch-specific features and runs on sm_90
only; "9.0+PTX" would add a compute_90 pass and an sm_90 SASS that duplicates sm_90a (measured with
nvcc 13 over csrc/cuda/*.cu: +34% compile CPU time, +29% object size); "8.9+PTX" reuses the
compute_89 pass that sm_89 needs anyway (no measurable compile time, +4% object size), and its PTX
runs on every GPU that compute_90's would.
Raise it when a kernel gains an sm_90 feature outside the "a" set (clusters, say).
Build for your GPU only with e.g. TORCH_CUDA_ARCH_LIST="9.0a" (what `make gpu-check` does).

CPU kernels: csrc/cpu/kernels_default.cpp is compiled with no -march flag (baseline x86-64, runs on
any x86-64 CPU), kernels_avx2.cpp and kernels_avx512.cpp set their ISA by `#pragma GCC target`, and
dlfast::cpu::cpu_isa() picks one at run time from ATen's CPU capability (ATEN_CPU_CAPABILITY=default
or avx2 forces a lower one). Nothing here, nor torch.utils.cpp_extension, passes -march=native, so
a wheel built on one machine runs on another.

Environment:
  DLFAST_NO_CUDA=1        build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    CUDA archs to build (default above)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import json
import os
import platform
import re
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

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
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9+PTX;9.0a"
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


def base_version() -> str:
    """dlfast.__version__, read from the source (importing dlfast would need dlfast._C)."""
    with open(os.path.join(ROOT, "dlfast", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def torch_release() -> tuple[int, int, bool]:
    """(major, minor, is a pre-release such as a nightly) of the torch being built against."""
    public = torch.__version__.split("+")[0]
    major, minor = re.match(r"(\d+)\.(\d+)", public).groups()
    return int(major), int(minor), re.search(r"[a-z]", public) is not None


def version(with_cuda: bool) -> str:
    """The base version with a local label naming the torch minor release and CUDA (or cpu)."""
    major, minor, _ = torch_release()
    variant = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return f"{base_version()}+torch{major}.{minor}.{variant}"


def torch_requirement() -> str:
    """The torch minor release the extension was built against (its C++ ABI holds only there)."""
    major, minor, pre = torch_release()
    # A nightly (2.14.0.dev...) sorts below 2.14, so only a pre-release lower bound admits it.
    return f"torch>={major}.{minor}{'.0.dev0' if pre else ''},<{major}.{minor + 1}"


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension(no_cuda_reason: str | None):
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
    ext_cls = CUDAExtension if with_cuda else CppExtension
    ext = ext_cls(
        "dlfast._C",
        sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    return ext, build_info(with_cuda, archs, no_cuda_reason)


def build_info(with_cuda: bool, archs: str, no_cuda_reason: str | None) -> dict:
    """What the extension is built against; dlfast.info() reports it."""
    return {
        "torch": torch.__version__,
        "torch_requirement": torch_requirement(),
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs.replace(";", " ").split() if with_cuda else [],
        "no_cuda_reason": no_cuda_reason,
        "cpu_isa_variants": [os.path.basename(p)[len("kernels_") : -len(".cpp")] for p in CPU_ISA_SOURCES],
    }


class BuildPyWithBuildInfo(build_py):
    """build_py that also writes dlfast/_build_info.py (BUILD_INFO): into the build directory for a
    wheel or an install, into the source tree only for an editable install (which imports dlfast
    from there), so building a wheel never rewrites what an editable install reports."""

    def run(self) -> None:
        super().run()
        package = os.path.join(ROOT if self.editable_mode else self.build_lib, "dlfast")
        os.makedirs(package, exist_ok=True)
        with open(os.path.join(package, "_build_info.py"), "w") as f:
            f.write('"""Written by setup.py at build time: what dlfast._C was built against."""\n\n')
            f.write(f"BUILD_INFO = {json.dumps(BUILD_INFO, indent=4)}\n".replace("null", "None"))


NO_CUDA_REASON = cuda_build_reason()
EXTENSION, BUILD_INFO = extension(NO_CUDA_REASON)
setup(
    version=version(with_cuda=NO_CUDA_REASON is None),
    install_requires=[torch_requirement(), "tqdm"],
    ext_modules=[EXTENSION],
    cmdclass={
        "build_py": BuildPyWithBuildInfo,
        "build_ext": BuildExtension.with_options(use_ninja=True),
    },
)
