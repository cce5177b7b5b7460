// Launchers for dlfast's CUDA kernels: raw device pointers and a cudaStream_t, no torch types,
// so the kernels compile with plain nvcc and the bindings (csrc/cuda_ops.cpp) stay thin.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace dlfast {
namespace cuda {

// Element type of every tensor argument whose type is not spelled out (x, weight, bias, y, dy, dx,
// dweight, dbias). Statistics (mean, rstd) and workspaces are always float32.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Widest row the LayerNorm launchers accept (they return cudaErrorInvalidValue past it): column
// indices inside the kernels are 32-bit. Row counts and M * N are 64-bit.
constexpr int64_t kLayerNormMaxN = int64_t(1) << 30;

// LayerNorm forward over the last dimension of a row-major (M, N) matrix, fp32 statistics.
// All pointers are device pointers on the current device; work is queued on `stream`.
// Returns the first CUDA error seen (cudaErrorInvalidValue for bad sizes), else cudaSuccess.
cudaError_t layer_norm_fwd(const void* x,       // (M, N) dtype, contiguous
                           const void* weight,  // (N,) dtype, or nullptr: gamma = 1
                           const void* bias,    // (N,) dtype, or nullptr: beta = 0
                           void* y,             // (M, N) dtype, contiguous, written
                           float* mean,         // (M,) written
                           float* rstd,         // (M,) written: 1 / sqrt(biased var + eps)
                           int64_t M, int64_t N, float eps, DType dtype, cudaStream_t stream);

// Bytes of scratch that layer_norm_bwd needs on the current device: per-block fp32 partial sums of
// dweight / dbias (at most 2 * num_SMs blocks, each N floats per wanted gradient) plus two fp32
// coefficients per row for the wide-row path. Depends only on (M, N, flags) and the SM count, so
// callers can allocate it from their own (caching) allocator before calling layer_norm_bwd.
size_t layer_norm_bwd_workspace_bytes(int64_t M, int64_t N, bool weight_grad, bool bias_grad);

// LayerNorm backward. dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)) with g = dy * weight,
// xhat = (x - mean) * rstd; dweight = sum over rows of dy * xhat; dbias = sum over rows of dy.
// dweight / dbias are reduced in a fixed order (no atomics): bitwise reproducible run to run.
// Returns cudaErrorInvalidValue when the workspace is smaller than layer_norm_bwd_workspace_bytes
// or not 16-byte aligned.
cudaError_t layer_norm_bwd(const void* dy,       // (M, N) dtype, contiguous
                           const void* x,        // (M, N) dtype, contiguous: the forward input
                           const void* weight,   // (N,) dtype, or nullptr: gamma = 1
                           const float* mean,    // (M,) from layer_norm_fwd
                           const float* rstd,    // (M,) from layer_norm_fwd
                           void* dx,             // (M, N) dtype, contiguous, written
                           void* dweight,        // (N,) dtype written, or nullptr: not wanted
                           void* dbias,          // (N,) dtype written, or nullptr: not wanted
                           void* workspace,      // layer_norm_bwd_workspace_bytes(...) bytes
                           size_t workspace_bytes, int64_t M, int64_t N, DType dtype,
                           cudaStream_t stream);

// Sizes and options of one attention call, as in the attention_fwd / attention_bwd schemas
// (csrc/dlfast.cpp), which define the masking, causal_shift, dropout and lse semantics.
struct AttentionConfig {
  int64_t batch;         // B
  int64_t heads;         // H: query heads
  int64_t kv_heads;      // Hkv: key/value heads, dividing H (query head h reads h / (H / Hkv))
  int64_t q_len;         // Lq
  int64_t k_len;         // Lk
  int64_t head_dim;      // D: a multiple of 8 in [16, 256]
  bool causal;           // query i attends key j only if j <= i + causal_shift
  int64_t causal_shift;  // any value; 0 aligns the diagonal top-left, Lk - Lq bottom-right
  double scale;          // scores = scale * q.k
  double dropout_p;      // in [0, 1); 0 = no dropout
};

// Longest Lq and Lk the attention launchers accept (65535 blocks of 64 rows on a grid axis);
// they return cudaErrorInvalidValue past it or for any other config outside the ranges above.
constexpr int64_t kAttentionMaxSeqLen = int64_t(65535) * 64;

// Dynamic shared memory per block that the attention kernels need for this head dim (0 when it
// is out of range): a device whose opt-in limit is smaller cannot run them.
size_t attention_smem_bytes(int64_t head_dim);

// Attention forward for fp16 / bf16 (dtype Float32 returns cudaErrorInvalidValue). All tensors
// contiguous with 16-byte aligned data; all pointers device pointers on the current device.
cudaError_t attention_fwd(const void* q,                    // (B, H, Lq, D) dtype
                          const void* k,                    // (B, Hkv, Lk, D) dtype
                          const void* v,                    // (B, Hkv, Lk, D) dtype
                          const uint8_t* key_padding_mask,  // (B, Lk) bool, nonzero = attend,
                                                            // or nullptr
                          const int64_t* seed,              // 0-dim dropout seed, or nullptr
                                                            // when dropout_p == 0
                          void* out,                        // (B, H, Lq, D) dtype, written
                          float* lse,                       // (B, H, Lq) written: natural-log
                                                            // logsumexp, +inf for a row with
                                                            // no allowed key
                          const AttentionConfig& config, DType dtype, cudaStream_t stream);

// Attention backward: always deterministic (every gradient element is written once, in a
// fixed summation order). Same layout rules as attention_fwd.
cudaError_t attention_bwd(const void* dout,                 // (B, H, Lq, D) dtype
                          const void* q,                    // (B, H, Lq, D) dtype
                          const void* k,                    // (B, Hkv, Lk, D) dtype
                          const void* v,                    // (B, Hkv, Lk, D) dtype
                          const void* out,                  // (B, H, Lq, D) dtype, forward out
                          const float* lse,                 // (B, H, Lq) from attention_fwd
                          const uint8_t* key_padding_mask,  // (B, Lk) bool, or nullptr
                          const int64_t* seed,              // the forward's seed, or nullptr
                          void* dq,                         // (B, H, Lq, D) dtype, written
                          void* dk,                         // (B, Hkv, Lk, D) dtype, written
                          void* dv,                         // (B, Hkv, Lk, D) dtype, written
                          float* delta,                     // (B, H, Lq) scratch, overwritten
                          const AttentionConfig& config, DType dtype, cudaStream_t stream);

// Sizes of one Conv2d + bias + ReLU call, as in the conv2d_relu_fwd / conv2d_relu_bwd schemas
// (csrc/dlfast.cpp). The output is (N, K, P, Q) with P = (H + 2 pad_h - dil_h (R - 1) - 1) /
// stride_h + 1 and Q likewise (conv2d_out_size).
struct Conv2dConfig {
  int64_t batch;         // N >= 0
  int64_t in_channels;   // C, a multiple of groups
  int64_t height;        // H
  int64_t width;         // W
  int64_t out_channels;  // K, a multiple of groups
  int64_t kernel_h;      // R
  int64_t kernel_w;      // S
  int64_t stride_h, stride_w;  // >= 1
  int64_t pad_h, pad_w;        // >= 0, symmetric
  int64_t dil_h, dil_w;        // >= 1
  int64_t groups;              // G >= 1
};

// Every size, channel count, per-image pixel count (H W, P Q) and per-group reduction length
// (R S C / G, R S K / G) must be at most this (the kernels index within one image and one
// filter in 32 bits, across the batch in 64), and x, y and the weight must have fewer than 2^40
// elements; the launchers return cudaErrorInvalidValue otherwise.
constexpr int64_t kConv2dMaxDim = (int64_t(1) << 31) - 1;
constexpr int64_t kConv2dMaxElements = int64_t(1) << 40;

// P or Q for an input extent, kernel extent, stride, padding and dilation; < 1 when the kernel
// does not fit.
inline int64_t conv2d_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                               int64_t dil) {
  return (in + 2 * pad - dil * (kernel - 1) - 1) / stride + 1;
}

