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

}  // namespace cuda
}  // namespace dlfast
