// The CPU kernels for AVX-512 CPUs (the F, BW, VL and DQ subsets ATen's AVX512 level
// requires), selected at run time by cpu_isa(). See kernels_avx2.cpp for why the ISA
// is set by pragma and macros.
#include "isa_prelude.h"  // first: see there why
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "layer_norm_kernel.h"
#include "attention_kernel.h"
#include "conv2d_relu_kernel.h"
#include "ngram_counts_kernel.h"
