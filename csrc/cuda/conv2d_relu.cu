// Conv2d + bias + ReLU, forward and backward, on NHWC activations and KRSC (K, R, S, C / G)
// weights; csrc/cuda_ops.cpp converts from and to the torch layouts. Semantics are those of the
// conv2d_relu_fwd / conv2d_relu_bwd schemas in csrc/dlfast.cpp.
//
// Kernels and the cases they serve:
//   conv_igemm_kernel   fp16 / bf16 implicit GEMM on tensor cores (mma.sync m16n8k16, fp32
//                       accumulation), one kernel for two passes:
//                         forward: rows = output pixels (N P Q), columns = K / G, reduction
//                                  over (r, s, c) of one group; bias and ReLU in the epilogue.
//                         dx:      rows = input pixels (N H W), columns = C / G, reduction over
//                                  (r, s, k) of g = (y > 0 ? dy : 0) against a transposed
//                                  weight; an output pixel contributes only where the stride
//                                  divides the offset (the transposed convolution's gather).
//                       Both reduction channel counts contiguous in memory, so with a channel
//                       count that is a multiple of 8 every 8-element chunk of a tile row is
//                       one 16-byte load; other counts gather element by element.
//   conv_igemm_simt_kernel
//                       the same two passes for fp32 on the CUDA cores (fp32 FMA, no TF32).
//   conv_fwd_direct_kernel / conv_dgrad_direct_kernel
//                       one thread per output element, fp32 FMA, every dtype: depthwise, the
//                       tiny channel counts where a GEMM tile would be mostly zeros (<= 4 output
//                       channels per group, as in a first layer's dx, or a reduction R S C / G
//                       under 16, as in a 1-channel 3 x 3 forward), and any launch the GEMM grid
//                       cannot hold.
//   conv_wgrad_tc_kernel / conv_wgrad_kernel
//                       dweight partial sums per split of the N P Q rows into an fp32
//                       workspace: a (K / G) x (R S C / G) GEMM on tensor cores for fp16 / bf16
//                       (16-byte chunks or element gathers, as above), SIMT fp32 FMA for fp32
//                       and depthwise (K / G <= 4). sum_splits_kernel adds the splits in a fixed
//                       order, so dweight (and dbias, from conv_dbias_kernel) is bitwise
//                       reproducible: no atomics anywhere.
//
// Only cuda_runtime / cuda_fp16 / cuda_bf16 here: the file compile-checks with plain nvcc.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "launchers.h"
#include "ptx.h"

namespace dlfast {
namespace cuda {
namespace {

constexpr int kThreads = 128;
// Block tile of the implicit GEMM: 4 warps in a 2 x 2 grid, each owning 32 x 32 outputs.
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
// Shared rows of kTileK + 8 elements (80 bytes): the 8 rows that one ldmatrix phase reads start
// in 8 different 16-byte bank groups, so fragment loads are conflict-free.
constexpr int kStride = kTileK + 8;
constexpr int kStageElems = (kTileM + kTileN) * kStride;
// A 32-deep reduction step is only 16 mma per warp, too little to cover a global load: stages
// kt + 1 and kt + 2 are in flight while step kt is multiplied.
constexpr int kStages = 3;
constexpr size_t kIgemmSmem = kStages * kStageElems * 2;  // 16-bit elements
// The wgrad kernel's tile: 32 output channels x 32 (r, s, c) positions, 32 rows at a time.
constexpr int kWgradTile = 32;
constexpr size_t kWgradSmem = 2 * kWgradTile * (kWgradTile + 1) * sizeof(float);
// N P Q rows that one wgrad / dbias split reduces at least, and the most splits.
constexpr int64_t kMinSplitRows = 256;
constexpr int64_t kMaxSplits = 1024;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxDirectBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Division of a non-negative 64-bit index by a positive int without the 64-bit integer division
// routine, a call in SASS whose saved registers ptxas reports as spills: a multiply by the
// reciprocal and one correction step, exact for dividends below kMaxIndex (valid_config).
constexpr int64_t kMaxIndex = kConv2dMaxElements;
struct Div64 {
  int d;
  double inv;
};

Div64 make_div(int d) { return {d, 1.0 / d}; }

__device__ __forceinline__ int64_t divmod(Div64 f, int64_t a, int& rem) {
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * f.inv);
  int64_t r = a - q * f.d;
  if (r < 0) {
    --q;
    r += f.d;
  } else if (r >= f.d) {
    ++q;
    r -= f.d;
  }
  rem = static_cast<int>(r);
  return q;
}

// ReLU that keeps NaN, as torch.relu does.
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// The ReLU mask of the backward: dy where the forward output was positive.
template <typename T>
__device__ __forceinline__ float masked_grad(T dy, T y) {
  return to_float(y) > 0.f ? to_float(dy) : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Implicit GEMM (fp16 / bf16 tensor cores)

enum class Pass { Forward, Dgrad };

// One pass of the implicit GEMM out[m][group * Nper + n] = sum_kg A[m][kg] B[group][n][kg]:
// rows m = (image, oh, ow) of `out`; kg = (r, s, c) with c the fastest, c indexing the Cper
// channels of `src` that belong to the group.
struct GemmParams {
  const void* src;   // (N, Hs, Ws, Cs): x (forward) or dy (dx pass)
  const void* mask;  // dx pass: y, laid out as dy; forward: nullptr
  const void* b;     // (G, Nper, R, S, Cper): the weight (forward) or its transpose (dx pass)
  const void* bias;  // (G * Nper,) or nullptr; forward only
  void* out;         // (N, Ho, Wo, Co)
  int64_t M;         // N * Ho * Wo
  int Hs, Ws, Cs, Cper;
  int Ho, Wo, Co, Nper;
  int R, S, sh, sw, ph, pw, dh, dw;
  int Kgemm;         // R * S * Cper
  int n_tiles;       // ceil(Nper / kTileN): blockIdx.y = group * n_tiles + column tile
  Div64 pixels;      // by Ho * Wo: row -> (image, pixel)
  bool pair_stores;  // Co and Nper even: two adjacent outputs are one aligned 32-bit store
  bool chunk_stores;  // tensor cores: Co, Nper multiples of 8 and out 16-byte aligned
};

// The src pixel that output row (oh, ow) reads at kernel offset (r, s), or false where it is
// padding (forward) or where no output pixel maps there (dx pass: the stride must divide the
// offset, the transposed convolution's zero insertion).
template <Pass kPass>
__device__ __forceinline__ bool src_pixel(const GemmParams& p, int oh, int ow, int r, int s,
                                          int& ih, int& iw) {
  if constexpr (kPass == Pass::Forward) {
    ih = oh * p.sh - p.ph + r * p.dh;
    iw = ow * p.sw - p.pw + s * p.dw;
    return ih >= 0 && ih < p.Hs && iw >= 0 && iw < p.Ws;
  } else {
    const int th = oh + p.ph - r * p.dh;
    const int tw = ow + p.pw - s * p.dw;
    if (th < 0 || tw < 0 || th % p.sh != 0 || tw % p.sw != 0) return false;
    ih = th / p.sh;
    iw = tw / p.sw;
    return ih < p.Hs && iw < p.Ws;
  }
}

// Eight 16-bit dy values, zeroed where the matching y is not positive.
template <typename T>
__device__ __forceinline__ uint4 mask_chunk(uint4 dy, uint4 y) {
  uint4 out;
  const T* d = reinterpret_cast<const T*>(&dy);
  const T* m = reinterpret_cast<const T*>(&y);
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = to_float(m[i]) > 0.f ? d[i] : from_float<T>(0.f);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
  }
}

// The multi-stage mainloop of the tensor-core GEMMs (conv_igemm_kernel, conv_wgrad_tc_kernel):
// acc, a warp's 32 x 32 outputs as 2 x 4 tiles of 16 x 8, accumulates num_steps reduction
// steps of kSlices x 16, each staged in one of kStages shared buffers of kStageElems elements.
// The callbacks hold what differs between the kernels:
//   load_stage(step, buf)  issues the loads of a step into buffer buf and commits them;
//   store_masked(buf)      stores what load_stage left in registers (a no-op where nothing was),
//                          once the math of the previous stage is issued;
//   load_a(af, stage, kk, i) / load_b(bf, stage, kk, j)
//                          ldmatrix the A fragment of row tile i, and the B fragments of column
//                          tiles j, j + 1 (bf[0..1], bf[2..3]), of slice kk of a stage.
template <typename T, int kStageElems, int kSlices, typename LoadStage, typename StoreMasked,
          typename LoadA, typename LoadB>
__device__ __forceinline__ void mma_mainloop(const T* stages, int num_steps, float (&acc)[2][4][4],
                                             LoadStage&& load_stage, StoreMasked&& store_masked,
                                             LoadA&& load_a, LoadB&& load_b) {
  // Every thread commits one cp.async group per stage, empty past the end, so that "all but
  // the newest kStages - 2 groups" is always "up to stage kt".
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < num_steps) {
      load_stage(st, st);
      store_masked(st);
    } else {
      cp_async_commit();
    }
  }
  for (int kt = 0; kt < num_steps; ++kt) {
    // Stage kt has landed for every thread, and every warp is done with stage kt - 1, whose
    // buffer the loads below refill.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    const bool prefetch = next < num_steps;
    if (prefetch) {
      load_stage(next, next % kStages);
    } else {
      cp_async_commit();
    }
    const T* stage = stages + (kt % kStages) * kStageElems;
#pragma unroll
    for (int kk = 0; kk < kSlices; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) load_a(af[i], stage, kk, i);
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        uint32_t bf[4];
        load_b(bf, stage, kk, j);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_16816<T>(acc[i][j], af[i], bf[0], bf[1]);
          mma_16816<T>(acc[i][j + 1], af[i], bf[2], bf[3]);
        }
      }
    }
    if (prefetch) store_masked(next % kStages);
  }
  cp_async_wait<0>();  // only empty groups are left; close them before the thread exits
}

