# Turns csrc/cuda/attention.cu into host C++ for the emulator: the PTX wrappers are replaced by
# emulated ones, and <<<...>>> launches by emu::launch.
import re
import sys

src = open(sys.argv[1]).read()
start = src.index("__device__ __forceinline__ uint32_t smem_addr")
end = src.index("// Two floats rounded to T")
src = src[:start] + '#include "emu_ptx.inc"\n\n' + src[end:]
src, n = re.subn(
    r"(\w+(?:<[^<>;]*>)?)\s*<<<([^>]*)>>>\s*\((.*?)\);",
    lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});",
    src,
    flags=re.S,
)
assert n >= 2, n
open(sys.argv[2], "w").write(src)
