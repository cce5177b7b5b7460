// The CPU kernels of every op, on raw pointers, compiled once per instruction set
// (kernels_<isa>.cpp) and chosen at run time: a wheel built here must still run on
// a CPU without AVX2 or AVX-512, so no ISA is assumed at build time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace dlfast::cpu {

// x, y: (M, N) row-major; weight, bias: (N,) or nullptr, in x's dtype.
// mean, rstd: (M,) in the accumulation type (float, or double for double input).
struct LayerNormFwdArgs {
  const void* x;
  const void* weight;
  const void* bias;
  void* y;
  void* mean;
  void* rstd;
  int64_t M;
  int64_t N;
  double eps;
  c10::ScalarType dtype;
  bool stream_y;  // write y with non-temporal stores (see layer_norm.cpp)
};

// dy, x, dx: (M, N) row-major; weight: (N,) or nullptr; mean, rstd: (M,) from the
// forward; dweight, dbias: (N,) in x's dtype, or nullptr when not wanted.
struct LayerNormBwdArgs {
  const void* dy;
  const void* x;
  const void* weight;
  const void* mean;
  const void* rstd;
  void* dx;
  void* dweight;
  void* dbias;
  int64_t M;
  int64_t N;
  c10::ScalarType dtype;
  bool stream_dx;  // write dx with non-temporal stores (see layer_norm.cpp)
};

// What both attention passes take (csrc/dlfast.cpp states the semantics). q: (B, H, Lq, D);
// k, v: (B, Hkv, Lk, D), Hkv dividing H; key_padding_mask: (B, Lk), True = attend, or nullptr.
// seed: the 64-bit Philox key, read only when dropout_p > 0.
struct AttentionParams {
  int64_t B;
  int64_t H;
  int64_t Hkv;
  int64_t Lq;
  int64_t Lk;
  int64_t D;
  const bool* key_padding_mask;
  bool causal;
  int64_t causal_shift;
  double scale;
  double dropout_p;
  uint64_t seed;
};

// All (B, heads, L, D) tensors contiguous in the dtype `dtype`; lse: (B, H, Lq) in the
// accumulation type (float, or double for double input).
struct AttentionFwdArgs {
  AttentionParams params;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;
  c10::ScalarType dtype;
};

// dout, out, dq: (B, H, Lq, D); dk, dv: (B, Hkv, Lk, D); lse from the forward.
struct AttentionBwdArgs {
  AttentionParams params;
  const void* dout;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* lse;
  void* dq;
  void* dk;
  void* dv;
  c10::ScalarType dtype;
};

// Backward of Conv2d + ReLU for few input channels per group (conv2d_relu.cpp routes here when
// C / groups is at most kConv2dDirectBwdMaxCg). x, dy, y (the forward's output): NCHW contiguous
// in `dtype`; weight: (K, C / groups, R, S) contiguous float32. Outputs, each nullptr when not
// wanted: dx NCHW contiguous in `dtype`; dweight (K, C / groups, R, S) and dbias (K,) float32.
struct Conv2dReluBwdArgs {
  const void* x;
  const void* dy;
  const void* y;
  const float* weight;
  void* dx;
  float* dweight;
  float* dbias;
  int64_t N, C, H, W, K, R, S, P, Q, groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  c10::ScalarType dtype;
};

// The block check of n-gram counting over n tokens (uint8, int16, int32 or int64 ids): whether
// every one is in [0, V) or is ignore_index (when has_ignore), written to *valid, and whether
// any is ignore_index, to *has_ignored.
struct TokensInVocabArgs {
  const void* tokens;
  int64_t n;
  int64_t V;
  bool has_ignore;
  int64_t ignore;
  c10::ScalarType dtype;
  bool* valid;
  bool* has_ignored;
};

// The bin of an n-gram that skip_ignored marks as containing ignore_index: no bin has it, as
// the op counts into at most 2^32 - 1 bins.
constexpr uint32_t kSkippedNgramBin = UINT32_MAX;

// The bins of `count` n-grams of n tokens (uint8, int16, int32 or int64 ids, each in [0, V) or
// ignore_index) starting at tokens[0], ..., tokens[count - 1]: bins[k] = ((t[k] V + t[k+1]) V
// + ...), V^n below 2^32, or kSkippedNgramBin with skip_ignored where the n-gram holds
// ignore_index (reads count + n - 1 tokens).
struct NgramBinsArgs {
  const void* tokens;
  int64_t count;
  uint32_t V;
  int n;
  bool skip_ignored;
  int64_t ignore;
  c10::ScalarType dtype;
  uint32_t* bins;
};

#define DLFAST_DECLARE_CPU_KERNELS(ISA)                             \
  namespace ISA {                                                   \
  void layer_norm_fwd(const LayerNormFwdArgs& args);                \
  void layer_norm_bwd(const LayerNormBwdArgs& args);                \
  void attention_fwd(const AttentionFwdArgs& args);                 \
  void attention_bwd(const AttentionBwdArgs& args);                 \
  void conv2d_relu_direct_bwd(const Conv2dReluBwdArgs& args);       \
  void tokens_in_vocab(const TokensInVocabArgs& args);              \
  void ngram_bins(const NgramBinsArgs& args);                       \
  }

DLFAST_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef DLFAST_X86
DLFAST_DECLARE_CPU_KERNELS(AVX2)
DLFAST_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef DLFAST_DECLARE_CPU_KERNELS

enum class Isa { DEFAULT, AVX2, AVX512 };

// The widest variant this CPU runs, as ATen decides it (so ATEN_CPU_CAPABILITY=avx2
// or =default also selects ours, which is how the tests reach every variant).
Isa cpu_isa();
const char* isa_name(Isa isa);

}  // namespace dlfast::cpu

// Calls the variant of kernel `fn` for this CPU.
#ifdef DLFAST_X86
#define DLFAST_CPU_DISPATCH(fn, args)                    \
  switch (::dlfast::cpu::cpu_isa()) {                    \
    case ::dlfast::cpu::Isa::AVX512:                     \
      ::dlfast::cpu::AVX512::fn(args);                   \
      break;                                             \
    case ::dlfast::cpu::Isa::AVX2:                       \
      ::dlfast::cpu::AVX2::fn(args);                     \
      break;                                             \
    default:                                             \
      ::dlfast::cpu::DEFAULT::fn(args);                  \
  }
#else
#define DLFAST_CPU_DISPATCH(fn, args) ::dlfast::cpu::DEFAULT::fn(args)
#endif