// Block tile (64 rows, 64 columns) of one group, reduction in steps of 32 through kStages
// shared stages: while the tensor cores work on one stage the next ones are in flight (cp.async;
// in the dx pass the dy and y chunks wait in registers and are masked and stored after the
// math).
// kVec: Cper % 8 == 0 and 16-byte aligned tensors, so each thread moves whole 8-channel chunks;
// otherwise every element is gathered on its own, synchronously.
template <typename T, Pass kPass, bool kVec>
__global__ void __launch_bounds__(kThreads) conv_igemm_kernel(const GemmParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = blockIdx.y / p.n_tiles;
  const int n0 = (blockIdx.y % p.n_tiles) * kTileN;
  const int64_t m0 = int64_t(blockIdx.x) * kTileM;
  const T* src = static_cast<const T*>(p.src) + group * p.Cper;
  const T* mask = kPass == Pass::Dgrad ? static_cast<const T*>(p.mask) + group * p.Cper : nullptr;
  const T* bmat = static_cast<const T*>(p.b) + int64_t(group) * p.Nper * p.Kgemm;
  const int num_k = static_cast<int>(ceil_div(p.Kgemm, kTileK));

  // Vector path: this thread moves chunk column tid % 4 of rows tid / 4 and tid / 4 + 32 of
  // both tiles; the output pixel of its two A rows is fixed for the whole reduction.
  constexpr int kRowsPerPass = kThreads / (kTileK / 8);
  const int chunk_col = (tid % (kTileK / 8)) * 8;
  int64_t a_img[2];
  int a_oh[2], a_ow[2];
  bool a_row_ok[2];
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t m = m0 + tid / (kTileK / 8) + i * kRowsPerPass;
      a_row_ok[i] = m < p.M;
      int pix;
      a_img[i] = divmod(p.pixels, a_row_ok[i] ? m : 0, pix) * p.Hs;
      a_oh[i] = pix / p.Wo;
      a_ow[i] = pix - a_oh[i] * p.Wo;
    }
  }
  uint4 dy_regs[2], y_regs[2];  // dx pass, vector path: the next A stage before masking
  bool dy_ok[2];

  // Issues the loads of reduction step kt into stage `buf`.
  const auto load_stage = [&](int kt, int buf) {
    T* sA = stages + buf * kStageElems;
    T* sB = sA + kTileM * kStride;
    if constexpr (kVec) {
      const int kg = kt * kTileK + chunk_col;
      const bool k_ok = kg < p.Kgemm;
      const int rs = kg / p.Cper;
      const int c0 = kg - rs * p.Cper;
      const int r = rs / p.S;
      const int s = rs - r * p.S;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = tid / (kTileK / 8) + i * kRowsPerPass;
        int ih = 0, iw = 0;
        const bool ok = k_ok && a_row_ok[i] && src_pixel<kPass>(p, a_oh[i], a_ow[i], r, s, ih, iw);
        const int64_t off = ((a_img[i] + ih) * p.Ws + iw) * p.Cs + c0;
        if constexpr (kPass == Pass::Forward) {
          cp_async_16(sA + row * kStride + chunk_col, ok ? src + off : src, ok);
        } else {
          dy_ok[i] = ok;
          if (ok) {
            dy_regs[i] = *reinterpret_cast<const uint4*>(src + off);
            y_regs[i] = *reinterpret_cast<const uint4*>(mask + off);
          }
        }
        const int n = n0 + row;
        const bool b_ok = k_ok && n < p.Nper;
        cp_async_16(sB + row * kStride + chunk_col, b_ok ? bmat + int64_t(n) * p.Kgemm + kg : bmat,
                    b_ok);
      }
    } else {
      // Column tid % 32 of rows tid / 32 + 4j: neighbouring threads read neighbouring channels.
      const int col = tid % kTileK;
      const int kg = kt * kTileK + col;
      const bool k_ok = kg < p.Kgemm;
      const int rs = kg / p.Cper;
      const int c = kg - rs * p.Cper;
      const int r = rs / p.S;
      const int s = rs - r * p.S;
      // Rolled: each row's address math is long, and unrolled copies spill on sm_80.
#pragma unroll 1
      for (int row = tid / kTileK; row < kTileM; row += kThreads / kTileK) {
        const int64_t m = m0 + row;
        float v = 0.f;
        if (k_ok && m < p.M) {
          int pix;
          const int64_t img = divmod(p.pixels, m, pix);
          const int oh = pix / p.Wo;
          const int ow = pix - oh * p.Wo;
          int ih, iw;
          if (src_pixel<kPass>(p, oh, ow, r, s, ih, iw)) {
            const int64_t off = ((img * p.Hs + ih) * p.Ws + iw) * p.Cs + c;
            if constexpr (kPass == Pass::Forward) {
              v = to_float(src[off]);
            } else {
              v = masked_grad(src[off], mask[off]);
            }
          }
        }
        sA[row * kStride + col] = from_float<T>(v);
        const int n = n0 + row;
        sB[row * kStride + col] =
            k_ok && n < p.Nper ? bmat[int64_t(n) * p.Kgemm + kg] : from_float<T>(0.f);
      }
    }
    cp_async_commit();
  };
  // Dx pass, vector path: the masked A chunks of load_stage, stored once the math is issued.
  const auto store_masked = [&](int buf) {
    if constexpr (kVec && kPass == Pass::Dgrad) {
      T* sA = stages + buf * kStageElems;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = tid / (kTileK / 8) + i * kRowsPerPass;
        *reinterpret_cast<uint4*>(sA + row * kStride + chunk_col) =
            dy_ok[i] ? mask_chunk<T>(dy_regs[i], y_regs[i]) : make_uint4(0, 0, 0, 0);
      }
    }
  };

  const int wm = warp / 2;
  const int wn = warp % 2;
  float acc[2][4][4] = {};
  mma_mainloop<T, kStageElems, kTileK / 16>(
      stages, num_k, acc, load_stage, store_masked,
      [&](uint32_t(&a)[4], const T* sA, int kk, int i) {
        ldmatrix_x4(a, sA + (wm * 32 + i * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
      },
      [&](uint32_t(&b)[4], const T* sA, int kk, int j) {
        const T* sB = sA + kTileM * kStride;
        ldmatrix_x4(b, sB + (wn * 32 + j * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 +
                           (lane / 8 % 2) * 8);
      });

  // A lane holds rows lane / 4 (+ 8) and columns 2 (lane % 4) + {0, 1} of each 16 x 8 tile.
  // With chunk_stores the block tile goes through shared memory (free once every warp is past
  // its last stage), so that global stores are whole 16-byte chunks of a row.
  constexpr int kOutLd = kTileN + 8;
  static_assert(kTileM * kOutLd <= kStages * kStageElems, "the output tile fits the stages");
  T* tile = stages;
  if (p.chunk_stores) __syncthreads();
  T* out = static_cast<T*>(p.out) + group * p.Nper;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = n0 + wn * 32 + j * 8 + 2 * (lane % 4);
    float b0 = 0.f, b1 = 0.f;
    if (kPass == Pass::Forward && bias != nullptr) {
      if (n < p.Nper) b0 = to_float(bias[group * p.Nper + n]);
      if (n + 1 < p.Nper) b1 = to_float(bias[group * p.Nper + n + 1]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm * 32 + i * 16 + lane / 4 + 8 * h;
        if (m >= p.M || n >= p.Nper) continue;
        float v0 = acc[i][j][2 * h] + b0;
        float v1 = acc[i][j][2 * h + 1] + b1;
        if constexpr (kPass == Pass::Forward) {
          v0 = relu(v0);
          v1 = relu(v1);
        }
        if (p.chunk_stores) {
          store_pair(tile + (m - m0) * kOutLd + (n - n0), v0, v1);
          continue;
        }
        T* dst = out + m * p.Co + n;
        if (p.pair_stores && n + 1 < p.Nper) {
          store_pair(dst, v0, v1);
        } else {
          dst[0] = from_float<T>(v0);
          if (n + 1 < p.Nper) dst[1] = from_float<T>(v1);
        }
      }
    }
  }
  if (p.chunk_stores) {
    __syncthreads();
#pragma unroll
    for (int c = tid; c < kTileM * kTileN / 8; c += kThreads) {
      const int row = c / (kTileN / 8);
      const int col = (c % (kTileN / 8)) * 8;
      if (m0 + row < p.M && n0 + col < p.Nper) {
        *reinterpret_cast<uint4*>(out + (m0 + row) * p.Co + n0 + col) =
            *reinterpret_cast<const uint4*>(tile + row * kOutLd + col);
      }
    }
  }
}

// fp32 implicit GEMM on the CUDA cores: the GEMM of conv_igemm_kernel (same GemmParams, same
// passes) with fp32 FMA, 64 x 64 block tiles in reduction steps of 16. Each thread owns 8 rows x
// 4 columns, read from shared memory as float4s of reduction-major tiles; the next step's
// elements wait in registers while the current one is multiplied.
constexpr int kSimtTileK = 16;
constexpr int kSimtLd = kTileM + 4;  // keeps float4 reads aligned, staggers the transposed stores
constexpr size_t kSimtSmem = 2 * 2 * kSimtTileK * kSimtLd * sizeof(float);

template <Pass kPass>
__global__ void __launch_bounds__(kThreads) conv_igemm_simt_kernel(const GemmParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* stages = reinterpret_cast<float*>(smem);  // [2][A, B][kSimtTileK][kSimtLd]
  constexpr int kStage = 2 * kSimtTileK * kSimtLd;
  const int tid = threadIdx.x;
  const int group = blockIdx.y / p.n_tiles;
  const int n0 = (blockIdx.y % p.n_tiles) * kTileN;
  const int64_t m0 = int64_t(blockIdx.x) * kTileM;
  const float* src = static_cast<const float*>(p.src) + group * p.Cper;
  const float* mask =
      kPass == Pass::Dgrad ? static_cast<const float*>(p.mask) + group * p.Cper : nullptr;
  const float* bmat = static_cast<const float*>(p.b) + int64_t(group) * p.Nper * p.Kgemm;
  const int num_k = static_cast<int>(ceil_div(p.Kgemm, kSimtTileK));

  // Loads: reduction column tid % 16 of rows tid / 16 + 8j, neighbouring threads reading
  // neighbouring channels.
  constexpr int kLoadRows = kTileM * kSimtTileK / kThreads;
  const int col = tid % kSimtTileK;
  float a_next[kLoadRows], b_next[kLoadRows];
  const auto fetch = [&](int kt) {
    const int kg = kt * kSimtTileK + col;
    const bool k_ok = kg < p.Kgemm;
    const int rs = kg / p.Cper;
    const int c = kg - rs * p.Cper;
    const int r = rs / p.S;
    const int s = rs - r * p.S;
#pragma unroll
    for (int j = 0; j < kLoadRows; ++j) {
      const int row = tid / kSimtTileK + j * (kThreads / kSimtTileK);
      const int64_t m = m0 + row;
      float v = 0.f;
      if (k_ok && m < p.M) {
        int pix;
        const int64_t img = divmod(p.pixels, m, pix);
        const int oh = pix / p.Wo;
        const int ow = pix - oh * p.Wo;
        int ih, iw;
        if (src_pixel<kPass>(p, oh, ow, r, s, ih, iw)) {
          const int64_t off = ((img * p.Hs + ih) * p.Ws + iw) * p.Cs + c;
          if constexpr (kPass == Pass::Forward) {
            v = src[off];
          } else {
            v = mask[off] > 0.f ? src[off] : 0.f;
          }
        }
      }
      a_next[j] = v;
      const int n = n0 + row;
      b_next[j] = k_ok && n < p.Nper ? bmat[int64_t(n) * p.Kgemm + kg] : 0.f;
    }
  };
  const auto store = [&](int buf) {
    float* sA = stages + buf * kStage;
    float* sB = sA + kSimtTileK * kSimtLd;
#pragma unroll
    for (int j = 0; j < kLoadRows; ++j) {
      const int row = tid / kSimtTileK + j * (kThreads / kSimtTileK);
      sA[col * kSimtLd + row] = a_next[j];
      sB[col * kSimtLd + row] = b_next[j];
    }
  };

  const int tn = (tid % 16) * 4;  // columns tn + [0, 4)
  const int tm = (tid / 16) * 8;  // rows tm + [0, 8)
  float acc[8][4] = {};
  fetch(0);
  store(0);
  for (int kt = 0; kt < num_k; ++kt) {
    __syncthreads();  // stage kt stored by everyone; everyone done reading stage kt - 1
    const bool prefetch = kt + 1 < num_k;
    if (prefetch) fetch(kt + 1);
    const float* sA = stages + (kt % 2) * kStage;
    const float* sB = sA + kSimtTileK * kSimtLd;
#pragma unroll
    for (int k = 0; k < kSimtTileK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(sA + k * kSimtLd + tm);
      const float4 a1 = *reinterpret_cast<const float4*>(sA + k * kSimtLd + tm + 4);
      const float4 b = *reinterpret_cast<const float4*>(sB + k * kSimtLd + tn);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
      }
    }
    if (prefetch) store((kt + 1) % 2);
  }

  float* out = static_cast<float*>(p.out) + group * p.Nper;
  const float* bias = static_cast<const float*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = n0 + tn + j;
    if (n >= p.Nper) continue;
    const float b = kPass == Pass::Forward && bias != nullptr ? bias[group * p.Nper + n] : 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t m = m0 + tm + i;
      if (m >= p.M) continue;
      const float v = acc[i][j] + b;
      out[m * p.Co + n] = kPass == Pass::Forward ? relu(v) : v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Direct convolution (any dtype, fp32 accumulation)

struct ConvDims {
  int64_t N;
  int H, W, C, K, R, S, P, Q, Cg, Kg;
  int sh, sw, ph, pw, dh, dw;
  Div64 by_K, by_C, by_Kg, by_Cg, by_RS, by_PQ, by_HW;
};

// y[n, p, q, k] = relu(bias[k] + sum_{r, s, c} x[n, ih, iw, group * Cg + c] w[k, r, s, c]), one
// thread per output element with k the fastest, so a warp shares its x pixel (depthwise: reads
// consecutive channels of it).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_fwd_direct_kernel(const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ bias, T* __restrict__ y, const ConvDims d) {
  const int64_t total = d.N * d.P * d.Q * d.K;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    int k, pix;
    const int64_t n = divmod(d.by_PQ, divmod(d.by_K, i, k), pix);
    const int p = pix / d.Q;
    const int q = pix - p * d.Q;
    const int c0 = k / d.Kg * d.Cg;
    const T* wk = w + int64_t(k) * d.R * d.S * d.Cg;
    float acc = bias != nullptr ? to_float(bias[k]) : 0.f;
    for (int r = 0; r < d.R; ++r) {
      const int ih = p * d.sh - d.ph + r * d.dh;
      if (ih < 0 || ih >= d.H) continue;
      for (int s = 0; s < d.S; ++s) {
        const int iw = q * d.sw - d.pw + s * d.dw;
        if (iw < 0 || iw >= d.W) continue;
        const T* xp = x + ((n * d.H + ih) * d.W + iw) * d.C + c0;
        const T* wp = wk + (r * d.S + s) * d.Cg;
        // Rolled: Cg is small where this kernel runs, and the unrolled loop spills.
#pragma unroll 1
        for (int c = 0; c < d.Cg; ++c) acc = fmaf(to_float(xp[c]), to_float(wp[c]), acc);
      }
    }
    y[i] = from_float<T>(relu(acc));
  }
}

