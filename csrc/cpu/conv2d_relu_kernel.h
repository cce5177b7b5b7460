// Backward of Conv2d + bias + ReLU for few input channels per group, written once with at::vec
// and compiled once per ISA by kernels_<isa>.cpp (which defines CPU_CAPABILITY first).
//
// Why a kernel of our own: with 1-4 input channels per group (a course model's first layer,
// depthwise convolutions) oneDNN's backward convolution runs far below the machine's FMA rate,
// and ATen first writes the masked gradient g = dy * (y > 0) to memory as a full
// activation-sized tensor. Here g is formed on the fly from dy and the forward's output y, a
// block of output rows at a time, in per-thread buffers that stay in cache. Flattening the
// block's (row, q) positions to one index i, both gradients are small matrix products:
//   dweight[k, t] += sum over i of g[k, i] * cols[t, i]
//   dcols[t, i]    = sum over k of weight[k, t] * g[k, i]      (then col2im into dx)
// where t runs over the Cg * R * S taps and cols[t, i] is the input value tap t of position i
// reads (zero in the padding). The buffers are padded with zeros to whole register blocks (output
// channels to kKBlock, taps to kTapBlock, positions to kPosBlock vectors), so the two
// register-blocked loops below have no remainders.
//
// Work is split by (image, group): each unit owns its dx plane outright, so there are no write
// conflicts, and dweight/dbias are summed per fixed chunk of units and the chunks added in order,
// so the result does not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

namespace conv_bwd {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
// Register blocks: weight_grad_block keeps kKBlock x kTapBlock vector sums (24 on AVX-512, 12 of
// AVX2's 16 registers), input_grad_block kTapBlock x kPosBlock. Three taps divide the 9 or 27 of a
// 3x3 kernel over 1 or 3 channels, so little of the padding is computed.
constexpr int kKBlock = V >= 16 ? 8 : 4;
constexpr int kTapBlock = 3;
constexpr int kPosBlock = 4;
// Units (image, group) are summed into at most this many dweight/dbias partials.
constexpr int64_t kMaxChunks = 256;
// Floats of per-thread block buffers (cols, g, dcols) to aim for: about 256 KiB, within L2.
constexpr int64_t kBlockFloats = 65536;

inline Vec masked(const Vec& dy, const Vec& y) {
  return Vec::blendv(dy, Vec(0.f), y <= Vec(0.f));
}

// g[0, n) = dy where y > 0, else 0: threshold_backward's rule (a NaN in y lets dy through).
template <typename T>
inline void masked_grad_run(const T* dy, const T* y, int64_t n, float* g) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; i += V) {
      const int64_t m = std::min<int64_t>(V, n - i);
      masked(Vec::loadu(dy + i, m), Vec::loadu(y + i, m)).store(g + i, m);
    }
  } else {
    using VecT = at::vec::Vectorized<T>;
    static_assert(VecT::size() == 2 * V, "a vector of T widens to two of float");
    for (int64_t i = 0; i < n; i += 2 * V) {
      const int64_t m = std::min<int64_t>(2 * V, n - i);
      const auto [d0, d1] = at::vec::convert_to_float<T>(VecT::loadu(dy + i, m));
      const auto [y0, y1] = at::vec::convert_to_float<T>(VecT::loadu(y + i, m));
      masked(d0, y0).store(g + i, std::min<int64_t>(V, m));
      if (m > V) masked(d1, y1).store(g + i + V, m - V);
    }
  }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The output columns [lo, hi) whose input column q * stride + w0 lies in [0, W): the gather and
// the col2im loops run over them without a per-element test (contiguous when stride is 1).
inline std::pair<int64_t, int64_t> inside_columns(int64_t Q, int64_t W, int64_t stride, int64_t w0) {
  const int64_t hi = W - 1 - w0 < 0 ? 0 : std::min(Q, (W - 1 - w0) / stride + 1);
  const int64_t lo = w0 >= 0 ? 0 : (-w0 + stride - 1) / stride;
  return {std::min(lo, hi), hi};
}

