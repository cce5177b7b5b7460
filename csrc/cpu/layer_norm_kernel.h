// LayerNorm row kernels, written once with at::vec and compiled once per ISA by
// kernels_<isa>.cpp (which defines CPU_CAPABILITY before including this file).
//
// Each row is read from memory once: reduced-precision rows are widened into a
// per-thread buffer that stays in L1/L2, and the mean and the centred variance are
// two passes over that buffer (a shifted one-pass formula loses digits on rows with
// an outlier; the second pass over cached data costs little).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <type_traits>

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// float for float/half/bfloat16 rows (fp32 accumulation), double for double rows.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Work per parallel task: enough elements that scheduling costs are noise.
constexpr int64_t kGrainElements = 32768;

// Sum of f(x) over a row; f takes a Vectorized or a scalar. Four accumulators
// hide the add latency when the row is already in cache.
template <typename Acc, typename F>
inline Acc row_sum(const Acc* p, int64_t n, const F& f) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  Vec s0(Acc(0)), s1(Acc(0)), s2(Acc(0)), s3(Acc(0));
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    s0 = s0 + f(Vec::loadu(p + j));
    s1 = s1 + f(Vec::loadu(p + j + V));
    s2 = s2 + f(Vec::loadu(p + j + 2 * V));
    s3 = s3 + f(Vec::loadu(p + j + 3 * V));
  }
  for (; j + V <= n; j += V) {
    s0 = s0 + f(Vec::loadu(p + j));
  }
  Acc s = at::vec::vec_reduce_all<Acc>(
      [](Vec& a, Vec& b) { return a + b; }, (s0 + s1) + (s2 + s3));
  for (; j < n; ++j) {
    s += f(p[j]);
  }
  return s;
}

// Vector loads and stores of a T row as Acc. Reduced-precision rows move two float
// vectors per step (one full Vectorized<T>); float and double rows one vector.
template <typename T>
struct RowIO {
  using Acc = acc_t<T>;
  using Vec = Vectorized<Acc>;
  static constexpr bool kWiden = !std::is_same_v<T, Acc>;
  static constexpr int kVecs = kWiden ? 2 : 1;
  static constexpr int64_t kStep = kVecs * Vec::size();

  static void load(const T* p, Vec (&v)[kVecs]) {
    if constexpr (kWiden) {
      std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    } else {
      v[0] = Vec::loadu(p);
    }
  }
  static void store(T* p, const Vec (&v)[kVecs]) {
    if constexpr (kWiden) {
      at::vec::convert_from_float<T>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
  // A store that bypasses the caches (non-temporal): the destination line is not read for
  // ownership first, so a memory-bound pass writing an output moves a third fewer bytes. p must
  // be aligned to kAlign; where the ISA has no such store, a plain one.
  static void stream(T* p, const Vec (&v)[kVecs]) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kWiden) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<T>(v[0], v[1]));
    } else if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, v[0]);
    } else {
      _mm512_stream_pd(p, v[0]);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kWiden) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<T>(v[0], v[1]));
    } else if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, v[0]);
    } else {
      _mm256_stream_pd(p, v[0]);
    }
#else
    store(p, v);
#endif
  }
  static constexpr uintptr_t kAlign = kStep * sizeof(T);
  // Whether a row starting at p can be written by stream() (each step stays aligned).
  static bool can_stream(const T* p) { return reinterpret_cast<uintptr_t>(p) % kAlign == 0; }
  // Orders this thread's non-temporal stores before what follows (they are weakly ordered).
  static void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();
#endif
  }
};

// A per-thread Acc copy of a row, allocated only for reduced-precision T (float and
// double rows are read in place).
template <typename T>
struct AccBuffer {
  using Acc = acc_t<T>;
  explicit AccBuffer(int64_t n) : data(RowIO<T>::kWiden ? new Acc[n] : nullptr) {}
  std::unique_ptr<Acc[]> data;
};

// weight or bias as Acc: the tensor itself, or a widened per-thread copy; nullptr if absent.
template <typename T>
const acc_t<T>* acc_vector(const T* v, int64_t n, AccBuffer<T>& buf) {
  if (v == nullptr) return nullptr;
  if constexpr (!RowIO<T>::kWiden) {
    return v;
  } else {
    for (int64_t j = 0; j < n; ++j) buf.data[j] = static_cast<acc_t<T>>(v[j]);
    return buf.data.get();
  }
}