// dx[n, h, w, c] = sum over the output pixels (p, q) that read (h, w) at some (r, s) and the
// group's channels k of g[n, p, q, k] w[k, r, s, c], one thread per element of dx, c fastest.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_dgrad_direct_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                             const T* __restrict__ w, T* __restrict__ dx, const ConvDims d) {
  const int64_t total = d.N * d.H * d.W * d.C;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    int c, pix;
    const int64_t n = divmod(d.by_HW, divmod(d.by_C, i, c), pix);
    const int ih = pix / d.W;
    const int iw = pix - ih * d.W;
    const int group = c / d.Cg;
    const int cc = c - group * d.Cg;
    float acc = 0.f;
    for (int r = 0; r < d.R; ++r) {
      const int th = ih + d.ph - r * d.dh;
      if (th < 0 || th % d.sh != 0 || th / d.sh >= d.P) continue;
      for (int s = 0; s < d.S; ++s) {
        const int tw = iw + d.pw - s * d.dw;
        if (tw < 0 || tw % d.sw != 0 || tw / d.sw >= d.Q) continue;
        const int64_t o = ((n * d.P + th / d.sh) * d.Q + tw / d.sw) * d.K + group * d.Kg;
        const T* wp = w + ((int64_t(group) * d.Kg * d.R + r) * d.S + s) * d.Cg + cc;
        const int64_t w_step = int64_t(d.R) * d.S * d.Cg;
        for (int k = 0; k < d.Kg; ++k) {
          acc = fmaf(masked_grad(dy[o + k], y[o + k]), to_float(wp[k * w_step]), acc);
        }
      }
    }
    dx[i] = from_float<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Weight and bias gradients: fixed-order split reductions

