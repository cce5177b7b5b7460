// LayerNorm forward and backward over the last dimension of a row-major (M, N) matrix.
//
// Forward: one group of TPR threads per row (a warp for narrow rows, a whole block for wide ones).
// The row lives in registers as packed 128-bit vectors, so mean and variance are computed in two
// passes over registers (exact two-pass variance, no E[x^2] - E[x]^2 cancellation) with one read of
// x from memory. Rows wider than the register budget take a looped path: a Welford pass over
// global memory, then a normalising pass.
//
// Backward: dx is row-parallel like the forward. dweight / dbias are column sums over all rows;
// each block (a persistent grid of at most 2 blocks per SM) keeps per-column fp32 partial sums in
// shared memory over the rows it visits, writes one partial row to a workspace, and a second
// kernel adds the partial rows in a fixed order. No floating-point atomics, so results are
// bitwise reproducible. Wide rows take a looped path: per-row coefficients first, then dx and the
// partials by column chunks.
//
// Only cuda_runtime / cuda_fp16 / cuda_bf16 here: the file compile-checks with plain nvcc.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "launchers.h"
#include "ptx.h"

namespace dlfast {
namespace cuda {
namespace {

// Column indices are int; the looped kernels add a few block strides to one before comparing it
// with N, hence the headroom below 2^31.
constexpr int64_t kMaxN = kLayerNormMaxN;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element conversions and packed vectors

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return bf16_to_float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements with the alignment of their total size, so one load or store of a Pack
// is a single 128-bit (or narrower, for VEC = 1) memory instruction. Kept packed in registers:
// half the registers of fp32 copies for 16-bit types.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ---------------------------------------------------------------------------------------------
// Reductions

// Butterfly: every lane adds the same operands in the same order, so all lanes end with bitwise
// the same sum (and therefore all threads of a row normalise with the same mean and rstd).
__device__ __forceinline__ float warp_allreduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the TPR threads (a multiple of 32) that share a row, returned to all of them.
// `slot` is TPR/32 floats private to this row. There is one __syncthreads() between its write and
// its read and none after: callers alternate between two slots, so a warp that races ahead to the
// next reduction writes the other slot, and reaches this one again only after a barrier that every
// reader of the current values has passed.
template <int TPR>
__device__ __forceinline__ float row_allreduce_sum(float v, float* slot) {
  static_assert(TPR % 32 == 0, "rows are shared by whole warps");
  v = warp_allreduce_sum(v);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int lane = threadIdx.x & 31;
    if (lane == 0) slot[(threadIdx.x % TPR) / 32] = v;
    __syncthreads();
    v = lane < kWarps ? slot[lane] : 0.f;
    v = warp_allreduce_sum(v);
  }
  return v;
}

// Two sums at once (one barrier instead of two); same slot discipline as row_allreduce_sum.
template <int TPR>
__device__ __forceinline__ void row_allreduce_sum2(float& a, float& b, float2* slot) {
  static_assert(TPR % 32 == 0, "rows are shared by whole warps");
  a = warp_allreduce_sum(a);
  b = warp_allreduce_sum(b);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int lane = threadIdx.x & 31;
    if (lane == 0) slot[(threadIdx.x % TPR) / 32] = make_float2(a, b);
    __syncthreads();
    const float2 v = lane < kWarps ? slot[lane] : make_float2(0.f, 0.f);
    a = warp_allreduce_sum(v.x);
    b = warp_allreduce_sum(v.y);
  }
}

// Chan et al.'s merge of (count, mean, M2) summaries; an empty right-hand side is a no-op so that
// idle lanes cannot turn an inf mean into NaN through inf * 0.
__device__ __forceinline__ void welford_merge(int& n, float& mean, float& m2, int n_b, float mean_b,
                                              float m2_b) {
  if (n_b == 0) return;
  const int n_ab = n + n_b;
  const float f = static_cast<float>(n_b) / static_cast<float>(n_ab);
  const float delta = mean_b - mean;
  mean += delta * f;
  m2 += m2_b + delta * delta * static_cast<float>(n) * f;
  n = n_ab;
}

// ---------------------------------------------------------------------------------------------
// Forward, row in registers. Block = RPB groups of TPR threads, one row per group at a time;
// thread `tid` of a group owns packs tid, tid + TPR, ... (coalesced across the group).

template <typename T, int VEC, int VPT, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    layer_norm_fwd_rows_kernel(const T* __restrict__ x,       // (M, N)
                               const T* __restrict__ weight,  // (N,) or nullptr
                               const T* __restrict__ bias,    // (N,) or nullptr
                               T* __restrict__ y,             // (M, N)
                               float* __restrict__ mean,      // (M,)
                               float* __restrict__ rstd,      // (M,)
                               int64_t M, int N, float eps) {
  using P = Pack<T, VEC>;
  __shared__ float red[2][RPB][TPR / 32];
  const int group = threadIdx.x / TPR;
  const int tid = threadIdx.x % TPR;
  const int nv = N / VEC;
  const float inv_n = 1.f / static_cast<float>(N);
  const P* wp = reinterpret_cast<const P*>(weight);
  const P* bp = reinterpret_cast<const P*>(bias);

  // The loop bound is the same for the whole block (barriers inside); `live` masks the groups of
  // the last, partial row batch.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * RPB; row0 < M;
       row0 += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = row0 + group;
    const bool live = row < M;
    const int64_t offset = (live ? row : 0) * N;
    const P* xr = reinterpret_cast<const P*>(x + offset);

    P xv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = tid + k * TPR;
      if (live && c < nv) xv[k] = xr[c];
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (live && tid + k * TPR < nv) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum += to_float(xv[k].v[i]);
      }
    }
    const float mu = row_allreduce_sum<TPR>(sum, red[0][group]) * inv_n;

    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (live && tid + k * TPR < nv) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = to_float(xv[k].v[i]) - mu;
          sq += d * d;
        }
      }
    }
    const float rs = rsqrtf(row_allreduce_sum<TPR>(sq, red[1][group]) * inv_n + eps);

    if (live && tid == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
    P* yr = reinterpret_cast<P*>(y + offset);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = tid + k * TPR;
      if (live && c < nv) {
        P w, b, out;
        if (wp != nullptr) w = wp[c];
        if (bp != nullptr) b = bp[c];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float v = (to_float(xv[k].v[i]) - mu) * rs;
          if (wp != nullptr) v *= to_float(w.v[i]);
          if (bp != nullptr) v += to_float(b.v[i]);
          out.v[i] = from_float<T>(v);
        }
        yr[c] = out;
      }
    }
  }
}