// Conv2d + bias + ReLU forward. With C / G > 4 and K / G > 4 an implicit GEMM: on tensor cores
// for fp16 / bf16 (16-byte loads when C / G % 8 == 0 and x, weight are 16-byte aligned), fp32
// FMA for fp32 (no TF32); depthwise and smaller channel counts a direct convolution. fp32
// accumulation everywhere. Returns cudaErrorInvalidValue for a config outside the ranges above.
cudaError_t conv2d_relu_fwd(const void* x,       // (N, H, W, C) dtype, contiguous (NHWC)
                            const void* weight,  // (K, R, S, C / G) dtype, contiguous
                            const void* bias,    // (K,) dtype, or nullptr: no bias
                            void* y,             // (N, P, Q, K) dtype, contiguous, written
                            const Conv2dConfig& config, DType dtype, cudaStream_t stream);

// Bytes of scratch that conv2d_relu_bwd needs for these wanted gradients: a transposed copy of
// the weight for the tensor-core dx path and fp32 per-split partial sums of dweight / dbias.
// A function of the arguments only (not of the device), so the split order, and with it every
// bit of dweight and dbias, is the same on every GPU.
size_t conv2d_relu_bwd_workspace_bytes(const Conv2dConfig& config, DType dtype, bool dx_wanted,
                                       bool dweight_wanted, bool dbias_wanted);

