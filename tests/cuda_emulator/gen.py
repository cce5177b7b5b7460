# Turns a csrc/cuda/*.cu file into host C++ for the emulator: the PTX wrappers of ptx.h are
# replaced by the emulated ones of emu_ptx.inc, <<<...>>> launches by emu::launch, and static
# __shared__ arrays by function statics, which every thread of the (one running) block shares.
# `extern __shared__` arrays name emu_ptx.inc's shared-memory array.
import re
import sys

src = open(sys.argv[1]).read()
src, n = re.subn(r'#include "ptx.h"\n', '#include "emu_ptx.inc"\n', src)
if n == 0:
    # A file without PTX wrappers still needs emu_ptx.inc's shared-memory array.
    src, n = re.subn(r'#include "launchers.h"\n', '#include "launchers.h"\n#include "emu_ptx.inc"\n', src)
assert n == 1, 'expected one #include "ptx.h" or "launchers.h"'
src, n = re.subn(
    r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);",
    lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});",
    src,
    flags=re.S,
)
assert n >= 2, n
src = re.sub(r"(?<!extern )__shared__", "static", src)
open(sys.argv[2], "w").write(src)