// Forward for rows too wide for registers: one block per row, Welford over global memory (one
// division per pack, not per element), then a second read to normalise. The second read
// may hit L2, but this path is for widths past the register budget, not for peak bandwidth.
template <typename T, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS)
    layer_norm_fwd_looped_kernel(const T* __restrict__ x,       // (M, N)
                                 const T* __restrict__ weight,  // (N,) or nullptr
                                 const T* __restrict__ bias,    // (N,) or nullptr
                                 T* __restrict__ y,             // (M, N)
                                 float* __restrict__ mean,      // (M,)
                                 float* __restrict__ rstd,      // (M,)
                                 int64_t M, int N, float eps) {
  using P = Pack<T, VEC>;
  constexpr int kUnroll = 4;  // packs in flight per thread
  constexpr int kWarps = THREADS / 32;
  __shared__ int red_n[kWarps];
  __shared__ float red_mean[kWarps];
  __shared__ float red_m2[kWarps];
  __shared__ float row_stats[2];
  const int nv = N / VEC;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const P* wp = reinterpret_cast<const P*>(weight);
  const P* bp = reinterpret_cast<const P*>(bias);

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const P* xr = reinterpret_cast<const P*>(x + row * N);
    int n = 0;
    float mu = 0.f, m2 = 0.f;
    for (int base = threadIdx.x; base < nv; base += THREADS * kUnroll) {
      P p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = base + u * THREADS;
        if (c < nv) p[u] = xr[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * THREADS < nv) {
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) s += to_float(p[u].v[i]);
          const float pm = s * (1.f / VEC);
          float pm2 = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float d = to_float(p[u].v[i]) - pm;
            pm2 += d * d;
          }
          welford_merge(n, mu, m2, VEC, pm, pm2);
        }
      }
    }
    // Tree to lane 0 of each warp, then warp 0 merges the warps; merge order is fixed.
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const int n_b = __shfl_down_sync(kFullMask, n, offset);
      const float mu_b = __shfl_down_sync(kFullMask, mu, offset);
      const float m2_b = __shfl_down_sync(kFullMask, m2, offset);
      if (lane + offset < 32) welford_merge(n, mu, m2, n_b, mu_b, m2_b);
    }
    if (lane == 0) {
      red_n[warp] = n;
      red_mean[warp] = mu;
      red_m2[warp] = m2;
    }
    __syncthreads();
    if (warp == 0) {
      n = lane < kWarps ? red_n[lane] : 0;
      mu = lane < kWarps ? red_mean[lane] : 0.f;
      m2 = lane < kWarps ? red_m2[lane] : 0.f;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        const int n_b = __shfl_down_sync(kFullMask, n, offset);
        const float mu_b = __shfl_down_sync(kFullMask, mu, offset);
        const float m2_b = __shfl_down_sync(kFullMask, m2, offset);
        if (lane + offset < 32) welford_merge(n, mu, m2, n_b, mu_b, m2_b);
      }
      if (lane == 0) {
        const float rs = rsqrtf(m2 / static_cast<float>(N) + eps);
        row_stats[0] = mu;
        row_stats[1] = rs;
        mean[row] = mu;
        rstd[row] = rs;
      }
    }
    // red_* are rewritten after this barrier, which warp 0 reaches only once it has read them;
    // row_stats is rewritten after the next row's first barrier, which its readers pass later.
    __syncthreads();
    mu = row_stats[0];
    const float rs = row_stats[1];

    P* yr = reinterpret_cast<P*>(y + row * N);
    for (int base = threadIdx.x; base < nv; base += THREADS * kUnroll) {
      P p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = base + u * THREADS;
        if (c < nv) p[u] = xr[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = base + u * THREADS;
        if (c < nv) {
          P w, b, out;
          if (wp != nullptr) w = wp[c];
          if (bp != nullptr) b = bp[c];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            float v = (to_float(p[u].v[i]) - mu) * rs;
            if (wp != nullptr) v *= to_float(w.v[i]);
            if (bp != nullptr) v += to_float(b.v[i]);
            out.v[i] = from_float<T>(v);
          }
          yr[c] = out;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, row in registers. Same thread layout as the forward; the block is a persistent
// worker over rows blockIdx.x * RPB, (blockIdx.x + gridDim.x) * RPB, ..., so each thread always
// sees the same columns and keeps their dweight / dbias partial sums across rows. Those sums live
// in shared memory, not registers: with x and dy held for the dx pass, two fp32 accumulators per
// element would need about 80 registers at 16 elements per thread and spill at the 64 that
// 1024 threads per SM allow.
//
// Shared-memory accumulators are thread-private until the final barrier. Chunk j (kAccW floats)
// of pack k of quantity q (0: dweight, 1: dbias) of thread tid in row group g is at float offset
//   (((q * RPB + g) * VPT + k) * kChunks + j) * TPR * kAccW + tid * kAccW,
// so a warp touches consecutive 16-byte (or 4-byte) words: no bank conflicts.
template <int VEC>
struct AccLayout {
  static constexpr int kAccW = VEC % 4 == 0 ? 4 : 1;  // floats per shared-memory access
  static constexpr int kChunks = VEC / kAccW;
};

template <int W>
__device__ __forceinline__ void smem_accumulate(float* p, const float* v) {
  if constexpr (W == 4) {
    float4 t = *reinterpret_cast<float4*>(p);
    t.x += v[0];
    t.y += v[1];
    t.z += v[2];
    t.w += v[3];
    *reinterpret_cast<float4*>(p) = t;
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) p[e] += v[e];
  }
}

// Dynamic shared memory of layer_norm_bwd_rows_kernel: two fp32 sums per element of a row group.
constexpr size_t bwd_rows_smem_bytes(int vec, int vpt, int tpr, int rpb) {
  return 2 * size_t(rpb) * tpr * vpt * vec * sizeof(float);
}

template <typename T, int VEC, int VPT, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB, (TPR * RPB <= 512 ? 2 : 1))
    layer_norm_bwd_rows_kernel(const T* __restrict__ dy,         // (M, N)
                               const T* __restrict__ x,          // (M, N)
                               const T* __restrict__ weight,     // (N,) or nullptr
                               const float* __restrict__ mean,   // (M,)
                               const float* __restrict__ rstd,   // (M,)
                               T* __restrict__ dx,               // (M, N)
                               float* __restrict__ partial_dw,   // (gridDim.x, N) or nullptr
                               float* __restrict__ partial_db,   // (gridDim.x, N) or nullptr
                               int64_t M, int N) {
  using P = Pack<T, VEC>;
  constexpr int kAccW = AccLayout<VEC>::kAccW;
  constexpr int kChunks = AccLayout<VEC>::kChunks;
  constexpr int kQuantityStride = RPB * VPT * kChunks * TPR * kAccW;  // floats per quantity
  extern __shared__ __align__(16) unsigned char smem[];  // 16-byte aligned for the chunk accesses
  float* acc = reinterpret_cast<float*>(smem);
  __shared__ float2 red[2][RPB][TPR / 32];
  const int group = threadIdx.x / TPR;
  const int tid = threadIdx.x % TPR;
  const int nv = N / VEC;
  const float inv_n = 1.f / static_cast<float>(N);
  const bool want = partial_dw != nullptr || partial_db != nullptr;
  const P* wp = reinterpret_cast<const P*>(weight);
  float* my_acc = acc + group * (VPT * kChunks * TPR * kAccW) + tid * kAccW;

#pragma unroll
  for (int k = 0; k < VPT * kChunks; ++k) {
#pragma unroll
    for (int e = 0; e < kAccW; ++e) {
      my_acc[k * TPR * kAccW + e] = 0.f;
      my_acc[kQuantityStride + k * TPR * kAccW + e] = 0.f;
    }
  }

  int parity = 0;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * RPB; row0 < M;
       row0 += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = row0 + group;
    const bool live = row < M;
    const int64_t offset = (live ? row : 0) * N;
    const P* xr = reinterpret_cast<const P*>(x + offset);
    const P* dyr = reinterpret_cast<const P*>(dy + offset);

    P xv[VPT], dv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = tid + k * TPR;
      if (live && c < nv) {
        xv[k] = xr[c];
        dv[k] = dyr[c];
      }
    }
    const float mu = live ? mean[row] : 0.f;
    const float rs = live ? rstd[row] : 0.f;

    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = tid + k * TPR;
      if (live && c < nv) {
        P w;
        if (wp != nullptr) w = wp[c];  // re-read in the dx pass (L1) rather than held
        float dwv[VEC], dbv[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (to_float(xv[k].v[i]) - mu) * rs;
          const float d = to_float(dv[k].v[i]);
          const float g = wp != nullptr ? d * to_float(w.v[i]) : d;
          sum_g += g;
          sum_gx += g * xh;
          dwv[i] = d * xh;
          dbv[i] = d;
        }
        if (want) {
#pragma unroll
          for (int j = 0; j < kChunks; ++j) {
            float* p = my_acc + (k * kChunks + j) * TPR * kAccW;
            smem_accumulate<kAccW>(p, dwv + j * kAccW);
            smem_accumulate<kAccW>(p + kQuantityStride, dbv + j * kAccW);
          }
        }
      }
    }
    row_allreduce_sum2<TPR>(sum_g, sum_gx, red[parity][group]);
    parity ^= 1;
    const float c1 = sum_g * inv_n;
    const float c2 = sum_gx * inv_n;

    P* dxr = reinterpret_cast<P*>(dx + offset);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = tid + k * TPR;
      if (live && c < nv) {
        P w, out;
        if (wp != nullptr) w = wp[c];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (to_float(xv[k].v[i]) - mu) * rs;
          const float d = to_float(dv[k].v[i]);
          const float g = wp != nullptr ? d * to_float(w.v[i]) : d;
          out.v[i] = from_float<T>(rs * (g - c1 - xh * c2));
        }
        dxr[c] = out;
      }
    }
  }
  if (!want) return;  // uniform across the block

  // This block's partial rows: the row groups' sums added in group order.
  __syncthreads();
  constexpr int kChunksPerQuantityGroup = VPT * kChunks * TPR;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    float* dst = q == 0 ? partial_dw : partial_db;
    if (dst == nullptr) continue;
    dst += static_cast<int64_t>(blockIdx.x) * N;
    for (int idx = threadIdx.x; idx < kChunksPerQuantityGroup; idx += TPR * RPB) {
      const int t = idx % TPR;
      const int kj = idx / TPR;  // k * kChunks + j
      const int c = t + (kj / kChunks) * TPR;
      if (c >= nv) continue;
      float s[kAccW];
#pragma unroll
      for (int e = 0; e < kAccW; ++e) s[e] = 0.f;
#pragma unroll
      for (int g = 0; g < RPB; ++g) {
        const float* p = acc + q * kQuantityStride + (g * kChunksPerQuantityGroup + idx) * kAccW;
#pragma unroll
        for (int e = 0; e < kAccW; ++e) s[e] += p[e];
      }
      float* out = dst + c * VEC + (kj % kChunks) * kAccW;
      if constexpr (kAccW == 4) {
        *reinterpret_cast<float4*>(out) = make_float4(s[0], s[1], s[2], s[3]);
      } else {
#pragma unroll
        for (int e = 0; e < kAccW; ++e) out[e] = s[e];
      }
    }
  }
}