// Conv2d + bias + ReLU backward with g = (y > 0 ? dy : 0), applied as dy is read:
// dx = conv_transpose(g, weight), dweight = correlation of g with x, dbias = sum of g over
// (N, P, Q). dx runs as an implicit GEMM when C / G and K / G > 4 (tensor cores for fp16 /
// bf16), dweight on tensor cores for fp16 / bf16 with K / G > 4; everything else on the CUDA
// cores, always with fp32 accumulation. Deterministic (fixed-order
// reductions, no atomics). A gradient whose pointer is nullptr is not computed, and then x
// (without dweight) and weight (without dx) may be nullptr too. Returns cudaErrorInvalidValue
// when the workspace is smaller than conv2d_relu_bwd_workspace_bytes or not 16-byte aligned.
cudaError_t conv2d_relu_bwd(const void* dy,      // (N, P, Q, K) dtype, contiguous
                            const void* y,       // (N, P, Q, K) dtype, contiguous: forward out
                            const void* x,       // (N, H, W, C) dtype, contiguous
                            const void* weight,  // (K, R, S, C / G) dtype, contiguous
                            void* dx,            // (N, H, W, C) dtype written, or nullptr
                            void* dweight,       // (K, R, S, C / G) dtype written, or nullptr
                            void* dbias,         // (K,) dtype written, or nullptr
                            void* workspace,     // conv2d_relu_bwd_workspace_bytes(...) bytes
                            size_t workspace_bytes, const Conv2dConfig& config, DType dtype,
                            cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// N-gram counting (ngram_counts_ in csrc/dlfast.cpp)

// Element type of the token tensor.
enum class TokenDType : int { UInt8 = 0, Int16 = 1, Int32 = 2, Int64 = 3 };

// Adds into `counts` how often each n-gram of adjacent tokens of a row occurs: the n-gram
// (t0, ..., tn-1) adds 1 at ((t0 V + t1) V + ...) + tn-1; n-grams never cross rows. An n-gram
// containing ignore_index (when has_ignore) or a token outside [0, V) is skipped. Writes to
// *bad_position the smallest flat position (row * L + col) of a token outside [0, V) that is
// not ignore_index, or -1: on the device, no host synchronisation. Any alignment of `tokens`
// (of its element size). Returns cudaErrorInvalidValue for n outside 1..3, V < 1, negative
// sizes or V^n past int64.
cudaError_t ngram_counts(const void* tokens,     // (rows, L) dtype, contiguous
                         TokenDType dtype, int64_t rows, int64_t L, int64_t vocab_size, int n,
                         bool has_ignore, int64_t ignore_index,
                         int64_t* counts,        // (vocab_size^n,) contiguous, added to
                         int64_t* bad_position,  // 0-dim, written
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace dlfast