// Partial dweight of split blockIdx.z (rows [z * split_rows, ...) of N P Q) for a 32 x 32 tile
// of (output channel, (r, s, c)) of one group, into ws[z][k][(r, s, c)]: the KRSC layout of
// dweight, so the final sum writes it directly. Each thread owns 2 x 4 outputs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_wgrad_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                      const T* __restrict__ x, float* __restrict__ ws, const ConvDims d,
                      int64_t split_rows, int kg_tiles, int k_tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* sG = reinterpret_cast<float*>(smem);     // [32 rows][33]: masked dy
  float* sX = sG + kWgradTile * (kWgradTile + 1);  // [32 rows][33]: gathered x
  constexpr int kLd = kWgradTile + 1;
  const int tid = threadIdx.x;
  const int kg_tile = static_cast<int>(blockIdx.x % kg_tiles);
  const int k_tile = static_cast<int>(blockIdx.x / kg_tiles % k_tiles);
  const int group = static_cast<int>(blockIdx.x / kg_tiles / k_tiles);
  const int RSC = d.R * d.S * d.Cg;
  const int64_t M = d.N * d.P * d.Q;
  const int64_t m_begin = blockIdx.z * split_rows;
  const int64_t m_end = std::min(M, m_begin + split_rows);

  // Loads: column tid % 32 of rows tid / 32 + 4j. This thread's (r, s, c) column is fixed.
  const int col = tid % kWgradTile;
  const int kg = kg_tile * kWgradTile + col;
  const int k_load = k_tile * kWgradTile + col;
  const int rs = kg / d.Cg;
  const int c = kg - rs * d.Cg;
  const int r = rs / d.S;
  const int s = rs - r * d.S;
  const T* xg = x + group * d.Cg + c;
  const int64_t dy_col = group * d.Kg + k_load;
  // Math: output channels tk, tk + 16 and columns tc + 8j.
  const int tk = tid / 8;
  const int tc = tid % 8;
  float acc[2][4] = {};
  for (int64_t mc = m_begin; mc < m_end; mc += kWgradTile) {
    for (int row = tid / kWgradTile; row < kWgradTile; row += kThreads / kWgradTile) {
      const int64_t m = mc + row;
      float gv = 0.f, xv = 0.f;
      if (m < m_end) {
        if (k_load < d.Kg) gv = masked_grad(dy[m * d.K + dy_col], y[m * d.K + dy_col]);
        if (kg < RSC) {
          int pix;
          const int64_t n = divmod(d.by_PQ, m, pix);
          const int p = pix / d.Q;
          const int q = pix - p * d.Q;
          const int ih = p * d.sh - d.ph + r * d.dh;
          const int iw = q * d.sw - d.pw + s * d.dw;
          if (ih >= 0 && ih < d.H && iw >= 0 && iw < d.W) {
            xv = to_float(xg[((n * d.H + ih) * d.W + iw) * d.C]);
          }
        }
      }
      sG[row * kLd + col] = gv;
      sX[row * kLd + col] = xv;
    }
    __syncthreads();
#pragma unroll 4
    for (int row = 0; row < kWgradTile; ++row) {
      const float g0 = sG[row * kLd + tk];
      const float g1 = sG[row * kLd + tk + 16];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float xv = sX[row * kLd + tc + 8 * j];
        acc[0][j] = fmaf(g0, xv, acc[0][j]);
        acc[1][j] = fmaf(g1, xv, acc[1][j]);
      }
    }
    __syncthreads();
  }
  float* out = ws + (int64_t(blockIdx.z) * d.K + group * d.Kg) * RSC;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int k = k_tile * kWgradTile + tk + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col_out = kg_tile * kWgradTile + tc + 8 * j;
      if (k < d.Kg && col_out < RSC) out[int64_t(k) * RSC + col_out] = acc[i][j];
    }
  }
}