// Backward for rows too wide for registers, step 1: per-row coefficients
// coef[row] = (mean_j(g), mean_j(g * xhat)), one block per row.
template <typename T, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS)
    layer_norm_bwd_coef_kernel(const T* __restrict__ dy,        // (M, N)
                               const T* __restrict__ x,         // (M, N)
                               const T* __restrict__ weight,    // (N,) or nullptr
                               const float* __restrict__ mean,  // (M,)
                               const float* __restrict__ rstd,  // (M,)
                               float2* __restrict__ coef,       // (M,)
                               int64_t M, int N) {
  using P = Pack<T, VEC>;
  constexpr int kUnroll = 4;
  __shared__ float2 red[2][THREADS / 32];
  const int nv = N / VEC;
  const float inv_n = 1.f / static_cast<float>(N);
  const P* wp = reinterpret_cast<const P*>(weight);
  int parity = 0;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const P* xr = reinterpret_cast<const P*>(x + row * N);
    const P* dyr = reinterpret_cast<const P*>(dy + row * N);
    const float mu = mean[row];
    const float rs = rstd[row];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int base = threadIdx.x; base < nv; base += THREADS * kUnroll) {
      P xv[kUnroll], dv[kUnroll], wv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = base + u * THREADS;
        if (c < nv) {
          xv[u] = xr[c];
          dv[u] = dyr[c];
          if (wp != nullptr) wv[u] = wp[c];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * THREADS < nv) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float xh = (to_float(xv[u].v[i]) - mu) * rs;
            const float d = to_float(dv[u].v[i]);
            const float g = wp != nullptr ? d * to_float(wv[u].v[i]) : d;
            sum_g += g;
            sum_gx += g * xh;
          }
        }
      }
    }
    row_allreduce_sum2<THREADS>(sum_g, sum_gx, red[parity]);
    parity ^= 1;
    if (threadIdx.x == 0) coef[row] = make_float2(sum_g * inv_n, sum_gx * inv_n);
  }
}

