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
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>
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

// Widens n elements of a reduced-precision row into float.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  using FVec = Vectorized<float>;
  constexpr int64_t V = FVec::size();
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    FVec v;
    at::vec::load_to_float<T>(src + j, v);
    v.store(dst + j);
  }
  for (; j < n; ++j) {
    dst[j] = static_cast<float>(src[j]);
  }
}

// A row of T seen as Acc: the row itself when T is Acc, else a widened copy.
template <typename T>
class AccRow {
 public:
  using Acc = acc_t<T>;
  static constexpr bool kWiden = !std::is_same_v<T, Acc>;

  explicit AccRow(int64_t n) : n_(n), buf_(kWiden ? new Acc[n] : nullptr) {}

  const Acc* load(const T* row) {
    if constexpr (kWiden) {
      widen(row, buf_.get(), n_);
      return buf_.get();
    } else {
      return row;
    }
  }
  // Where to write an output row: straight into `row`, or into the buffer for store().
  Acc* out(T* row) {
    if constexpr (kWiden) {
      return buf_.get();
    } else {
      return row;
    }
  }
  void store(T* row) {
    if constexpr (kWiden) {
      at::vec::convert(buf_.get(), row, n_);
    }
  }

 private:
  int64_t n_;
  std::unique_ptr<Acc[]> buf_;
};

// y = x * a + b over a row, with w and bias optional: a generic lambda keeps one
// copy of the loop for the four affine cases.
template <typename T>
void layer_norm_fwd_typed(const LayerNormFwdArgs& args) {
  using Acc = acc_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  const int64_t M = args.M, N = args.N;
  const T* x = static_cast<const T*>(args.x);
  const T* weight = static_cast<const T*>(args.weight);
  const T* bias = static_cast<const T*>(args.bias);
  T* y = static_cast<T*>(args.y);
  Acc* mean = static_cast<Acc*>(args.mean);
  Acc* rstd = static_cast<Acc*>(args.rstd);
  const Acc eps = static_cast<Acc>(args.eps);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N, 1));

  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    AccRow<T> row(N), w_row(N), b_row(N);
    const Acc* w = weight ? w_row.load(weight) : nullptr;
    const Acc* b = bias ? b_row.load(bias) : nullptr;
    auto normalize = [&](auto has_w, auto has_b, const Acc* xr, Acc* yr, Acc mu, Acc rs) {
      const Vec vmu(mu), vrs(rs);
      auto affine = [&](Vec v, int64_t j, int64_t count) {
        v = (v - vmu) * vrs;
        if constexpr (decltype(has_w)::value) v = v * Vec::loadu(w + j, count);
        if constexpr (decltype(has_b)::value) v = v + Vec::loadu(b + j, count);
        return v;
      };
      int64_t j = 0;
      for (; j + V <= N; j += V) {
        affine(Vec::loadu(xr + j), j, V).store(yr + j);
      }
      if (j < N) {
        affine(Vec::loadu(xr + j, N - j), j, N - j).store(yr + j, N - j);
      }
    };
    for (int64_t i = begin; i < end; ++i) {
      const Acc* xr = row.load(x + i * N);
      const Acc mu = row_sum(xr, N, [](auto v) { return v; }) / N;
      const Acc var = row_sum(xr, N, [mu](auto v) {
                        using V_t = decltype(v);
                        V_t d = v - V_t(mu);
                        return d * d;
                      }) / N;
      const Acc rs = Acc(1) / std::sqrt(var + eps);
      mean[i] = mu;
      rstd[i] = rs;
      Acc* yr = row.out(y + i * N);
      using yes = std::true_type;
      using no = std::false_type;
      if (w && b) normalize(yes{}, yes{}, xr, yr, mu, rs);
      else if (w) normalize(yes{}, no{}, xr, yr, mu, rs);
      else if (b) normalize(no{}, yes{}, xr, yr, mu, rs);
      else normalize(no{}, no{}, xr, yr, mu, rs);
      row.store(y + i * N);
    }
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w, written as
// dx = a*g + c*x + b per row. dweight/dbias: each chunk of rows sums into private
// Acc buffers, then the chunks are added in a fixed order (no atomics, repeatable
// for a given thread count).
template <typename T>
void layer_norm_bwd_typed(const LayerNormBwdArgs& args) {
  using Acc = acc_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  const int64_t M = args.M, N = args.N;
  const T* dy = static_cast<const T*>(args.dy);
  const T* x = static_cast<const T*>(args.x);
  const T* weight = static_cast<const T*>(args.weight);
  const Acc* mean = static_cast<const Acc*>(args.mean);
  const Acc* rstd = static_cast<const Acc*>(args.rstd);
  T* dx = static_cast<T*>(args.dx);
  const bool want_dw = args.dweight != nullptr, want_db = args.dbias != nullptr;

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  std::unique_ptr<Acc[]> dw_part(want_dw ? new Acc[chunks * N]() : nullptr);
  std::unique_ptr<Acc[]> db_part(want_db ? new Acc[chunks * N]() : nullptr);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    AccRow<T> x_row(N), dy_row(N), w_row(N), dx_row(N);
    const Acc* w = weight ? w_row.load(weight) : nullptr;
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      Acc* dw = want_dw ? dw_part.get() + c * N : nullptr;
      Acc* db = want_db ? db_part.get() + c * N : nullptr;
      for (int64_t i = c * M / chunks; i < (c + 1) * M / chunks; ++i) {
        const Acc* xr = x_row.load(x + i * N);
        const Acc* gr = dy_row.load(dy + i * N);
        const Acc mu = mean[i], rs = rstd[i];
        // sum(g) and sum(g * (x - mu)), g = dy * w
        Vec sg(Acc(0)), sgx(Acc(0));
        int64_t j = 0;
        auto accumulate = [&](int64_t count) {
          Vec g = Vec::loadu(gr + j, count);
          if (w) g = g * Vec::loadu(w + j, count);
          sg = sg + g;
          sgx = sgx + g * (Vec::loadu(xr + j, count) - Vec(mu));
        };
        for (; j + V <= N; j += V) accumulate(V);
        if (j < N) accumulate(N - j);
        auto add = [](Vec& p, Vec& q) { return p + q; };
        const Acc mean_g = at::vec::vec_reduce_all<Acc>(add, sg) / N;
        const Acc mean_gxhat = at::vec::vec_reduce_all<Acc>(add, sgx) * rs / N;
        const Vec va(rs), vc(-rs * rs * mean_gxhat), vb(-rs * mean_g + mu * rs * rs * mean_gxhat);
        const Vec vmu(mu), vrs(rs);
        Acc* dxr = dx_row.out(dx + i * N);
        auto emit = [&](int64_t count) {
          const Vec dyv = Vec::loadu(gr + j, count);
          const Vec xv = Vec::loadu(xr + j, count);
          const Vec g = w ? dyv * Vec::loadu(w + j, count) : dyv;
          (va * g + vc * xv + vb).store(dxr + j, count);
          if (dw) (Vec::loadu(dw + j, count) + dyv * ((xv - vmu) * vrs)).store(dw + j, count);
          if (db) (Vec::loadu(db + j, count) + dyv).store(db + j, count);
        };
        for (j = 0; j + V <= N; j += V) emit(V);
        if (j < N) emit(N - j);
        dx_row.store(dx + i * N);
      }
    }
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