// Shifted sums s1 = sum(x - k) and s2 = sum((x - k)^2) of a T row, in the one pass that reads
// it from memory (widening it into `widened` on the way when T is reduced). Returns the row as Acc.
template <typename T>
const acc_t<T>* load_and_moments(const T* row, int64_t n, acc_t<T> k, AccBuffer<T>& widened,
                                 acc_t<T>& s1, acc_t<T>& s2) {
  using IO = RowIO<T>;
  using Acc = acc_t<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = Vec::size();
  Acc* out = widened.data.get();
  const Vec vk(k);
  Vec a1(Acc(0)), a2(Acc(0)), b1(Acc(0)), b2(Acc(0));
  int64_t j = 0;
  for (; j + 2 * V <= n; j += 2 * V) {
    Vec v0, v1;
    if constexpr (IO::kWiden) {
      Vec v[2];
      IO::load(row + j, v);
      v0 = v[0];
      v1 = v[1];
      v0.store(out + j);
      v1.store(out + j + V);
    } else {
      v0 = Vec::loadu(row + j);
      v1 = Vec::loadu(row + j + V);
    }
    const Vec d0 = v0 - vk, d1 = v1 - vk;
    a1 = a1 + d0;
    b1 = b1 + d1;
    a2 = at::vec::fmadd(d0, d0, a2);
    b2 = at::vec::fmadd(d1, d1, b2);
  }
  auto add = [](Vec& p, Vec& q) { return p + q; };
  s1 = at::vec::vec_reduce_all<Acc>(add, a1 + b1);
  s2 = at::vec::vec_reduce_all<Acc>(add, a2 + b2);
  for (; j < n; ++j) {
    const Acc v = static_cast<Acc>(row[j]);
    if constexpr (IO::kWiden) out[j] = v;
    s1 += v - k;
    s2 += (v - k) * (v - k);
  }
  if constexpr (IO::kWiden) {
    return out;
  } else {
    return row;
  }
}

// y = (x - mean) * rstd * w + b, with w and b optional (has_w, has_b are compile-time
// flags, so the loop carries no per-element branch).
// `next` (the next row of x, or nullptr) is prefetched as y is written: the pass that reads a
// row from memory otherwise starts only after this one, and the read of a row and the write
// of the previous one would not overlap.
template <typename T, bool kHasW, bool kHasB>
void normalize_row(const acc_t<T>* xr, const acc_t<T>* w, const acc_t<T>* b, T* yr, int64_t n,
                   acc_t<T> mu, acc_t<T> rs, const T* next, bool stream) {
  using IO = RowIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = Vec::size();
  const Vec vmu(mu), vrs(rs);
  int64_t j = 0;
  for (; j + IO::kStep <= n; j += IO::kStep) {
    if (next) __builtin_prefetch(next + j);
    Vec out[IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      const int64_t c = j + k * V;
      Vec v = (Vec::loadu(xr + c) - vmu) * vrs;
      if constexpr (kHasW) v = v * Vec::loadu(w + c);
      if constexpr (kHasB) v = v + Vec::loadu(b + c);
      out[k] = v;
    }
    if (stream) {
      IO::stream(yr + j, out);
    } else {
      IO::store(yr + j, out);
    }
  }
  for (; j < n; ++j) {
    acc_t<T> v = (xr[j] - mu) * rs;
    if constexpr (kHasW) v *= w[j];
    if constexpr (kHasB) v += b[j];
    yr[j] = static_cast<T>(v);
  }
}