// Backward for wide rows, step 2: block (bx, by) owns packs bx * THREADS + threadIdx.x of the rows
// by, by + gridDim.y, ...; writes dx there and its dweight / dbias partial row `by`. No barriers.
template <typename T, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS)
    layer_norm_bwd_cols_kernel(const T* __restrict__ dy,          // (M, N)
                               const T* __restrict__ x,           // (M, N)
                               const T* __restrict__ weight,      // (N,) or nullptr
                               const float* __restrict__ mean,    // (M,)
                               const float* __restrict__ rstd,    // (M,)
                               const float2* __restrict__ coef,   // (M,) from the coef kernel
                               T* __restrict__ dx,                // (M, N)
                               float* __restrict__ partial_dw,    // (gridDim.y, N) or nullptr
                               float* __restrict__ partial_db,    // (gridDim.y, N) or nullptr
                               int64_t M, int N) {
  using P = Pack<T, VEC>;
  constexpr int kRows = 4;  // rows in flight per thread
  const int nv = N / VEC;
  const int c = blockIdx.x * THREADS + threadIdx.x;
  if (c >= nv) return;
  const bool has_w = weight != nullptr;
  P wv;
  if (has_w) wv = reinterpret_cast<const P*>(weight)[c];
  float acc_dw[VEC], acc_db[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc_dw[i] = acc_db[i] = 0.f;

  const int64_t stride = gridDim.y;
  for (int64_t row0 = blockIdx.y; row0 < M; row0 += stride * kRows) {
    P xv[kRows], dv[kRows];
    float mu[kRows], rs[kRows];
    float2 cf[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t row = row0 + j * stride;
      if (row < M) {
        xv[j] = reinterpret_cast<const P*>(x + row * N)[c];
        dv[j] = reinterpret_cast<const P*>(dy + row * N)[c];
        mu[j] = mean[row];
        rs[j] = rstd[row];
        cf[j] = coef[row];
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t row = row0 + j * stride;
      if (row < M) {
        P out;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (to_float(xv[j].v[i]) - mu[j]) * rs[j];
          const float d = to_float(dv[j].v[i]);
          const float g = has_w ? d * to_float(wv.v[i]) : d;
          out.v[i] = from_float<T>(rs[j] * (g - cf[j].x - xh * cf[j].y));
          acc_dw[i] += d * xh;
          acc_db[i] += d;
        }
        reinterpret_cast<P*>(dx + row * N)[c] = out;
      }
    }
  }
  const int64_t prow = static_cast<int64_t>(blockIdx.y) * N + static_cast<int64_t>(c) * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (partial_dw != nullptr) partial_dw[prow + i] = acc_dw[i];
    if (partial_db != nullptr) partial_db[prow + i] = acc_db[i];
  }
}

