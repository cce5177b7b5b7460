#!/usr/bin/env bash
# Builds the CPU wheel (`make wheel`, DLFAST_NO_CUDA=1) into build/wheel-dist, installs torch and
# then the wheel with its dependencies into a fresh venv (build/wheel-venv), and runs
# .ci/wheel_smoke.py and `python -m dlfast info` from a temporary directory, so that `import dlfast`
# can only find the installed wheel. Called by .ci/run after `make test`, and by `make wheel-check`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DIST=build/wheel-dist
WHEEL_VENV=build/wheel-venv
start=$SECONDS
stamp() { echo "wheel-check: $1 ($((SECONDS - start)) s)"; }

# 1. The wheel, against the dev venv's torch. Objects under build/temp.* from an earlier wheel
# build are reused by ninja; a fresh clone compiles everything (about 1.5 minutes on 2 cores).
mkdir -p build
rm -rf "$DIST"
DLFAST_NO_CUDA=1 make --no-print-directory wheel DIST="$DIST" >build/wheel-build.log 2>&1 ||
	{ tail -50 build/wheel-build.log; exit 1; }
wheels=("$DIST"/dlfast-*.whl)
test ${#wheels[@]} -eq 1 && test -f "${wheels[0]}" || { echo "wheel-check: expected one wheel in $DIST, found ${wheels[*]}"; exit 1; }
wheel=${wheels[0]}
stamp "built $(basename "$wheel"), $(du -h "$wheel" | cut -f1)"

# 2. Portable CPU code: no compile command of the wheel's build may tune for the build machine's
# CPU; the AVX2 and AVX-512 kernels get their ISA from #pragma GCC target in their own files.
ninja_files=(build/temp.*/build.ninja)
test -f "${ninja_files[0]}" || { echo "wheel-check: no build.ninja under build/temp.*"; exit 1; }
if grep -nE -- '-march|-mtune|-mcpu|-mavx|-mfma|-msse4|-mf16c' "${ninja_files[@]}"; then
	echo "wheel-check: an ISA flag above would make the wheel's CPU code unportable"
	exit 1
fi
stamp "no -march/-mavx/... flag in ${ninja_files[*]}"

# 3. A fresh venv: torch first (exactly this spec: anything looser could pull CUDA builds), then
# the wheel with its dependencies, which resolve against that torch (tqdm comes from PyPI).
rm -rf "$WHEEL_VENV"
"$PYTHON" -m venv "$WHEEL_VENV"
{ "$WHEEL_VENV/bin/python" -m pip install "torch==$TORCH_VERSION" &&
	"$WHEEL_VENV/bin/python" -m pip install "$wheel"; } >build/wheel-install.log 2>&1 ||
	{ tail -50 build/wheel-install.log; exit 1; }
stamp "installed into $WHEEL_VENV: $("$WHEEL_VENV/bin/python" -m pip list 2>/dev/null |
	grep -E '^(dlfast|torch|tqdm) ' | tr -s ' ' | paste -sd, -)"

# 4. The smoke test, copied to and run from a directory outside the source tree, so nothing of
# the repository is on sys.path.
smoke_dir=$(mktemp -d)
trap 'rm -rf "$smoke_dir"' EXIT
cp .ci/wheel_smoke.py "$smoke_dir/"
(cd "$smoke_dir" && env -u PYTHONPATH "$ROOT/$WHEEL_VENV/bin/python" -m dlfast info &&
	env -u PYTHONPATH "$ROOT/$WHEEL_VENV/bin/python" wheel_smoke.py)
stamp "passed"