// acc[k0 + kk][t0 + j] += g[k0 + kk, :] . cols[t0 + j, :] for kk < kKBlock, j < kTapBlock, as
// vectors of V partial sums (reduced to scalars once per unit). g: (.., Lp), cols: (.., Lp).
inline void weight_grad_block(const float* g, const float* cols, int64_t Lp, int64_t tapsp,
                              int64_t k0, int64_t t0, float* acc) {
  Vec sum[kKBlock][kTapBlock];
  for (int kk = 0; kk < kKBlock; ++kk)
    for (int j = 0; j < kTapBlock; ++j) sum[kk][j] = Vec(0.f);
  for (int64_t i = 0; i < Lp; i += V) {
    Vec c[kTapBlock];
    for (int j = 0; j < kTapBlock; ++j) c[j] = Vec::loadu(cols + (t0 + j) * Lp + i);
    for (int kk = 0; kk < kKBlock; ++kk) {
      const Vec gv = Vec::loadu(g + (k0 + kk) * Lp + i);
      for (int j = 0; j < kTapBlock; ++j) sum[kk][j] = at::vec::fmadd(gv, c[j], sum[kk][j]);
    }
  }
  for (int kk = 0; kk < kKBlock; ++kk) {
    for (int j = 0; j < kTapBlock; ++j) {
      float* a = acc + ((k0 + kk) * tapsp + t0 + j) * V;
      (Vec::loadu(a) + sum[kk][j]).store(a);
    }
  }
}

// dcols[t0 + j, i0 + b * V ...] = sum over k of weight[k, t0 + j] * g[k, same] for j <
// kTapBlock, b < kPosBlock. weight: (Kgp, tapsp), zero-padded.
inline void input_grad_block(const float* g, const float* weight, int64_t Kgp, int64_t Lp,
                             int64_t tapsp, int64_t t0, int64_t i0, float* dcols) {
  Vec sum[kTapBlock][kPosBlock];
  for (int j = 0; j < kTapBlock; ++j)
    for (int b = 0; b < kPosBlock; ++b) sum[j][b] = Vec(0.f);
  for (int64_t k = 0; k < Kgp; ++k) {
    Vec gv[kPosBlock];
    for (int b = 0; b < kPosBlock; ++b) gv[b] = Vec::loadu(g + k * Lp + i0 + b * V);
    for (int j = 0; j < kTapBlock; ++j) {
      const Vec w(weight[k * tapsp + t0 + j]);
      for (int b = 0; b < kPosBlock; ++b) sum[j][b] = at::vec::fmadd(gv[b], w, sum[j][b]);
    }
  }
  for (int j = 0; j < kTapBlock; ++j)
    for (int b = 0; b < kPosBlock; ++b) sum[j][b].store(dcols + (t0 + j) * Lp + i0 + b * V);
}