// The tensor-core wgrad's block tile: 64 output channels x 64 (r, s, c) positions, reducing 32
// rows of N P Q per stage; shared rows of 64 + 8 elements (144 bytes) keep the transposing
// ldmatrix reads conflict-free.
constexpr int kWgradTcTile = 64;
constexpr int kWgradTcRows = 32;
constexpr int kWgradTcLd = kWgradTcTile + 8;
constexpr int kWgradTcStage = 2 * kWgradTcRows * kWgradTcLd;
constexpr size_t kWgradTcSmem = kStages * kWgradTcStage * 2;

// Partial dweight of split blockIdx.z on tensor cores (fp16 / bf16): the same sums as
// conv_wgrad_kernel, as a GEMM (K / G) x (R S C / G) reducing over rows of N P Q, whose operands
// both arrive reduction-major (rows of N P Q) and are transposed by ldmatrix.trans. kVec: C / G
// and K / G multiples of 8 and 16-byte aligned tensors: 8-channel chunks, cp.async for x and
// registers for dy / y (masked after the math, as in the dx pass); otherwise element gathers.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    conv_wgrad_tc_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                         const T* __restrict__ x, float* __restrict__ ws, const ConvDims d,
                         int64_t split_rows, int kg_tiles, int k_tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int kg0 = static_cast<int>(blockIdx.x % kg_tiles) * kWgradTcTile;
  const int k0 = static_cast<int>(blockIdx.x / kg_tiles % k_tiles) * kWgradTcTile;
  const int group = static_cast<int>(blockIdx.x / kg_tiles / k_tiles);
  const int RSC = d.R * d.S * d.Cg;
  const int64_t M = d.N * d.P * d.Q;
  const int64_t m_begin = blockIdx.z * split_rows;
  const int64_t m_end = std::min(M, m_begin + split_rows);
  const int num_steps = static_cast<int>(ceil_div(std::max<int64_t>(m_end - m_begin, 0), kWgradTcRows));

  // Loads: the (r, s, c) column and the dy column of this thread are fixed for the whole
  // reduction; only the rows move. Vector path: chunk column tid % 8 of rows tid / 8 + 16i.
  constexpr int kColsPerThread = kVec ? 8 : 1;
  constexpr int kColThreads = kWgradTcTile / kColsPerThread;
  const int col = (tid % kColThreads) * kColsPerThread;
  const int kg = kg0 + col;
  const bool kg_ok = kg < RSC;
  const int rs = kg / d.Cg;
  const int c = kg - rs * d.Cg;
  const int r = rs / d.S;
  const int s = rs - r * d.S;
  const T* xg = x + group * d.Cg + c;
  const bool k_ok = k0 + col < d.Kg;
  const int64_t dy_col = int64_t(group) * d.Kg + k0 + col;
  constexpr int kLoadRows = kWgradTcRows / (kThreads / kColThreads);
  uint4 dy_regs[kVec ? kLoadRows : 1], y_regs[kVec ? kLoadRows : 1];
  bool dy_ok[kVec ? kLoadRows : 1];

  // The x offset of row m at this thread's (r, s, c), or -1 where (r, s) lands in the padding.
  const auto x_offset = [&](int64_t m) -> int64_t {
    int pix;
    const int64_t n = divmod(d.by_PQ, m, pix);
    const int p = pix / d.Q;
    const int q = pix - p * d.Q;
    const int ih = p * d.sh - d.ph + r * d.dh;
    const int iw = q * d.sw - d.pw + s * d.dw;
    if (ih < 0 || ih >= d.H || iw < 0 || iw >= d.W) return -1;
    return ((n * d.H + ih) * d.W + iw) * d.C;
  };
  const auto load_stage = [&](int step, int buf) {
    T* sG = stages + buf * kWgradTcStage;
    T* sX = sG + kWgradTcRows * kWgradTcLd;
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int row = tid / kColThreads + i * (kThreads / kColThreads);
      const int64_t m = m_begin + int64_t(step) * kWgradTcRows + row;
      const bool m_ok = m < m_end;
      const int64_t xo = m_ok && kg_ok ? x_offset(m) : -1;
      if constexpr (kVec) {
        cp_async_16(sX + row * kWgradTcLd + col, xo >= 0 ? xg + xo : x, xo >= 0);
        dy_ok[i] = m_ok && k_ok;
        if (dy_ok[i]) {
          dy_regs[i] = *reinterpret_cast<const uint4*>(dy + m * d.K + dy_col);
          y_regs[i] = *reinterpret_cast<const uint4*>(y + m * d.K + dy_col);
        }
      } else {
        sX[row * kWgradTcLd + col] = xo >= 0 ? xg[xo] : from_float<T>(0.f);
        sG[row * kWgradTcLd + col] = from_float<T>(
            m_ok && k_ok ? masked_grad(dy[m * d.K + dy_col], y[m * d.K + dy_col]) : 0.f);
      }
    }
    cp_async_commit();
  };
  const auto store_masked = [&](int buf) {
    if constexpr (kVec) {
      T* sG = stages + buf * kWgradTcStage;
#pragma unroll
      for (int i = 0; i < kLoadRows; ++i) {
        const int row = tid / kColThreads + i * (kThreads / kColThreads);
        *reinterpret_cast<uint4*>(sG + row * kWgradTcLd + col) =
            dy_ok[i] ? mask_chunk<T>(dy_regs[i], y_regs[i]) : make_uint4(0, 0, 0, 0);
      }
    }
  };

  const int wm = warp / 2;  // output channels wm * 32 + [0, 32)
  const int wn = warp % 2;  // (r, s, c) columns wn * 32 + [0, 32)
  float acc[2][4][4] = {};
  mma_mainloop<T, kWgradTcStage, kWgradTcRows / 16>(
      stages, num_steps, acc, load_stage, store_masked,
      // A (channels x rows) from sG stored rows x channels: matrix i of the x4 load covers rows
      // 8 (i / 2) + [0, 8) and channels 8 (i % 2) + [0, 8).
      [&](uint32_t(&a)[4], const T* sG, int kk, int i) {
        ldmatrix_x4_trans(a, sG + (kk * 16 + (lane / 16) * 8 + lane % 8) * kWgradTcLd + wm * 32 +
                                 i * 16 + (lane / 8 % 2) * 8);
      },
      [&](uint32_t(&b)[4], const T* sG, int kk, int j) {
        const T* sX = sG + kWgradTcRows * kWgradTcLd;
        ldmatrix_x4_trans(b, sX + (kk * 16 + lane % 8 + (lane / 8 % 2) * 8) * kWgradTcLd +
                                 wn * 32 + j * 8 + (lane / 16) * 8);
      });

  float* out = ws + (int64_t(blockIdx.z) * d.K + group * d.Kg) * RSC;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + wm * 32 + i * 16 + lane / 4 + 8 * h;
      if (k >= d.Kg) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col_out = kg0 + wn * 32 + j * 8 + 2 * (lane % 4);
        if (col_out < RSC) out[int64_t(k) * RSC + col_out] = acc[i][j][2 * h];
        if (col_out + 1 < RSC) out[int64_t(k) * RSC + col_out + 1] = acc[i][j][2 * h + 1];
      }
    }
  }
}

