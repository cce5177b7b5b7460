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

}  // namespace cuda
}  // namespace dlfast
