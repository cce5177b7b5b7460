// Direct Conv2d + bias + ReLU for few input channels per group, written once with at::vec and
// compiled once per ISA by kernels_<isa>.cpp (which defines CPU_CAPABILITY first).
//
// Why a direct kernel: with 1-4 channels per group (a course model's first layer, depthwise
// convolutions) the GEMM that oneDNN builds has a reduction of at most 4 * R * S and spends its
// time on packing, so PyTorch's conv runs far below the machine's FMA rate there. Here each task
// takes one output row (n, group, p): it gathers the Cg * R * S input rows that feed it into a
// small per-thread buffer `cols` (zeros where the window leaves the padded input), then every
// output channel of the group is a short dot product over those rows, vectorised along the
// output width, finished with bias and ReLU before the single store.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <memory>

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

// Output channels computed together: each gathered input vector feeds this many FMAs.
constexpr int64_t kConvChannelBlock = 4;

template <typename T>
void conv2d_relu_direct_fwd_typed(const Conv2dReluDirectArgs& a) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t Cg = a.C / a.groups, Kg = a.K / a.groups;
  const int64_t taps = Cg * a.R * a.S;  // rows of `cols`
  // Row length rounded up to whole vectors, so the compute loop has no scalar tail.
  const int64_t Qpad = (a.Q + V - 1) / V * V;
  const int64_t rows = a.N * a.groups * a.P;
  // About 64k multiply-adds per task before splitting across threads.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Kg * taps * a.Q));

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> cols(new float[taps * Qpad]);
    std::unique_ptr<float[]> acc(new float[kConvChannelBlock * Qpad]);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = row % a.P;
      const int64_t g = (row / a.P) % a.groups;
      const int64_t n = row / (a.P * a.groups);
      // Gather: cols[(c, r, s)][q] = x[n, g * Cg + c, p * sh - ph + r * dh, q * sw - pw + s * dw].
      for (int64_t c = 0; c < Cg; ++c) {
        const T* plane = x + ((n * a.C + g * Cg + c) * a.H) * a.W;
        for (int64_t r = 0; r < a.R; ++r) {
          const int64_t h = p * a.stride_h - a.pad_h + r * a.dil_h;
          for (int64_t s = 0; s < a.S; ++s) {
            float* dst = cols.get() + ((c * a.R + r) * a.S + s) * Qpad;
            if (h < 0 || h >= a.H) {
              std::fill(dst, dst + Qpad, 0.f);
              continue;
            }
            const T* src = plane + h * a.W;
            const int64_t w0 = s * a.dil_w - a.pad_w;
            for (int64_t q = 0; q < Qpad; ++q) {
              const int64_t w = q * a.stride_w + w0;
              dst[q] = (q < a.Q && w >= 0 && w < a.W) ? static_cast<float>(src[w]) : 0.f;
            }
          }
        }
      }
      // Compute kConvChannelBlock output channels per sweep over cols.
      for (int64_t k0 = 0; k0 < Kg; k0 += kConvChannelBlock) {
        const int64_t kb = std::min(kConvChannelBlock, Kg - k0);
        const int64_t kbase = g * Kg + k0;
        for (int64_t q = 0; q < Qpad; q += V) {
          Vec s[kConvChannelBlock];
          for (int64_t i = 0; i < kConvChannelBlock; ++i) {
            s[i] = Vec(a.bias != nullptr && i < kb ? a.bias[kbase + i] : 0.f);
          }
          for (int64_t t = 0; t < taps; ++t) {
            const Vec in = Vec::loadu(cols.get() + t * Qpad + q);
            for (int64_t i = 0; i < kConvChannelBlock; ++i) {
              // Channels past kb multiply zero weights and are never stored.
              const float w = i < kb ? a.weight[(kbase + i) * taps + t] : 0.f;
              s[i] = at::vec::fmadd(in, Vec(w), s[i]);
            }
          }
          for (int64_t i = 0; i < kb; ++i) {
            at::vec::clamp_min(s[i], Vec(0.f)).store(acc.get() + i * Qpad + q);
          }
        }
        for (int64_t i = 0; i < kb; ++i) {
          T* out = y + (((n * a.K + kbase + i) * a.P + p) * a.Q);
          const float* src = acc.get() + i * Qpad;
          for (int64_t q = 0; q < a.Q; ++q) out[q] = static_cast<T>(src[q]);
        }
      }
    }
  });
}

void conv2d_relu_direct_fwd(const Conv2dReluDirectArgs& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float: return conv2d_relu_direct_fwd_typed<float>(args);
    case c10::ScalarType::Half: return conv2d_relu_direct_fwd_typed<c10::Half>(args);
    case c10::ScalarType::BFloat16: return conv2d_relu_direct_fwd_typed<c10::BFloat16>(args);
    default: TORCH_CHECK(false, "dlfast::conv2d_relu: the direct kernel does not take ", args.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