// Partial dbias of split blockIdx.x: ws[split][k] = sum of g over its rows, one thread per k.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_dbias_kernel(const T* __restrict__ dy, const T* __restrict__ y, float* __restrict__ ws,
                      int64_t M, int K, int64_t split_rows) {
  const int64_t m_begin = blockIdx.x * split_rows;
  const int64_t m_end = std::min(M, m_begin + split_rows);
  for (int k = threadIdx.x; k < K; k += kThreads) {
    float acc = 0.f;
    for (int64_t m = m_begin; m < m_end; ++m) acc += masked_grad(dy[m * K + k], y[m * K + k]);
    ws[int64_t(blockIdx.x) * K + k] = acc;
  }
}

// out[i] = sum over splits, in split order, of ws[split][i].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const float* __restrict__ ws, int splits, int64_t count, T* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * kThreads) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += ws[s * count + i];
    out[i] = from_float<T>(acc);
  }
}

// wt[group][c][r][s][k] = w[group * Kg + k][r][s][c]: the dx pass's B matrix, whose reduction
// index (r, s, k) must be contiguous like the forward's (r, s, c).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    transpose_weight_kernel(const T* __restrict__ w, T* __restrict__ wt, const ConvDims d) {
  const int64_t total = int64_t(d.K) * d.R * d.S * d.Cg;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    int k, rs, c;
    const int64_t group = divmod(d.by_Cg, divmod(d.by_RS, divmod(d.by_Kg, i, k), rs), c);
    wt[i] = w[((group * d.Kg + k) * d.by_RS.d + rs) * d.Cg + c];
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16:
      return f(static_cast<__half*>(nullptr));
    case DType::BFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    case DType::Float32:
      return f(static_cast<float*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

bool valid_config(const Conv2dConfig& c) {
  const auto in_range = [](int64_t v, int64_t lo) { return v >= lo && v <= kConv2dMaxDim; };
  if (!(c.batch >= 0 && in_range(c.in_channels, 1) && in_range(c.height, 1) &&
        in_range(c.width, 1) && in_range(c.out_channels, 1) && in_range(c.kernel_h, 1) &&
        in_range(c.kernel_w, 1) && in_range(c.stride_h, 1) && in_range(c.stride_w, 1) &&
        in_range(c.pad_h, 0) && in_range(c.pad_w, 0) && in_range(c.dil_h, 1) &&
        in_range(c.dil_w, 1) && in_range(c.groups, 1) && c.in_channels % c.groups == 0 &&
        c.out_channels % c.groups == 0)) {
    return false;
  }
  // Padded extents and filter spans stay 32-bit inside the kernels.
  if (c.height + 2 * c.pad_h > kConv2dMaxDim || c.width + 2 * c.pad_w > kConv2dMaxDim ||
      c.dil_h * (c.kernel_h - 1) > kConv2dMaxDim || c.dil_w * (c.kernel_w - 1) > kConv2dMaxDim) {
    return false;
  }
  const int64_t RS = c.kernel_h * c.kernel_w;
  if (RS > kConv2dMaxDim || RS * (c.in_channels / c.groups) > kConv2dMaxDim ||
      RS * (c.out_channels / c.groups) > kConv2dMaxDim) {
    return false;
  }
  const int64_t P = conv2d_out_size(c.height, c.kernel_h, c.stride_h, c.pad_h, c.dil_h);
  const int64_t Q = conv2d_out_size(c.width, c.kernel_w, c.stride_w, c.pad_w, c.dil_w);
  if (P < 1 || Q < 1 || c.height * c.width > INT_MAX || P * Q > INT_MAX) return false;
  // Element indices of x, y and the weight stay below kMaxIndex (Div64 is exact there); each
  // factor is below 2^31, so the products are checked by division.
  const auto below = [](int64_t a, int64_t b, int64_t c2, int64_t d2) {
    return a < kMaxIndex / b && a * b < kMaxIndex / c2 && a * b * c2 < kMaxIndex / d2;
  };
  return below(std::max<int64_t>(c.batch, 1), c.height, c.width, c.in_channels) &&
         below(std::max<int64_t>(c.batch, 1), P, Q, c.out_channels) &&
         below(c.out_channels, c.kernel_h, c.kernel_w, c.in_channels / c.groups);
}

ConvDims make_dims(const Conv2dConfig& c) {
  ConvDims d{};
  d.N = c.batch;
  d.H = static_cast<int>(c.height);
  d.W = static_cast<int>(c.width);
  d.C = static_cast<int>(c.in_channels);
  d.K = static_cast<int>(c.out_channels);
  d.R = static_cast<int>(c.kernel_h);
  d.S = static_cast<int>(c.kernel_w);
  d.P = static_cast<int>(conv2d_out_size(c.height, c.kernel_h, c.stride_h, c.pad_h, c.dil_h));
  d.Q = static_cast<int>(conv2d_out_size(c.width, c.kernel_w, c.stride_w, c.pad_w, c.dil_w));
  d.Cg = static_cast<int>(c.in_channels / c.groups);
  d.Kg = static_cast<int>(c.out_channels / c.groups);
  d.sh = static_cast<int>(c.stride_h);
  d.sw = static_cast<int>(c.stride_w);
  d.ph = static_cast<int>(c.pad_h);
  d.pw = static_cast<int>(c.pad_w);
  d.dh = static_cast<int>(c.dil_h);
  d.dw = static_cast<int>(c.dil_w);
  d.by_K = make_div(d.K);
  d.by_C = make_div(d.C);
  d.by_Kg = make_div(d.Kg);
  d.by_Cg = make_div(d.Cg);
  d.by_RS = make_div(d.R * d.S);
  d.by_PQ = make_div(d.P * d.Q);
  d.by_HW = make_div(d.H * d.W);
  return d;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The implicit GEMM (tensor cores for fp16 / bf16, CUDA cores for fp32) serves a pass when its
// reduction (R S Cper) fills at least half a kTileK step and a group's output columns (Nper)
// exceed 4 (fewer, and a 64-wide column tile is mostly padding: the direct kernels win), and the
// column tiles of all groups fit the grid's y axis. A first layer's forward (C = 3, 3 x 3: a
// 27-deep reduction) takes the GEMM: the direct kernel's weight loads, strided by R S C across
// a warp's channels, held it to 0.66 ms on 64 x 3 x 64 x 64 -> 64 (bf16, H100,
// benchmarks/results/h100/conv2d_relu.json) where Triton's implicit GEMM, 27 padded to 32, took
// 0.067 ms. Decided from that comparison, not yet timed on a GPU itself.
bool igemm_serves(int64_t groups, int RS, int Cper, int Nper, int64_t rows) {
  return RS * Cper >= kTileK / 2 && Nper > 4 && groups * ceil_div(Nper, kTileN) <= kMaxGridY &&
         ceil_div(rows, kTileM) <= INT_MAX;
}

unsigned direct_blocks(int64_t total) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(total, kThreads), 1, kMaxDirectBlocks));
}

