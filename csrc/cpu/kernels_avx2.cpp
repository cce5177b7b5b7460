// The CPU kernels for AVX2 + FMA CPUs, selected at run time by cpu_isa().
// setuptools has no per-file compiler flags, so instead of -mavx2 this file sets the
// target by pragma; GCC's pragma does not define the ISA macros that ATen's and
// Sleef's headers test, so they are defined here as -mavx2 -mfma -mf16c would.
#include "isa_prelude.h"  // first: see there why
#pragma GCC target("avx,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "layer_norm_kernel.h"
#include "attention_kernel.h"
#include "conv2d_relu_kernel.h"
#include "ngram_counts_kernel.h"