// Per row: the mean and variance in the pass that reads the row, then one pass that writes y.
template <typename T>
void layer_norm_fwd_typed(const LayerNormFwdArgs& args) {
  using Acc = acc_t<T>;
  const int64_t M = args.M, N = args.N;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  Acc* mean = static_cast<Acc*>(args.mean);
  Acc* rstd = static_cast<Acc*>(args.rstd);
  const Acc eps = static_cast<Acc>(args.eps);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N, 1));

  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    AccBuffer<T> row(N), w_buf(N), b_buf(N);
    const Acc* w = acc_vector(static_cast<const T*>(args.weight), N, w_buf);
    const Acc* b = acc_vector(static_cast<const T*>(args.bias), N, b_buf);
    auto normalize = w ? (b ? normalize_row<T, true, true> : normalize_row<T, true, false>)
                       : (b ? normalize_row<T, false, true> : normalize_row<T, false, false>);
    for (int64_t i = begin; i < end; ++i) {
      // Moments shifted by the row's first element, in one pass: var = E[(x-k)^2] - (mean-k)^2
      // loses about (mean-k)^2 / var of relative precision, so when k sits far from the mean
      // the variance is recomputed exactly (centred) from the cached row.
      const Acc k = static_cast<Acc>(x[i * N]);
      Acc s1, s2;
      const Acc* xr = load_and_moments(x + i * N, N, k, row, s1, s2);
      const Acc shift = s1 / N;
      const Acc mu = k + shift;
      Acc var = s2 / N - shift * shift;
      if (!(shift * shift <= 8 * var)) {
        var = row_sum(xr, N, [mu](auto v) {
                using V_t = decltype(v);
                V_t d = v - V_t(mu);
                return d * d;
              }) / N;
      }
      const Acc rs = Acc(1) / std::sqrt(var + eps);
      mean[i] = mu;
      rstd[i] = rs;
      normalize(xr, w, b, y + i * N, N, mu, rs, i + 1 < end ? x + (i + 1) * N : nullptr,
                args.stream_y && RowIO<T>::can_stream(y + i * N));
    }
    if (args.stream_y) RowIO<T>::stream_fence();
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w, written as
// dx = a*g + c*x + b per row: one pass for the two row sums (widening x and dy into
// per-thread buffers when T is reduced), one pass writing dx. dweight/dbias: each chunk
// of rows sums into private Acc buffers, then the chunks are added in a fixed order (no
// atomics, repeatable for a given thread count).
template <typename T>
void layer_norm_bwd_typed(const LayerNormBwdArgs& args) {
  using Acc = acc_t<T>;
  using IO = RowIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t V = Vec::size();
  const int64_t M = args.M, N = args.N;
  const T* dy = static_cast<const T*>(args.dy);
  const T* x = static_cast<const T*>(args.x);
  const Acc* mean = static_cast<const Acc*>(args.mean);
  const Acc* rstd = static_cast<const Acc*>(args.rstd);
  T* dx = static_cast<T*>(args.dx);
  const bool want_dw = args.dweight != nullptr, want_db = args.dbias != nullptr;

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  std::unique_ptr<Acc[]> dw_part(want_dw ? new Acc[chunks * N]() : nullptr);
  std::unique_ptr<Acc[]> db_part(want_db ? new Acc[chunks * N]() : nullptr);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    AccBuffer<T> x_buf(N), dy_buf(N), w_buf(N);
    const Acc* w = acc_vector(static_cast<const T*>(args.weight), N, w_buf);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      Acc* dw = want_dw ? dw_part.get() + c * N : nullptr;
      Acc* db = want_db ? db_part.get() + c * N : nullptr;
      for (int64_t i = c * M / chunks; i < (c + 1) * M / chunks; ++i) {
        const Acc mu = mean[i], rs = rstd[i];
        const T* x_row = x + i * N;
        const T* dy_row = dy + i * N;
        Acc* xw = x_buf.data.get();
        Acc* gw = dy_buf.data.get();
        // Pass 1: sum(g) and sum(g * (x - mu)), g = dy * w.
        Vec sg(Acc(0)), sgx(Acc(0));
        int64_t j = 0;
        for (; j + IO::kStep <= N; j += IO::kStep) {
          Vec xv[IO::kVecs], gv[IO::kVecs];
          IO::load(x_row + j, xv);
          IO::load(dy_row + j, gv);
          for (int k = 0; k < IO::kVecs; ++k) {
            const int64_t col = j + k * V;
            if constexpr (IO::kWiden) {
              xv[k].store(xw + col);
              gv[k].store(gw + col);
            }
            const Vec g = w ? gv[k] * Vec::loadu(w + col) : gv[k];
            sg = sg + g;
            sgx = sgx + g * (xv[k] - Vec(mu));
          }
        }
        auto add = [](Vec& p, Vec& q) { return p + q; };
        Acc sum_g = at::vec::vec_reduce_all<Acc>(add, sg);
        Acc sum_gx = at::vec::vec_reduce_all<Acc>(add, sgx);
        for (; j < N; ++j) {
          const Acc xj = static_cast<Acc>(x_row[j]), dyj = static_cast<Acc>(dy_row[j]);
          if constexpr (IO::kWiden) {
            xw[j] = xj;
            gw[j] = dyj;
          }
          const Acc g = w ? dyj * w[j] : dyj;
          sum_g += g;
          sum_gx += g * (xj - mu);
        }
        const Acc* xr = IO::kWiden ? xw : reinterpret_cast<const Acc*>(x_row);
        const Acc* gr = IO::kWiden ? gw : reinterpret_cast<const Acc*>(dy_row);
        const Acc mean_g = sum_g / N;
        const Acc mean_gxhat = sum_gx * rs / N;
        const Acc a = rs, cx = -rs * rs * mean_gxhat, c0 = -rs * mean_g + mu * rs * rs * mean_gxhat;
        // Pass 2: dx, and this chunk's dweight/dbias partial sums.
        const Vec va(a), vc(cx), vb(c0), vmu(mu), vrs(rs);
        T* dx_row = dx + i * N;
        const bool stream = args.stream_dx && IO::can_stream(dx_row);
        for (j = 0; j + IO::kStep <= N; j += IO::kStep) {
          Vec out[IO::kVecs];
          for (int k = 0; k < IO::kVecs; ++k) {
            const int64_t col = j + k * V;
            const Vec dyv = Vec::loadu(gr + col);
            const Vec xv = Vec::loadu(xr + col);
            const Vec g = w ? dyv * Vec::loadu(w + col) : dyv;
            out[k] = va * g + vc * xv + vb;
            if (dw) (Vec::loadu(dw + col) + dyv * ((xv - vmu) * vrs)).store(dw + col);
            if (db) (Vec::loadu(db + col) + dyv).store(db + col);
          }
          if (stream) {
            IO::stream(dx_row + j, out);
          } else {
            IO::store(dx_row + j, out);
          }
        }
        for (; j < N; ++j) {
          const Acc g = w ? gr[j] * w[j] : gr[j];
          dx_row[j] = static_cast<T>(a * g + cx * xr[j] + c0);
          if (dw) dw[j] += gr[j] * ((xr[j] - mu) * rs);
          if (db) db[j] += gr[j];
        }
      }
    }
    if (args.stream_dx) IO::stream_fence();
  });

  auto reduce_chunks = [&](const Acc* part, void* out_ptr) {
    T* out = static_cast<T*>(out_ptr);
    at::parallel_for(0, N, kGrainElements / 8, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        Acc s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += part[c * N + j];
        out[j] = static_cast<T>(s);
      }
    });
  };
  if (want_dw) reduce_chunks(dw_part.get(), args.dweight);
  if (want_db) reduce_chunks(db_part.get(), args.dbias);
}

template <template <typename> class Kernel, typename Args>
void dispatch_float_types(const Args& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float: return Kernel<float>::run(args);
    case c10::ScalarType::Double: return Kernel<double>::run(args);
    case c10::ScalarType::Half: return Kernel<c10::Half>::run(args);
    case c10::ScalarType::BFloat16: return Kernel<c10::BFloat16>::run(args);
    default: TORCH_CHECK(false, "dlfast: unsupported dtype ", args.dtype);
  }
}

template <typename T>
struct LayerNormFwd {
  static void run(const LayerNormFwdArgs& args) { layer_norm_fwd_typed<T>(args); }
};
template <typename T>
struct LayerNormBwd {
  static void run(const LayerNormBwdArgs& args) { layer_norm_bwd_typed<T>(args); }
};

void layer_norm_fwd(const LayerNormFwdArgs& args) { dispatch_float_types<LayerNormFwd>(args); }
void layer_norm_bwd(const LayerNormBwdArgs& args) { dispatch_float_types<LayerNormBwd>(args); }

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
