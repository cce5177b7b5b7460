# dlfast: `make test` (what CI runs), `make bench`, `make cuda-check`, `make gpu-check`.
SHELL := /bin/bash
# Everything runs in a virtual environment built from this repository's own files.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
NVCC ?= nvcc
CUDA_ARCH_FLAGS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py
# On a GPU machine the torch already there is used; nothing is downloaded.
GPU_PY ?= python3
GPU_OUT ?= $(or $(OUT),build/gpu-check)

.PHONY: test test-python test-triton-interpreted cuda-check cuda-bindings-check cuda-emulate bench gpu-check gpu-tune lint clean \
	wheel wheel-check

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Exactly this torch (the CPU wheel on these machines); any other spec could pull CUDA builds.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet "setuptools>=64" wheel ninja pytest numpy "triton>=3.6" expecttest ruff tqdm scikit-learn matplotlib pytest-benchmark
	touch $@

# The editable install builds dlfast._C against the venv's torch (no build isolation, see setup.py).
$(VENV)/.built: $(VENV)/.deps $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.built

.PHONY: venv

test: lint test-python test-triton-interpreted cuda-check cuda-bindings-check cuda-emulate

test-python: $(VENV)/.built
	$(PY) -m pytest -q tests

# Triton kernels on the CPU: the interpreter must be switched on before triton is imported,
# hence a process of its own.
test-triton-interpreted: $(VENV)/.built
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests

# nvcc compiles every CUDA source for sm_80 and sm_90a; -Xptxas -v prints registers, spills
# and shared memory per kernel, so a spill shows up without a GPU.
cuda-check:
	@if ! command -v $(NVCC) >/dev/null 2>&1; then echo "cuda-check: nvcc not found, skipped"; exit 0; fi; \
	mkdir -p build/cuda-check; \
	for f in $(CUDA_SOURCES); do \
		echo "nvcc $$f"; \
		$(NVCC) -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas -v -Werror all-warnings $(CUDA_ARCH_FLAGS) \
			-c $$f -o build/cuda-check/$$(basename $$f .cu).o 2>&1 | tee build/cuda-check/$$(basename $$f .cu).log \
			| grep -E "error|spill|Used|Compiling" ; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done; \
	echo "cuda-check: $(words $(CUDA_SOURCES)) CUDA source(s) compiled for sm_80 and sm_90a"

# csrc/cuda_ops.cpp (the CUDA bindings) needs c10/cuda headers, which the CPU build of torch ships
# without the generated c10/cuda/impl/cuda_cmake_macros.h: with an empty stand-in for that one
# file, g++ type-checks the bindings against the installed torch, with no GPU and no CUDA torch.
cuda-bindings-check: $(VENV)/.deps
	@if test -z "$(CUDA_INCLUDE)"; then echo "cuda-bindings-check: CUDA headers not found, skipped"; exit 0; fi; \
	set -e; mkdir -p build/stub/c10/cuda/impl; echo '#pragma once' > build/stub/c10/cuda/impl/cuda_cmake_macros.h; \
	g++ -std=c++17 -fsyntax-only -Wall -Wno-c++20-extensions -Ibuild/stub \
		$$($(PY) -c 'from torch.utils import cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))') \
		-I$(CUDA_INCLUDE) -Icsrc csrc/cuda_ops.cpp; \
	echo "cuda-bindings-check: csrc/cuda_ops.cpp type-checks against torch $$($(PY) -c 'import torch; print(torch.__version__)')"

# The CUDA kernels (attention, conv2d_relu, layer_norm, ngram_counts) run on the CPU in a block emulator
# (tests/cuda_emulator/): each thread a fiber, warp collectives and the PTX wrappers (ldmatrix,
# mma, cp.async) in C++, every shared and global access bounds-checked, against a float64
# reference. Twice: cp.async copies landing at the last moment (shows a missing wait) and at
# issue (shows a buffer overwritten while still read). It needs the CUDA headers (cuda_fp16.h),
# not a GPU.
CUDA_INCLUDE ?= $(patsubst %/cuda_fp16.h,%,$(firstword $(wildcard $(CUDA_HOME)/include/cuda_fp16.h \
	/usr/local/cuda/include/cuda_fp16.h $(dir $(shell command -v $(NVCC) 2>/dev/null))../include/cuda_fp16.h)))