// Column sums of the partial rows, added in a fixed order (lane ty takes rows ty, ty + 8, ...,
// then lanes 0..7 are added in order): deterministic. blockIdx.y picks dweight (0) or dbias (1).
template <typename T>
__global__ void __launch_bounds__(256)
    layer_norm_bwd_reduce_kernel(const float* __restrict__ partial_dw,  // (P, N) or nullptr
                                 const float* __restrict__ partial_db,  // (P, N) or nullptr
                                 T* __restrict__ dweight,               // (N,) or nullptr
                                 T* __restrict__ dbias,                 // (N,) or nullptr
                                 int num_partials, int N) {
  constexpr int kCols = 32;
  constexpr int kLanes = 8;
  __shared__ float part[kLanes][kCols + 1];
  const float* src = blockIdx.y == 0 ? partial_dw : partial_db;
  T* dst = blockIdx.y == 0 ? dweight : dbias;
  if (src == nullptr) return;  // uniform across the block, before the barrier
  const int tx = threadIdx.x % kCols;
  const int ty = threadIdx.x / kCols;
  const int col = blockIdx.x * kCols + tx;
  float s = 0.f;
  if (col < N) {
#pragma unroll 4
    for (int p = ty; p < num_partials; p += kLanes) s += src[static_cast<int64_t>(p) * N + col];
  }
  part[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < N) {
    float t = 0.f;
#pragma unroll
    for (int j = 0; j < kLanes; ++j) t += part[j][tx];
    dst[col] = from_float<T>(t);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, INT_MAX)));
}