template <typename T>
void run(const Conv2dReluBwdArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* y = static_cast<const T*>(a.y);
  T* dx = static_cast<T*>(a.dx);
  const int64_t Cg = a.C / a.groups, Kg = a.K / a.groups;
  const int64_t taps = Cg * a.R * a.S;
  const int64_t Kgp = round_up(Kg, kKBlock), tapsp = round_up(taps, kTapBlock);
  const int64_t units = a.N * a.groups;
  const int64_t chunks = std::min(units, kMaxChunks);
  // Output rows per block: the block's g, cols and dcols fit the per-thread budget.
  const int64_t block_rows =
      std::clamp<int64_t>(kBlockFloats / ((Kgp + 2 * tapsp) * a.Q), 1, a.P);
  const int64_t Lmax = round_up(block_rows * a.Q, kPosBlock * V);
  const bool want_dw = a.dweight != nullptr, want_dx = dx != nullptr;
  std::vector<float> dweight_part(want_dw ? chunks * a.K * taps : 0, 0.f);
  std::vector<float> dbias_part(a.dbias != nullptr ? chunks * a.K : 0, 0.f);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> g(Kgp * Lmax), cols(want_dw ? tapsp * Lmax : 0), dcols(want_dx ? tapsp * Lmax : 0);
    std::vector<float> wpad(want_dx ? Kgp * tapsp : 0, 0.f);  // its padding is never written
    std::vector<float> dx_plane(want_dx ? Cg * a.H * a.W : 0);
    // (Not a vector of Vec: std::vector does not honour its 64-byte alignment here.)
    std::vector<float> dw_acc(want_dw ? Kgp * tapsp * V : 0, 0.f);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* db_part = a.dbias != nullptr ? dbias_part.data() + chunk * a.K : nullptr;
      int64_t wpad_group = -1;  // the group whose weights wpad holds
      for (int64_t unit = chunk * units / chunks; unit < (chunk + 1) * units / chunks; ++unit) {
        const int64_t n = unit / a.groups, grp = unit % a.groups;
        const int64_t c0 = grp * Cg, k0 = grp * Kg;
        if (want_dx && grp != wpad_group) {
          for (int64_t k = 0; k < Kg; ++k) {
            std::copy_n(a.weight + (k0 + k) * taps, taps, wpad.data() + k * tapsp);
          }
          wpad_group = grp;
        }
        std::fill(dx_plane.begin(), dx_plane.end(), 0.f);
        for (int64_t p0 = 0; p0 < a.P; p0 += block_rows) {
          const int64_t rows = std::min(block_rows, a.P - p0);
          const int64_t L = rows * a.Q, Lp = round_up(L, kPosBlock * V);
          // g[k, row * Q + q] for the block (rows of a plane lie end to end in dy and y), and
          // the bias gradient from it.
          for (int64_t k = 0; k < Kg; ++k) {
            const int64_t plane = ((n * a.K + k0 + k) * a.P + p0) * a.Q;
            float* gk = g.data() + k * Lp;
            masked_grad_run(dy + plane, y + plane, L, gk);
            std::fill(gk + L, gk + Lp, 0.f);  // the positions padding the block
            if (db_part != nullptr) {
              Vec sum(0.f);
              for (int64_t i = 0; i < L; i += V) sum = sum + Vec::loadu(gk + i);
              db_part[k0 + k] +=
                  at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, sum);
            }
          }
          // The padding channels and taps (rows of the buffers at this block's stride Lp).
          std::fill(g.begin() + Kg * Lp, g.begin() + Kgp * Lp, 0.f);
          if (want_dw) {
            std::fill(cols.begin() + taps * Lp, cols.begin() + tapsp * Lp, 0.f);
            // cols[t, row * Q + q]: what tap t = (c, r, s) of output (p0 + row, q) reads.
            for (int64_t c = 0; c < Cg; ++c) {
              const T* xplane = x + ((n * a.C + c0 + c) * a.H) * a.W;
              for (int64_t r = 0; r < a.R; ++r) {
                for (int64_t s = 0; s < a.S; ++s) {
                  float* ct = cols.data() + ((c * a.R + r) * a.S + s) * Lp;
                  const int64_t w0 = s * a.dil_w - a.pad_w;
                  const auto [lo, hi] = inside_columns(a.Q, a.W, a.stride_w, w0);
                  for (int64_t row = 0; row < rows; ++row) {
                    const int64_t h = (p0 + row) * a.stride_h - a.pad_h + r * a.dil_h;
                    float* dst = ct + row * a.Q;
                    if (h < 0 || h >= a.H) {
                      std::fill(dst, dst + a.Q, 0.f);
                      continue;
                    }
                    std::fill(dst, dst + lo, 0.f);
                    std::fill(dst + hi, dst + a.Q, 0.f);
                    const T* src = xplane + h * a.W + lo * a.stride_w + w0;  // column of q = lo
                    if (a.stride_w == 1) {
                      at::vec::convert(src, dst + lo, hi - lo);
                    } else {
                      for (int64_t q = lo; q < hi; ++q) {
                        dst[q] = static_cast<float>(src[(q - lo) * a.stride_w]);
                      }
                    }
                  }
                  std::fill(ct + L, ct + Lp, 0.f);
                }
              }
            }
            for (int64_t kb = 0; kb < Kgp; kb += kKBlock) {
              for (int64_t t0 = 0; t0 < tapsp; t0 += kTapBlock) {
                weight_grad_block(g.data(), cols.data(), Lp, tapsp, kb, t0, dw_acc.data());
              }
            }
          }
          if (want_dx) {
            for (int64_t t0 = 0; t0 < tapsp; t0 += kTapBlock) {
              for (int64_t i0 = 0; i0 < Lp; i0 += kPosBlock * V) {
                input_grad_block(g.data(), wpad.data(), Kgp, Lp, tapsp, t0, i0, dcols.data());
              }
            }
            // col2im: each tap's gradient back onto the input position it read.
            for (int64_t c = 0; c < Cg; ++c) {
              float* dplane = dx_plane.data() + c * a.H * a.W;
              for (int64_t r = 0; r < a.R; ++r) {
                for (int64_t s = 0; s < a.S; ++s) {
                  const float* dt = dcols.data() + ((c * a.R + r) * a.S + s) * Lp;
                  const int64_t w0 = s * a.dil_w - a.pad_w;
                  const auto [lo, hi] = inside_columns(a.Q, a.W, a.stride_w, w0);
                  for (int64_t row = 0; row < rows; ++row) {
                    const int64_t h = (p0 + row) * a.stride_h - a.pad_h + r * a.dil_h;
                    if (h < 0 || h >= a.H) continue;
                    const float* src = dt + row * a.Q + lo;
                    float* dst = dplane + h * a.W + lo * a.stride_w + w0;  // column of q = lo
                    for (int64_t q = 0; q < hi - lo; ++q) dst[q * a.stride_w] += src[q];
                  }
                }
              }
            }
          }
        }
        if (want_dx) {
          at::vec::convert(dx_plane.data(), dx + (n * a.C + c0) * a.H * a.W, Cg * a.H * a.W);
        }
        if (want_dw) {  // this unit's sums, into its group's rows of the chunk's partial
          float* dw_part = dweight_part.data() + (chunk * a.K + k0) * taps;
          for (int64_t k = 0; k < Kg; ++k) {
            for (int64_t t = 0; t < taps; ++t) {
              float* v = dw_acc.data() + (k * tapsp + t) * V;
              dw_part[k * taps + t] += at::vec::vec_reduce_all<float>(
                  [](Vec& u, Vec& w) { return u + w; }, Vec::loadu(v));
              std::fill(v, v + V, 0.f);
            }
          }
        }
      }
    }
  });
  // The chunks' partial sums, added in chunk order.
  if (want_dw) {
    std::fill(a.dweight, a.dweight + a.K * taps, 0.f);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* part = dweight_part.data() + chunk * a.K * taps;
      for (int64_t i = 0; i < a.K * taps; ++i) a.dweight[i] += part[i];
    }
  }
  if (a.dbias != nullptr) {
    std::fill(a.dbias, a.dbias + a.K, 0.f);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t k = 0; k < a.K; ++k) a.dbias[k] += dbias_part[chunk * a.K + k];
    }
  }
}

}  // namespace conv_bwd

void conv2d_relu_direct_bwd(const Conv2dReluBwdArgs& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float: return conv_bwd::run<float>(args);
    case c10::ScalarType::Half: return conv_bwd::run<c10::Half>(args);
    case c10::ScalarType::BFloat16: return conv_bwd::run<c10::BFloat16>(args);
    default: TORCH_CHECK(false, "dlfast::conv2d_relu: the direct backward does not take ", args.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
