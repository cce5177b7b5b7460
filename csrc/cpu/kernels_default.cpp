// The CPU kernels for any CPU of the build architecture (baseline ISA). Listed first
// among the kernel files in setup.py, so where an inline function is emitted by
// several variants the linker keeps this baseline copy.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "layer_norm_kernel.h"
#include "attention_kernel.h"
#include "conv2d_relu_kernel.h"
#include "ngram_counts_kernel.h"