int current_sm_count() {
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    return 1;  // the launch that follows reports the real error
  }
  return sms;
}

// Resident blocks per SM of `kernel` on the current device with `smem` bytes of dynamic shared
// memory, after opting in to more than 48 KiB where needed; 0 when the device cannot run it (for
// example 128 KiB on an sm_86, which runs the sm_80 binary). Cached per kernel and device: these
// queries cost more than a small launch.
int prepare_kernel(const void* kernel, int block_threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const std::pair<const void*, int> key(kernel, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  int optin = 0;
  const bool ok =
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
          cudaSuccess &&
      smem <= static_cast<size_t>(optin) &&
      (smem <= 48 * 1024 ||
       cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(smem)) == cudaSuccess) &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, block_threads, smem) ==
          cudaSuccess;
  if (!ok) {
    n = 0;
    (void)cudaGetLastError();  // a failed query must not surface as the next launch's error
  }
  std::lock_guard<std::mutex> lock(mutex);
  cache[key] = n;
  return n;
}

// Partial rows of the backward: at most 2 blocks per SM (enough bytes in flight for the row
// kernels) so the workspace and the final reduction stay small next to the (M, N) traffic.
int64_t max_partials(int64_t M, int sms) { return std::min<int64_t>(M, 2 * int64_t(sms)); }