// The implicit GEMM of the forward (dx_pass false: out = y, src = x, b = the weight) or of dx
// (out = dx, src = dy masked by y, b = the transposed weight), whose roles of (H, W, C) and
// (P, Q, K) are swapped.
GemmParams make_gemm_params(const ConvDims& d, bool dx_pass, const void* src, const void* mask,
                            const void* b, const void* bias, void* out) {
  GemmParams p{};
  p.src = src;
  p.mask = mask;
  p.b = b;
  p.bias = bias;
  p.out = out;
  p.Hs = dx_pass ? d.P : d.H;
  p.Ws = dx_pass ? d.Q : d.W;
  p.Cs = dx_pass ? d.K : d.C;
  p.Cper = dx_pass ? d.Kg : d.Cg;
  p.Ho = dx_pass ? d.H : d.P;
  p.Wo = dx_pass ? d.W : d.Q;
  p.Co = dx_pass ? d.C : d.K;
  p.Nper = dx_pass ? d.Cg : d.Kg;
  p.M = d.N * p.Ho * p.Wo;
  p.R = d.R;
  p.S = d.S;
  p.sh = d.sh;
  p.sw = d.sw;
  p.ph = d.ph;
  p.pw = d.pw;
  p.dh = d.dh;
  p.dw = d.dw;
  p.Kgemm = d.R * d.S * p.Cper;
  p.n_tiles = static_cast<int>(ceil_div(p.Nper, kTileN));
  p.pixels = make_div(p.Ho * p.Wo);
  p.pair_stores = p.Co % 2 == 0 && p.Nper % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  p.chunk_stores = p.Co % 8 == 0 && p.Nper % 8 == 0 && aligned16(out);
  return p;
}

template <typename T, Pass kPass>
cudaError_t launch_igemm(const GemmParams& p, bool vec, int64_t groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kTileM)),
                  static_cast<unsigned>(groups * p.n_tiles));
  if constexpr (std::is_same_v<T, float>) {
    conv_igemm_simt_kernel<kPass><<<grid, kThreads, kSimtSmem, stream>>>(p);
  } else if (vec) {
    conv_igemm_kernel<T, kPass, true><<<grid, kThreads, kIgemmSmem, stream>>>(p);
  } else {
    conv_igemm_kernel<T, kPass, false><<<grid, kThreads, kIgemmSmem, stream>>>(p);
  }
  return cudaGetLastError();
}

// dx on tensor cores: the weight transposed into `wt` (workspace), then the implicit GEMM.
template <typename T>
cudaError_t launch_dgrad_igemm(const void* dy, const void* y, const T* w, void* dx, T* wt,
                               const ConvDims& d, int64_t groups, cudaStream_t stream) {
  const int64_t weight_elems = int64_t(d.K) * d.R * d.S * d.Cg;
  transpose_weight_kernel<T><<<direct_blocks(weight_elems), kThreads, 0, stream>>>(w, wt, d);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const GemmParams p = make_gemm_params(d, true, dy, y, wt, nullptr, dx);
  const bool vec = d.Kg % 8 == 0 && aligned16(dy) && aligned16(y);
  return launch_igemm<T, Pass::Dgrad>(p, vec, groups, stream);
}

// Rows of N P Q per split of the wgrad / dbias reductions (a multiple of the wgrad tile) and
// the split count: enough blocks to fill a GPU (about 1024 with the tiles), each reducing at
// least kMinSplitRows rows. A function of the shape only, hence the same order everywhere.
struct Splits {
  int64_t rows;
  int count;
};

Splits make_splits(int64_t M, int64_t tiles) {
  const int64_t wanted = std::clamp<int64_t>(ceil_div(kMaxSplits, tiles), 1, kMaxSplits);
  const int64_t count = std::clamp<int64_t>(ceil_div(M, kMinSplitRows), 1, wanted);
  const int64_t rows = std::max<int64_t>(kWgradTile, ceil_div(ceil_div(M, count), kWgradTile) * kWgradTile);
  return {rows, static_cast<int>(std::max<int64_t>(1, ceil_div(M, rows)))};
}

// dweight on tensor cores for fp16 / bf16 unless a group has at most 4 output channels
// (depthwise), where a 64-channel tile would be nearly empty.
bool wgrad_on_tensor_cores(DType dtype, const ConvDims& d) {
  return dtype != DType::Float32 && d.Kg > 4;
}

// The wgrad grid: tiles of (output channel, (r, s, c)) over all groups.
struct WgradTiles {
  int tile, k_tiles, kg_tiles;
  int64_t total;
};

WgradTiles wgrad_tiles(DType dtype, const ConvDims& d, int64_t groups) {
  WgradTiles t{};
  t.tile = wgrad_on_tensor_cores(dtype, d) ? kWgradTcTile : kWgradTile;
  t.k_tiles = static_cast<int>(ceil_div(d.Kg, t.tile));
  t.kg_tiles = static_cast<int>(ceil_div(int64_t(d.R) * d.S * d.Cg, t.tile));
  t.total = groups * t.k_tiles * t.kg_tiles;
  return t;
}