EMU_BUILD := build/cuda-emulate
EMU_KERNELS := attention conv2d_relu layer_norm ngram_counts
cuda-emulate:
	@if test -z "$(CUDA_INCLUDE)"; then echo "cuda-emulate: CUDA headers not found, skipped"; exit 0; fi; \
	set -e -o pipefail; mkdir -p $(EMU_BUILD); \
	for k in $(EMU_KERNELS); do \
		$(PYTHON) tests/cuda_emulator/gen.py csrc/cuda/$$k.cu $(EMU_BUILD)/$${k}_emulated.cpp; \
		g++ -std=c++17 -O2 -include tests/cuda_emulator/emu.h -I$(CUDA_INCLUDE) -Icsrc/cuda \
			-Itests/cuda_emulator -Wno-deprecated-declarations $(EMU_BUILD)/$${k}_emulated.cpp \
			tests/cuda_emulator/$${k}_test.cpp -o $(EMU_BUILD)/$${k}_test; \
		r=$$($(EMU_BUILD)/$${k}_test | tail -1) || { echo "$$k: $$r"; exit 1; }; echo "$$k: $$r"; \
		r=$$(EMU_EAGER=1 $(EMU_BUILD)/$${k}_test | tail -1) || { echo "$$k (EMU_EAGER=1): $$r"; exit 1; }; \
		echo "$$k (EMU_EAGER=1): $$r"; \
	done

# A wheel into $(DIST), built against the torch of $(WHEEL_PY): the venv's (torch $(TORCH_VERSION), CPU
# here) by default; `make wheel WHEEL_PY=python3` uses another Python's torch and, where that torch
# has CUDA and nvcc is found, builds the CUDA kernels too (TORCH_CUDA_ARCH_LIST, see setup.py).
# Its version label says which torch and CUDA it serves (0.1.0+torch2.13.cpu). build/lib.* goes
# first, so a module deleted from the source cannot linger in the wheel; build/temp.* (the
# compiled objects) stays, so ninja recompiles only what changed. The dlfast.egg-info the build
# leaves in the source root goes too: it would shadow the installed metadata (version, torch
# pin) of any Python started there.
WHEEL_PY ?= $(PY)
DIST ?= dist
wheel: $(if $(filter $(PY),$(WHEEL_PY)),$(VENV)/.deps)
	rm -rf build/lib.* build/bdist.*
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(WHEEL_PY) -m pip wheel --no-build-isolation --no-deps -w $(DIST) .
	rm -rf dlfast.egg-info

# The CPU wheel built, installed with its dependencies into a fresh venv (build/wheel-venv) and
# smoke-tested from outside the source tree: .ci/wheel_smoke.sh.
wheel-check:
	bash .ci/wheel_smoke.sh

# Every op benchmark and the model benchmarks on whatever device is here (the GPU when torch sees
# one), a JSON per op and per model into $(BENCH_OUT), then one report of them all there
# (report.md, report.json, the plots). BENCH_ARGS=--quick for a smoke run. A benchmark that fails
# does not stop the others or the report; the exit status says that it failed.
BENCH_OUT ?= build/bench/$(shell hostname)
BENCH_ARGS ?=
BENCH_MODELS ?= gpt resnet
bench: $(VENV)/.built
	@mkdir -p $(BENCH_OUT); status=0; \
	for op in $$($(PY) -c 'from dlfast.bench.runner import OPS; print(*OPS)'); do \
		echo "bench: $$op"; \
		$(PY) -m dlfast bench --op $$op $(BENCH_ARGS) --json $(BENCH_OUT)/$$op.json || status=1; \
	done; \
	for model in $(BENCH_MODELS); do \
		echo "bench: model $$model"; \
		$(PY) -m dlfast bench --model $$model $(BENCH_ARGS) --json $(BENCH_OUT)/model-$$model.json || status=1; \
	done; \
	$(MAKE) --no-print-directory bench-report BENCH_OUT=$(BENCH_OUT) || status=1; \
	exit $$status