// coef (2 floats per row) first, rounded to 16 bytes so the partial rows after it are aligned.
int64_t coef_floats(int64_t M) { return ceil_div(2 * M, 4) * 4; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
struct FwdArgs {
  const T* x;
  const T* weight;
  const T* bias;
  T* y;
  float* mean;
  float* rstd;
  int64_t M;
  int N;
  float eps;
};

template <typename T, int VEC, int VPT, int TPR, int RPB>
cudaError_t launch_fwd_rows(const FwdArgs<T>& a, cudaStream_t stream) {
  layer_norm_fwd_rows_kernel<T, VEC, VPT, TPR, RPB>
      <<<grid_for(ceil_div(a.M, RPB)), TPR * RPB, 0, stream>>>(a.x, a.weight, a.bias, a.y, a.mean,
                                                                a.rstd, a.M, a.N, a.eps);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t fwd_dispatch(const FwdArgs<T>& a, cudaStream_t stream) {
  // Narrow rows: a warp per row, 8 rows per block, 1-8 packs per lane. Wider rows: a block per
  // row with 8 packs per thread (few threads per row keeps the barrier-bound reductions cheap),
  // up to 1024 threads: 65536 bf16/fp16 or 32768 fp32 elements. Past that, the looped kernel.
  const int nv = a.N / VEC;
  if (nv <= 32) return launch_fwd_rows<T, VEC, 1, 32, 8>(a, stream);
  if (nv <= 64) return launch_fwd_rows<T, VEC, 2, 32, 8>(a, stream);
  if (nv <= 128) return launch_fwd_rows<T, VEC, 4, 32, 8>(a, stream);
  if (nv <= 256) return launch_fwd_rows<T, VEC, 8, 32, 8>(a, stream);
  if (nv <= 512) return launch_fwd_rows<T, VEC, 8, 64, 1>(a, stream);
  if (nv <= 1024) return launch_fwd_rows<T, VEC, 8, 128, 1>(a, stream);
  if (nv <= 2048) return launch_fwd_rows<T, VEC, 8, 256, 1>(a, stream);
  if (nv <= 4096) return launch_fwd_rows<T, VEC, 8, 512, 1>(a, stream);
  if (nv <= 8192) return launch_fwd_rows<T, VEC, 8, 1024, 1>(a, stream);
  layer_norm_fwd_looped_kernel<T, VEC, 512><<<grid_for(a.M), 512, 0, stream>>>(
      a.x, a.weight, a.bias, a.y, a.mean, a.rstd, a.M, a.N, a.eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const FwdArgs<T>& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = a.N % kVec == 0 && aligned16(a.x) && aligned16(a.y) &&
                      aligned16(a.weight) && aligned16(a.bias);  // nullptr counts as aligned
  return vec_ok ? fwd_dispatch<T, kVec>(a, stream) : fwd_dispatch<T, 1>(a, stream);
}

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* x;
  const T* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  T* dweight;
  T* dbias;
  float* workspace;  // coef_floats(M) floats, then the partial rows
  int64_t M;
  int N;
  int sms;
};

// Where the `partials` fp32 partial-sum rows of dweight and dbias live in the workspace (after the
// per-row coefficients); nullptr for a gradient that is not wanted.
struct PartialRows {
  float* dweight;
  float* dbias;
};

template <typename T>
PartialRows partial_rows(const BwdArgs<T>& a, int64_t partials) {
  float* base = a.workspace + coef_floats(a.M);
  float* dw = a.dweight != nullptr ? base : nullptr;
  float* db = a.dbias != nullptr ? base + (dw != nullptr ? partials * a.N : 0) : nullptr;
  return {dw, db};
}

template <typename T>
cudaError_t launch_bwd_reduce(const BwdArgs<T>& a, const float* pdw, const float* pdb,
                              int64_t partials, cudaStream_t stream) {
  if (pdw == nullptr && pdb == nullptr) return cudaGetLastError();
  const dim3 grid(grid_for(ceil_div(a.N, 32)), 2);
  layer_norm_bwd_reduce_kernel<T><<<grid, 256, 0, stream>>>(pdw, pdb, a.dweight, a.dbias,
                                                            static_cast<int>(partials), a.N);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_bwd_looped(const BwdArgs<T>& a, cudaStream_t stream);

template <typename T, int VEC, int VPT, int TPR, int RPB>
cudaError_t launch_bwd_rows(const BwdArgs<T>& a, cudaStream_t stream) {
  constexpr int kThreads = TPR * RPB;
  constexpr size_t kSmem = bwd_rows_smem_bytes(VEC, VPT, TPR, RPB);
  auto kernel = layer_norm_bwd_rows_kernel<T, VEC, VPT, TPR, RPB>;
  const int occupancy = prepare_kernel(reinterpret_cast<const void*>(kernel), kThreads, kSmem);
  if (occupancy == 0) return launch_bwd_looped<T, VEC>(a, stream);  // shared memory too small
  const int64_t partials =
      std::min<int64_t>(ceil_div(a.M, RPB), int64_t(a.sms) * std::min(2, occupancy));
  const PartialRows p = partial_rows(a, partials);
  float* pdw = p.dweight;
  float* pdb = p.dbias;
  kernel<<<static_cast<unsigned>(partials), kThreads, kSmem, stream>>>(
      a.dy, a.x, a.weight, a.mean, a.rstd, a.dx, pdw, pdb, a.M, a.N);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_bwd_reduce(a, pdw, pdb, partials, stream);
}

template <typename T, int VEC>
cudaError_t launch_bwd_looped(const BwdArgs<T>& a, cudaStream_t stream) {
  constexpr int kCoefThreads = 512;
  constexpr int kColThreads = 256;
  float2* coef = reinterpret_cast<float2*>(a.workspace);
  layer_norm_bwd_coef_kernel<T, VEC, kCoefThreads><<<grid_for(a.M), kCoefThreads, 0, stream>>>(
      a.dy, a.x, a.weight, a.mean, a.rstd, coef, a.M, a.N);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // Enough (column chunk, row slot) blocks to fill the GPU a few times over, no more row slots
  // than the workspace holds.
  const int64_t chunks = ceil_div(a.N / VEC, kColThreads);
  const int64_t partials = std::max<int64_t>(
      1, std::min<int64_t>(max_partials(a.M, a.sms), ceil_div(8 * int64_t(a.sms), chunks)));
  const PartialRows p = partial_rows(a, partials);
  float* pdw = p.dweight;
  float* pdb = p.dbias;
  const dim3 grid(grid_for(chunks), static_cast<unsigned>(partials));
  layer_norm_bwd_cols_kernel<T, VEC, kColThreads><<<grid, kColThreads, 0, stream>>>(
      a.dy, a.x, a.weight, a.mean, a.rstd, coef, a.dx, pdw, pdb, a.M, a.N);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_bwd_reduce(a, pdw, pdb, partials, stream);
}

template <typename T, int VEC>
cudaError_t bwd_dispatch(const BwdArgs<T>& a, cudaStream_t stream) {
  // Two packs per thread (x and dy held for the dx pass within 64 registers at 1024 threads):
  // bf16/fp16 rows up to 16384, fp32 up to 8192 elements. Blocks of 512 threads (RPB rows at
  // once) so that 2 blocks per SM fill the machine with few partial rows; the 1024-thread
  // configuration needs 128 KiB of shared memory and falls back to the looped path without it.
  const int nv = a.N / VEC;
  if (nv <= 32) return launch_bwd_rows<T, VEC, 1, 32, 16>(a, stream);
  if (nv <= 64) return launch_bwd_rows<T, VEC, 2, 32, 16>(a, stream);
  if (nv <= 128) return launch_bwd_rows<T, VEC, 2, 64, 8>(a, stream);
  if (nv <= 256) return launch_bwd_rows<T, VEC, 2, 128, 4>(a, stream);
  if (nv <= 512) return launch_bwd_rows<T, VEC, 2, 256, 2>(a, stream);
  if (nv <= 1024) return launch_bwd_rows<T, VEC, 2, 512, 1>(a, stream);
  if (nv <= 2048) return launch_bwd_rows<T, VEC, 2, 1024, 1>(a, stream);
  return launch_bwd_looped<T, VEC>(a, stream);
}

template <typename T>
cudaError_t bwd_typed(const BwdArgs<T>& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = a.N % kVec == 0 && aligned16(a.dy) && aligned16(a.x) &&
                      aligned16(a.weight) && aligned16(a.dx);
  return vec_ok ? bwd_dispatch<T, kVec>(a, stream) : bwd_dispatch<T, 1>(a, stream);
}

size_t element_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

}  // namespace

cudaError_t layer_norm_fwd(const void* x, const void* weight, const void* bias, void* y,
                           float* mean, float* rstd, int64_t M, int64_t N, float eps, DType dtype,
                           cudaStream_t stream) {
  if (M < 0 || N < 0 || N > kMaxN) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (N == 0) {
    // Matches PyTorch on an empty normalized shape: mean 0, rstd NaN (all-ones bits).
    cudaError_t err = cudaMemsetAsync(mean, 0, M * sizeof(float), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(rstd, 0xff, M * sizeof(float), stream);
    return err;
  }
  switch (dtype) {
    case DType::Float32:
      return fwd_typed<float>({static_cast<const float*>(x), static_cast<const float*>(weight),
                               static_cast<const float*>(bias), static_cast<float*>(y), mean,
                               rstd, M, static_cast<int>(N), eps},
                              stream);
    case DType::Float16:
      return fwd_typed<__half>({static_cast<const __half*>(x), static_cast<const __half*>(weight),
                                static_cast<const __half*>(bias), static_cast<__half*>(y), mean,
                                rstd, M, static_cast<int>(N), eps},
                               stream);
    case DType::BFloat16:
      return fwd_typed<__nv_bfloat16>(
          {static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight),
           static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), mean, rstd, M,
           static_cast<int>(N), eps},
          stream);
  }
  return cudaErrorInvalidValue;
}

size_t layer_norm_bwd_workspace_bytes(int64_t M, int64_t N, bool weight_grad, bool bias_grad) {
  if (M <= 0 || N <= 0) return 0;
  const int64_t grads = int64_t(weight_grad) + int64_t(bias_grad);
  const int64_t floats = coef_floats(M) + grads * max_partials(M, current_sm_count()) * N;
  return static_cast<size_t>(floats) * sizeof(float);
}

cudaError_t layer_norm_bwd(const void* dy, const void* x, const void* weight, const float* mean,
                           const float* rstd, void* dx, void* dweight, void* dbias,
                           void* workspace, size_t workspace_bytes, int64_t M, int64_t N,
                           DType dtype, cudaStream_t stream) {
  if (M < 0 || N < 0 || N > kMaxN) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  if (M == 0) {
    // Sums over no rows; all-zero bits are 0.0 in every supported dtype.
    cudaError_t err = cudaSuccess;
    if (dweight != nullptr) err = cudaMemsetAsync(dweight, 0, N * element_size(dtype), stream);
    if (err == cudaSuccess && dbias != nullptr)
      err = cudaMemsetAsync(dbias, 0, N * element_size(dtype), stream);
    return err;
  }
  if (workspace == nullptr || !aligned16(workspace) ||
      workspace_bytes < layer_norm_bwd_workspace_bytes(M, N, dweight != nullptr, dbias != nullptr))
    return cudaErrorInvalidValue;
  const int sms = current_sm_count();
  const int n = static_cast<int>(N);
  float* ws = static_cast<float*>(workspace);
  switch (dtype) {
    case DType::Float32:
      return bwd_typed<float>({static_cast<const float*>(dy), static_cast<const float*>(x),
                               static_cast<const float*>(weight), mean, rstd,
                               static_cast<float*>(dx), static_cast<float*>(dweight),
                               static_cast<float*>(dbias), ws, M, n, sms},
                              stream);
    case DType::Float16:
      return bwd_typed<__half>({static_cast<const __half*>(dy), static_cast<const __half*>(x),
                                static_cast<const __half*>(weight), mean, rstd,
                                static_cast<__half*>(dx), static_cast<__half*>(dweight),
                                static_cast<__half*>(dbias), ws, M, n, sms},
                               stream);
    case DType::BFloat16:
      return bwd_typed<__nv_bfloat16>(
          {static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x),
           static_cast<const __nv_bfloat16*>(weight), mean, rstd,
           static_cast<__nv_bfloat16*>(dx), static_cast<__nv_bfloat16*>(dweight),
           static_cast<__nv_bfloat16*>(dbias), ws, M, n, sms},
          stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dlfast