template <typename T>
cudaError_t launch_wgrad(const T* dy, const T* y, const T* x, float* partial, const ConvDims& d,
                         int64_t split_rows, const WgradTiles& tiles, dim3 grid,
                         cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (tiles.tile == kWgradTcTile) {
      if (d.Cg % 8 == 0 && d.Kg % 8 == 0 && aligned16(dy) && aligned16(y) && aligned16(x)) {
        conv_wgrad_tc_kernel<T, true><<<grid, kThreads, kWgradTcSmem, stream>>>(
            dy, y, x, partial, d, split_rows, tiles.kg_tiles, tiles.k_tiles);
      } else {
        conv_wgrad_tc_kernel<T, false><<<grid, kThreads, kWgradTcSmem, stream>>>(
            dy, y, x, partial, d, split_rows, tiles.kg_tiles, tiles.k_tiles);
      }
      return cudaGetLastError();
    }
  }
  conv_wgrad_kernel<T><<<grid, kThreads, kWgradSmem, stream>>>(dy, y, x, partial, d, split_rows,
                                                               tiles.kg_tiles, tiles.k_tiles);
  return cudaGetLastError();
}

// The backward's workspace, in order: the transposed weight (dx on tensor cores), then the
// dweight and dbias partial sums. Offsets are multiples of 16 bytes.
struct BwdWorkspace {
  size_t wt_bytes, wgrad_offset, wgrad_bytes, dbias_offset, dbias_bytes, total;
  Splits wgrad, dbias;
};

size_t round16(size_t n) { return (n + 15) / 16 * 16; }

BwdWorkspace plan_workspace(const Conv2dConfig& c, DType dtype, bool dx_wanted,
                            bool dweight_wanted, bool dbias_wanted) {
  const ConvDims d = make_dims(c);
  const int64_t M = d.N * d.P * d.Q;
  BwdWorkspace w{};
  const int64_t weight_elems = int64_t(d.K) * d.R * d.S * d.Cg;
  const size_t elem_bytes = dtype == DType::Float32 ? 4 : 2;
  w.wt_bytes = dx_wanted && igemm_serves(c.groups, d.R * d.S, d.Kg, d.Cg, d.N * d.H * d.W)
                   ? round16(static_cast<size_t>(weight_elems) * elem_bytes)
                   : 0;
  w.wgrad = make_splits(M, wgrad_tiles(dtype, d, c.groups).total);
  w.dbias = make_splits(M, 1);
  w.wgrad_offset = w.wt_bytes;
  w.wgrad_bytes = dweight_wanted ? round16(size_t(w.wgrad.count) * weight_elems * sizeof(float)) : 0;
  w.dbias_offset = w.wgrad_offset + w.wgrad_bytes;
  w.dbias_bytes = dbias_wanted ? round16(size_t(w.dbias.count) * d.K * sizeof(float)) : 0;
  w.total = w.dbias_offset + w.dbias_bytes;
  return w;
}

}  // namespace

cudaError_t conv2d_relu_fwd(const void* x, const void* weight, const void* bias, void* y,
                            const Conv2dConfig& config, DType dtype, cudaStream_t stream) {
  if (!valid_config(config)) return cudaErrorInvalidValue;
  const ConvDims d = make_dims(config);
  const int64_t M = d.N * d.P * d.Q;
  if (M == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto type) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(type)>;
    if (igemm_serves(config.groups, d.R * d.S, d.Cg, d.Kg, M)) {
      const GemmParams p = make_gemm_params(d, false, x, nullptr, weight, bias, y);
      const bool vec = d.Cg % 8 == 0 && aligned16(x) && aligned16(weight);
      return launch_igemm<T, Pass::Forward>(p, vec, config.groups, stream);
    }
    conv_fwd_direct_kernel<T><<<direct_blocks(M * d.K), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
        static_cast<T*>(y), d);
    return cudaGetLastError();
  });
}

size_t conv2d_relu_bwd_workspace_bytes(const Conv2dConfig& config, DType dtype, bool dx_wanted,
                                       bool dweight_wanted, bool dbias_wanted) {
  if (!valid_config(config)) return 0;
  return plan_workspace(config, dtype, dx_wanted, dweight_wanted, dbias_wanted).total;
}

cudaError_t conv2d_relu_bwd(const void* dy, const void* y, const void* x, const void* weight,
                            void* dx, void* dweight, void* dbias, void* workspace,
                            size_t workspace_bytes, const Conv2dConfig& config, DType dtype,
                            cudaStream_t stream) {
  if (!valid_config(config)) return cudaErrorInvalidValue;
  const BwdWorkspace plan =
      plan_workspace(config, dtype, dx != nullptr, dweight != nullptr, dbias != nullptr);
  if (workspace_bytes < plan.total || (plan.total > 0 && !aligned16(workspace))) {
    return cudaErrorInvalidValue;
  }
  const ConvDims d = make_dims(config);
  const int64_t M = d.N * d.P * d.Q;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  return dispatch_dtype(dtype, [&](auto type) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* dy_t = static_cast<const T*>(dy);
    const T* y_t = static_cast<const T*>(y);
    const T* w_t = static_cast<const T*>(weight);
    cudaError_t err = cudaSuccess;
    const int64_t dx_elems = d.N * d.H * d.W * d.C;
    if (dx != nullptr && dx_elems > 0) {
      if (plan.wt_bytes > 0) {
        err = launch_dgrad_igemm<T>(dy, y, w_t, dx, reinterpret_cast<T*>(ws), d, config.groups,
                                    stream);
      } else {
        conv_dgrad_direct_kernel<T><<<direct_blocks(dx_elems), kThreads, 0, stream>>>(
            dy_t, y_t, w_t, static_cast<T*>(dx), d);
        err = cudaGetLastError();
      }
      if (err != cudaSuccess) return err;
    }
    if (dweight != nullptr) {
      float* partial = reinterpret_cast<float*>(ws + plan.wgrad_offset);
      const WgradTiles tiles = wgrad_tiles(dtype, d, config.groups);
      const dim3 grid(static_cast<unsigned>(tiles.total), 1,
                      static_cast<unsigned>(plan.wgrad.count));
      const T* x_t = static_cast<const T*>(x);
      err = launch_wgrad(dy_t, y_t, x_t, partial, d, plan.wgrad.rows, tiles, grid, stream);
      if (err != cudaSuccess) return err;
      const int64_t count = int64_t(d.K) * d.R * d.S * d.Cg;
      sum_splits_kernel<T><<<direct_blocks(count), kThreads, 0, stream>>>(
          partial, plan.wgrad.count, count, static_cast<T*>(dweight));
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (dbias != nullptr) {
      float* partial = reinterpret_cast<float*>(ws + plan.dbias_offset);
      const unsigned blocks = static_cast<unsigned>(plan.dbias.count);
      conv_dbias_kernel<T><<<blocks, kThreads, 0, stream>>>(dy_t, y_t, partial, M, d.K,
                                                            plan.dbias.rows);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      sum_splits_kernel<T><<<direct_blocks(d.K), kThreads, 0, stream>>>(
          partial, plan.dbias.count, d.K, static_cast<T*>(dbias));
      err = cudaGetLastError();
    }
    return err;
  });
}

}  // namespace cuda
}  // namespace dlfast
