"""What a wheel of dlfast promises, checked on the build installed here.

- Its version's local label and its torch requirement name the torch (and CUDA) that dlfast._C was
  built against (setup.py computes both).
- Under another torch minor release dlfast._C is not loaded, `import dlfast` still works, and
  dlfast.info() names both torches.
- The CPU kernels run on any x86-64: the ISA variant is chosen at run time, the baseline one
  runs every CPU op, and only the AVX2 / AVX-512 builds contain AVX instructions.

.ci/wheel_smoke.sh builds a real wheel, installs it into a fresh venv and tests it from outside
the source tree.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_on_cpu_isa
from packaging.requirements import Requirement

import dlfast
from dlfast import backends

BUILD_INFO = pytest.importorskip("dlfast._build_info").BUILD_INFO
needs_extension = pytest.mark.skipif(
    backends.EXTENSION_ERROR is not None, reason=f"dlfast._C did not load: {backends.EXTENSION_ERROR}"
)
X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_version_label_and_torch_pin_name_the_build():
    major, minor = (int(part) for part in BUILD_INFO["torch"].split(".")[:2])
    variant = "cu" + BUILD_INFO["cuda"].replace(".", "") if BUILD_INFO["cuda"] else "cpu"
    assert importlib.metadata.version("dlfast") == f"{dlfast.__version__}+torch{major}.{minor}.{variant}"
    pins = [Requirement(r) for r in importlib.metadata.requires("dlfast")]
    torch_pins = [r.specifier for r in pins if r.name == "torch" and r.marker is None]
    assert torch_pins == [Requirement(BUILD_INFO["torch_requirement"]).specifier]
    # The pin admits the torch running and no other minor release.
    pin = torch_pins[0]
    assert pin.contains(torch.__version__.split("+")[0], prereleases=True)
    assert not pin.contains(f"{major}.{minor + 1}.0") and not pin.contains(f"{major}.{minor - 1}.9")


# Run in a fresh process that poses as torch 2.0: dlfast must not load its extension there.
MISMATCH_SCRIPT = """
import sys
import torch
torch.__version__ = "2.0.0"
import dlfast
from dlfast._build_info import BUILD_INFO

reason = dlfast.info()["extension"]
expected = f"not loaded: dlfast._C was built against torch {BUILD_INFO['torch']}, torch 2.0.0 is running"
assert reason.startswith(expected), reason
assert BUILD_INFO["torch_requirement"] in reason, reason
assert "dlfast._C" not in sys.modules
assert "cpu" not in dlfast.available_backends()
x = torch.randn(4, 8)
torch.testing.assert_close(dlfast.layer_norm(x, 8), torch.nn.functional.layer_norm(x, (8,)))
try:
    dlfast.layer_norm(x, 8, backend="cpu")
except dlfast.BackendUnavailableError as e:
    assert "built against torch" in str(e), e
else:
    raise AssertionError("backend='cpu' ran without its extension")
"""


def test_other_torch_minor_release_is_explained_not_loaded(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", MISMATCH_SCRIPT], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


@needs_extension
def test_cpu_kernel_variant_follows_atens_capability():
    from dlfast import _C

    expected = {"AVX512": "AVX512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(), "DEFAULT")
    assert _C.cpu_isa == expected
    assert dlfast.info()["cpu_kernels"] == expected
    assert expected.lower() in BUILD_INFO["cpu_isa_variants"]


# The baseline build runs every CPU op and drop-in layer, forward and backward, with the checks of
# the wheel smoke test (.ci/wheel_smoke.py; the conv's 3 input channels take the direct kernel,
# which has one build per ISA too). run_on_cpu_isa runs it from the repository root.
BASELINE_SCRIPT = """
import sys
sys.path.insert(0, ".ci")
import dlfast
import wheel_smoke

assert dlfast.info()["cpu_kernels"] == "DEFAULT"
wheel_smoke.check_ops("cpu")
wheel_smoke.check_layers("cpu")
"""


@needs_extension
@pytest.mark.skipif(not X86, reason="the ISA variants are x86-64 only")
def test_baseline_cpu_kernels_run_every_op():
    run_on_cpu_isa("default", BASELINE_SCRIPT)


# An AVX instruction: a VEX/EVEX mnemonic (v..., except the ancient verr/verw) or a ymm, zmm or
# mask register operand.
AVX_INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+(?:v(?!err|erw)\w+|\S+\s.*%(?:[yz]mm\d|k[0-7]))")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")


@needs_extension
@pytest.mark.skipif(not X86, reason="the ISA variants are x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_avx_instructions_only_in_the_isa_builds():
    """No function outside the AVX2 / AVX-512 builds (namespaces dlfast::cpu::AVX2, at::vec::AVX512,
    ...) holds an AVX instruction, so the baseline path cannot fault on a CPU without AVX; such a
    leak would come from an -m flag or an inline function emitted under a target pragma."""
    from dlfast import _C

    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    function, isa_functions, leaks = None, set(), set()
    for line in listing.splitlines():
        header = FUNCTION.match(line)
        if header:
            function = header.group(1)
        elif function is not None and AVX_INSTRUCTION.match(line):
            (isa_functions if re.search(r"\bAVX(2|512)\b", function) else leaks).add(function)
    assert isa_functions, "no AVX instruction at all: are the AVX2 / AVX-512 builds missing?"
    assert not leaks, f"AVX instructions outside the ISA builds: {sorted(leaks)[:10]}"