bench-report: $(VENV)/.built
	$(PY) -m dlfast.bench.report $(BENCH_OUT) --out $(BENCH_OUT) --title "Benchmark report: $(notdir $(BENCH_OUT))"

# The CPU kernels against PyTorch at the course models' sizes (benchmarks/test_cpu_kernels.py,
# well under a minute), each case's dlfast/torch time ratio against the committed baseline's: it
# fails when one got more than BENCH_CPU_FACTOR times worse, and writes the comparison to
# $(BENCH_CPU_OUT). UPDATE_BASELINE=1 makes this run the baseline (commit it with the change
# that moved it).
BENCH_CPU_BASELINE := benchmarks/results/cpu-epyc-2core-avx512/pytest-benchmark-baseline.json
BENCH_CPU_OUT := build/bench-cpu-regression
BENCH_CPU_FACTOR ?= 1.5
bench-cpu-regression: $(VENV)/.built
	mkdir -p $(BENCH_CPU_OUT)
	$(PY) -m pytest -q -p no:cacheprovider benchmarks/test_cpu_kernels.py --benchmark-json $(BENCH_CPU_OUT)/run.json
	$(PY) -m dlfast.bench.report --regression $(BENCH_CPU_OUT)/run.json --baseline $(BENCH_CPU_BASELINE) \
		--factor $(BENCH_CPU_FACTOR) --stat min --out $(BENCH_CPU_OUT) $(if $(filter 1,$(UPDATE_BASELINE)),--update-baseline)

.PHONY: bench-report bench-cpu-regression

lint: $(VENV)/.deps
	$(PY) -m ruff check dlfast triton_kernels tests benchmarks setup.py
	$(PY) -m ruff format --check dlfast triton_kernels tests benchmarks setup.py

# On a GPU machine (no network): dlfast built with CUDA and installed (editable, no downloads)
# into the python already there, whose torch, triton and pytest it uses (a venv made from a venv
# would not see them); then the whole suite on the GPU and the benchmark. Logs and results go to
# $(GPU_OUT); the exit status is the test suite's.
# Only the present GPU's arch is built (sm_90a on an H100/H200), to spend device time on tests.
GPU_ARCH_PY := import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}" + ("a" if m == 9 else ""))
gpu-check:
	mkdir -p $(GPU_OUT)
	set -o pipefail; export TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-$$($(GPU_PY) -c '$(GPU_ARCH_PY)')}; \
	MAX_JOBS=$${MAX_JOBS:-16} $(GPU_PY) -m pip install --no-index --no-deps \
		--no-build-isolation -e . 2>&1 | tee $(GPU_OUT)/build.log
	$(GPU_PY) -m dlfast info | tee $(GPU_OUT)/info.txt
	set -o pipefail; $(GPU_PY) -m pytest -q -rs tests 2>&1 | tee $(GPU_OUT)/pytest.log; status=$$?; \
	$(GPU_PY) -m dlfast bench --device cuda --json $(GPU_OUT)/bench.json 2>&1 | tee $(GPU_OUT)/bench.log; \
	exit $$status

# The Triton attention tile sweep (dlfast/bench/tune.py) on the GPU, after gpu-check built the
# package: a JSON and a log per kernel in $(GPU_OUT)/tune/. TUNE_KERNELS picks some (a few
# minutes each on an H100), TUNE_ARGS passes more options (--head-dim 128, --seq 8192).
TUNE_KERNELS ?= fwd dkdv dq
TUNE_ARGS ?=
gpu-tune:
	mkdir -p $(GPU_OUT)/tune
	set -o pipefail; for k in $(TUNE_KERNELS); do \
		$(GPU_PY) -m dlfast.bench.tune --kernel $$k $(TUNE_ARGS) --json $(GPU_OUT)/tune/attention-$$k.json \
			2>&1 | tee $(GPU_OUT)/tune/attention-$$k.log || exit 1; \
	done

clean:
	rm -rf build dist *.egg-info dlfast/_C*.so dlfast/_build_info.py
