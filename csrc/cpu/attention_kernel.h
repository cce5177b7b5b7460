// Attention kernels (FlashAttention style), written once with at::vec and compiled once per ISA
// by kernels_<isa>.cpp (which defines CPU_CAPABILITY before including this file).
//
// Scores live only in per-thread (key block x query block) tiles. Every block product runs
// through one register-blocked micro-kernel (gemm_tile): it accumulates each output element as
// one chain of fused multiply-adds in a fixed order, whatever the tile shapes around it, so the
// results are bitwise repeatable and independent of how the work is split across threads.
//
// Layouts: a tile is either "key-major" (rows are keys, lanes are queries: the forward and the
// dq pass, where the softmax statistics of a query block are vectors) or "query-major" (the
// dk/dv pass, whose statistics are per-row scalars). Either way the operand read along vector
// lanes is a small transposed panel packed per task, and every other operand is read in place
// as rows, so no pass over the whole of k or v is needed for a transposed copy.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "../philox.h"
#include "cpu_kernels.h"
#include "layer_norm_kernel.h"  // acc_t, RowIO, dispatch_float_types

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

// Query and key block sizes: the tiles of one block pair (scores, the packed panels, the output
// accumulator) stay in L1/L2 for the head dims the models use.
constexpr int64_t kAttnBlockQ = 64;
constexpr int64_t kAttnBlockK = 64;

// Micro-kernel tile: kTileRows rows x kTileVecs vectors of accumulators, sized to the register
// file (32 vector registers with AVX-512, 16 otherwise) less the B row and the broadcast A value.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 4;
#else
constexpr int kTileRows = 6;
constexpr int kTileVecs = 2;
#endif

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C (MR x NV vectors) = [C +] A B over k = 0..K-1, with A(i, k) = a[i * a_rs + k * a_cs] (any
// strides, as A is only ever broadcast) and row-major B and C.
template <typename Acc, int MR, int NV>
inline void gemm_tile(int64_t K, const Acc* a, int64_t a_rs, int64_t a_cs, const Acc* b,
                      int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * V) : Vec(Acc(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + k * ldb + v * V);
    const Acc* ak = a + k * a_cs;
    for (int r = 0; r < MR; ++r) {
      const Vec ar(ak[r * a_rs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * V);
  }
}

// The last nvec (< kTileVecs) vectors of a row band.
template <typename Acc, int MR, int NV>
inline void gemm_tile_cols(int64_t nvec, int64_t K, const Acc* a, int64_t a_rs, int64_t a_cs,
                           const Acc* b, int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
  if (nvec == NV) {
    gemm_tile<Acc, MR, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  } else if constexpr (NV > 1) {
    gemm_tile_cols<Acc, MR, NV - 1>(nvec, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  }
}

// One band of MR rows: whole tiles, then the remaining vectors.
template <typename Acc, int MR>
inline void gemm_band(int64_t nvec, int64_t K, const Acc* a, int64_t a_rs, int64_t a_cs,
                      const Acc* b, int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
  constexpr int64_t V = Vectorized<Acc>::size();
  int64_t v = 0;
  for (; v + kTileVecs <= nvec; v += kTileVecs) {
    gemm_tile<Acc, MR, kTileVecs>(K, a, a_rs, a_cs, b + v * V, ldb, c + v * V, ldc, accumulate);
  }
  if (v < nvec) {
    gemm_tile_cols<Acc, MR, kTileVecs - 1>(nvec - v, K, a, a_rs, a_cs, b + v * V, ldb, c + v * V,
                                           ldc, accumulate);
  }
}

// The last m (< kTileRows) rows.
template <typename Acc, int MR>
inline void gemm_band_rows(int64_t m, int64_t nvec, int64_t K, const Acc* a, int64_t a_rs,
                           int64_t a_cs, const Acc* b, int64_t ldb, Acc* c, int64_t ldc,
                           bool accumulate) {
  if (m == MR) {
    gemm_band<Acc, MR>(nvec, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  } else if constexpr (MR > 1) {
    gemm_band_rows<Acc, MR - 1>(m, nvec, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  }
}

// C (m x n) = [C +] A (m x K) B (K x n), A strided as in gemm_tile, B and C row-major. Works in
// whole vectors: rows of B must be readable, and rows of C writable, up to n rounded up to a
// vector; the lanes of C past n come out as garbage.
template <typename Acc>
void gemm(int64_t m, int64_t n, int64_t K, const Acc* a, int64_t a_rs, int64_t a_cs, const Acc* b,
          int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
  const int64_t nvec = (n + Vectorized<Acc>::size() - 1) / Vectorized<Acc>::size();
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    gemm_band<Acc, kTileRows>(nvec, K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc,
                              accumulate);
  }
  if (i < m) {
    gemm_band_rows<Acc, kTileRows - 1>(m - i, nvec, K, a + i * a_rs, a_rs, a_cs, b, ldb,
                                       c + i * ldc, ldc, accumulate);
  }
}

// dst[0, n) = src as Acc, then zeros up to `padded`.
template <typename T>
inline void widen_row(const T* src, int64_t n, int64_t padded, acc_t<T>* dst) {
  using IO = RowIO<T>;
  int64_t j = 0;
  for (; j + IO::kStep <= n; j += IO::kStep) {
    typename IO::Vec v[IO::kVecs];
    IO::load(src + j, v);
    for (int s = 0; s < IO::kVecs; ++s) v[s].store(dst + j + s * IO::Vec::size());
  }
  for (; j < n; ++j) dst[j] = static_cast<acc_t<T>>(src[j]);
  std::fill(dst + n, dst + padded, acc_t<T>(0));
}

// dst[0, n) = src * mult, rounded to T.
template <typename T>
inline void narrow_row(const acc_t<T>* src, int64_t n, acc_t<T> mult, T* dst) {
  using IO = RowIO<T>;
  const typename IO::Vec vm(mult);
  int64_t j = 0;
  for (; j + IO::kStep <= n; j += IO::kStep) {
    typename IO::Vec v[IO::kVecs];
    for (int s = 0; s < IO::kVecs; ++s) v[s] = IO::Vec::loadu(src + j + s * IO::Vec::size()) * vm;
    IO::store(dst + j, v);
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j] * mult);
}

// A (rows, D) tensor as Acc rows whose stride is a whole number of vectors, as gemm reads its B
// operand: the tensor itself when it already is one, else a widened, zero-padded copy (made once
// per call, so no block product converts or pads anything).
template <typename T>
struct AccRows {
  using Acc = acc_t<T>;
  AccRows(const T* src, int64_t rows, int64_t D) {
    const int64_t padded = round_up(D, Vectorized<Acc>::size());
    if constexpr (std::is_same_v<T, Acc>) {
      if (padded == D) {
        data = src;
        ld = D;
        return;
      }
    }
    copy.reset(new Acc[std::max<int64_t>(rows * padded, 1)]);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / padded), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) widen_row(src + r * D, D, padded, copy.get() + r * padded);
    });
    data = copy.get();
    ld = padded;
  }
  const Acc* data;
  int64_t ld;
  std::unique_ptr<Acc[]> copy;
};

// dst (D x ld_dst) = the transpose of rows [0, n) of src (stride ld_src), zero past n: the panel
// that a product over d reads along vector lanes.
template <typename Acc>
inline void pack_transposed(const Acc* src, int64_t ld_src, int64_t n, int64_t D, Acc* dst,
                            int64_t ld_dst) {
  for (int64_t d = 0; d < D; ++d) {
    Acc* out = dst + d * ld_dst;
    for (int64_t i = 0; i < n; ++i) out[i] = src[i * ld_src + d];
    std::fill(out + n, out + ld_dst, Acc(0));
  }
}

// The shape and options of one attention call.
struct AttnProblem {
  int64_t B, H, Hkv, Lq, Lk, D, group;
  const bool* mask;
  bool causal;
  int64_t shift;
  double scale;
  bool dropout;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - dropout_p)

  explicit AttnProblem(const AttentionParams& p)
      : B(p.B), H(p.H), Hkv(p.Hkv), Lq(p.Lq), Lk(p.Lk), D(p.D), group(p.H / p.Hkv),
        mask(p.key_padding_mask), causal(p.causal), shift(p.causal_shift), scale(p.scale),
        dropout(p.dropout_p > 0), seed(p.seed), threshold(dlfast::dropout_threshold(p.dropout_p)),
        keep_scale(1.0 / (1.0 - p.dropout_p)) {}

  // Keys [0, end) can be allowed for some query of [q0, q0 + bq); the rest are behind the
  // causal diagonal of every one of them.
  int64_t key_end(int64_t q0, int64_t bq) const {
    return causal ? std::clamp<int64_t>(q0 + bq + shift, 0, Lk) : Lk;
  }
  // Whether some query of [q0, q0 + bq) is causally barred from some key of [k0, k0 + bk).
  bool causal_cut(int64_t q0, int64_t k0, int64_t bk) const {
    return causal && k0 + bk - 1 > q0 + shift;
  }
  // How many keys of [k0, k0 + bk) batch row b lets queries see.
  int64_t allowed_keys(int64_t b, int64_t k0, int64_t bk) const {
    if (mask == nullptr) return bk;
    const bool* m = mask + b * Lk + k0;
    return std::count(m, m + bk, true);
  }
};

// Causal blocks late in a head do more work than early ones; pairing block t / 2 with block
// n - 1 - t / 2 keeps the contiguous task ranges that at::parallel_for gives each thread even.
inline int64_t balanced_block(int64_t t, int64_t n) { return t % 2 == 0 ? t / 2 : n - 1 - t / 2; }

// out[c] = keep_value where probability (query, key) of head bh survives dropout, else 0, for
// c in [0, n): keys key0 + c of one query when kAlongKeys, else queries key0 + c of one key.
template <bool kAlongKeys, typename Acc>
inline void dropout_row(const AttnProblem& p, int64_t bh, int64_t fixed, int64_t first, int64_t n,
                        Acc keep_value, Acc* out) {
  const uint32_t head = static_cast<uint32_t>(bh), f = static_cast<uint32_t>(fixed);
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t x = static_cast<uint32_t>(first + c);
    const bool keep = kAlongKeys ? dlfast::dropout_keep(p.seed, p.threshold, head, f, x)
                                 : dlfast::dropout_keep(p.seed, p.threshold, head, x, f);
    out[c] = keep ? keep_value : Acc(0);
  }
}

template <typename Acc>
inline Vectorized<Acc> vexp(const Vectorized<Acc>& x) {
  // The polynomial exp (about 20 ulp) costs a fraction of Sleef's; the softmax sums it feeds are
  // rounded far more coarsely than that.
  return x.exp_u20();
}

// In a key-major tile row (the scores of key `key` against queries q0 + lane), the lanes of the
// queries that the causal diagonal bars from that key.
inline int64_t causal_barred_lanes(const AttnProblem& p, int64_t key, int64_t q0, int64_t lanes) {
  return std::clamp<int64_t>(key - p.shift - q0, 0, lanes);
}

// ---------------------------------------------------------------------------------------------
// Forward: one task per (batch, head, query block). Each key block gives a key-major score tile
// s (bk x BQ) = k_blk q_blk^T; the running max and sum of every query are vectors across lanes.

template <typename T>
void attention_fwd_typed(const AttentionFwdArgs& args) {
  using Acc = acc_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t BQ = kAttnBlockQ, BK = kAttnBlockK, QV = BQ / V;
  static_assert(BQ % V == 0, "a query block is whole vectors");
  const AttnProblem p(args.params);
  const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk;
  const AccRows<T> k(static_cast<const T*>(args.k), p.B * p.Hkv * Lk, D);
  const AccRows<T> v(static_cast<const T*>(args.v), p.B * p.Hkv * Lk, D);
  const int64_t Dp = round_up(D, V);
  const T* q = static_cast<const T*>(args.q);
  T* out = static_cast<T*>(args.out);
  Acc* lse = static_cast<Acc*>(args.lse);
  const int64_t nqb = (Lq + BQ - 1) / BQ;
  const Acc scale = static_cast<Acc>(p.scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<Acc[]> scratch(new Acc[Dp + D * BQ + BK * BQ + BQ * Dp + 4 * BQ]);
    Acc* q_row = scratch.get();       // one widened query row (Dp)
    Acc* qt = q_row + Dp;             // q block transposed (D x BQ)
    Acc* s = qt + D * BQ;             // scores, then probabilities (bk x BQ)
    Acc* o = s + BK * BQ;             // unnormalised output (BQ x Dp)
    Acc* alpha = o + BQ * Dp;         // per-query rescale of o (BQ)
    Acc* keep = alpha + BQ;           // dropout multipliers of one key (BQ)
    Acc* m_out = keep + BQ;           // final running max (BQ)
    Acc* l_out = m_out + BQ;          // final running sum (BQ)
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = balanced_block(t % nqb, nqb) * BQ, bq = std::min(BQ, Lq - q0);
      const int64_t kv_off = (b * p.Hkv + h / p.group) * Lk;
      const T* q_blk = q + (bh * Lq + q0) * D;
      for (int64_t i = 0; i < bq; ++i) {
        widen_row(q_blk + i * D, D, D, q_row);
        for (int64_t d = 0; d < D; ++d) qt[d * BQ + i] = q_row[d];
      }
      for (int64_t d = 0; d < D; ++d) std::fill(qt + d * BQ + bq, qt + (d + 1) * BQ, Acc(0));
      std::fill(o, o + BQ * Dp, Acc(0));
      Vec m[QV], l[QV];
      for (int64_t c = 0; c < QV; ++c) {
        m[c] = Vec(neg_inf);
        l[c] = Vec(Acc(0));
      }
      const int64_t k_end = p.key_end(q0, bq);
      for (int64_t k0 = 0; k0 < k_end; k0 += BK) {
        const int64_t bk = std::min(BK, k_end - k0);
        const int64_t allowed = p.allowed_keys(b, k0, bk);
        if (allowed == 0) continue;
        gemm(bk, BQ, D, k.data + (kv_off + k0) * k.ld, k.ld, int64_t(1), qt, BQ, s, BQ, false);
        const bool cut = p.causal_cut(q0, k0, bk);
        Vec block_max[QV];
        for (int64_t c = 0; c < QV; ++c) block_max[c] = Vec(neg_inf);
        for (int64_t j = 0; j < bk; ++j) {
          Acc* row = s + j * BQ;
          if (allowed < bk && !p.mask[b * Lk + k0 + j]) {
            std::fill(row, row + BQ, neg_inf);
            continue;
          }
          for (int64_t c = 0; c < QV; ++c) (Vec::loadu(row + c * V) * Vec(scale)).store(row + c * V);
          if (cut) std::fill(row, row + causal_barred_lanes(p, k0 + j, q0, BQ), neg_inf);
          for (int64_t c = 0; c < QV; ++c) {
            block_max[c] = at::vec::maximum(block_max[c], Vec::loadu(row + c * V));
          }
        }
        // A query with no allowed key yet keeps max -inf; it exponentiates against 0 instead,
        // so its probabilities (exp(-inf)) and rescale factor come out 0, never NaN.
        Vec shift_by[QV], sum[QV];
        for (int64_t c = 0; c < QV; ++c) {
          const Vec m_new = at::vec::maximum(m[c], block_max[c]);
          shift_by[c] = Vec::blendv(m_new, Vec(Acc(0)), m_new == Vec(neg_inf));
          const Vec a = vexp(m[c] - shift_by[c]);
          a.store(alpha + c * V);
          l[c] = l[c] * a;
          m[c] = m_new;
          sum[c] = Vec(Acc(0));
        }
        for (int64_t j = 0; j < bk; ++j) {
          Acc* row = s + j * BQ;
          for (int64_t c = 0; c < QV; ++c) {
            const Vec pr = vexp(Vec::loadu(row + c * V) - shift_by[c]);
            sum[c] = sum[c] + pr;
            pr.store(row + c * V);
          }
        }
        for (int64_t c = 0; c < QV; ++c) l[c] = l[c] + sum[c];
        if (p.dropout) {
          // The normaliser sums the undropped probabilities; 1 / (1 - p) is applied at the end.
          for (int64_t j = 0; j < bk; ++j) {
            Acc* row = s + j * BQ;
            dropout_row<false>(p, bh, k0 + j, q0, BQ, Acc(1), keep);
            for (int64_t c = 0; c < QV; ++c) {
              (Vec::loadu(row + c * V) * Vec::loadu(keep + c * V)).store(row + c * V);
            }
          }
        }
        for (int64_t i = 0; i < bq; ++i) {
          if (alpha[i] != Acc(1)) {
            Acc* orow = o + i * Dp;
            for (int64_t d = 0; d < Dp; d += V) (Vec::loadu(orow + d) * Vec(alpha[i])).store(orow + d);
          }
        }
        gemm(bq, D, bk, s, int64_t(1), BQ, v.data + (kv_off + k0) * v.ld, v.ld, o, Dp, true);
      }
      for (int64_t c = 0; c < QV; ++c) {
        m[c].store(m_out + c * V);
        l[c].store(l_out + c * V);
      }
      for (int64_t i = 0; i < bq; ++i) {
        const Acc li = l_out[i];
        T* orow = out + (bh * Lq + q0 + i) * D;
        if (li == Acc(0)) {
          std::fill(orow, orow + D, T(0));
          lse[bh * Lq + q0 + i] = std::numeric_limits<Acc>::infinity();
        } else {
          narrow_row(o + i * Dp, D, static_cast<Acc>(p.keep_scale) / li, orow);
          lse[bh * Lq + q0 + i] = m_out[i] + std::log(li);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward, FlashAttention-2 style from the saved lse, in two passes that each own their outputs
// (no atomics, no order that depends on scheduling): dk and dv per (batch, kv head, key block),
// summing the group's heads and query blocks in a fixed order; dq per (batch, head, query block).
// Both recompute p = exp(scale s - lse) and dp = dout v^T. The `deterministic` flag is therefore
// ignored: this backward is always bitwise repeatable, whatever the thread count.

template <typename T>
struct AttnBwdInputs {
  using Acc = acc_t<T>;
  AttnBwdInputs(const AttentionBwdArgs& args, const AttnProblem& p)
      : q(static_cast<const T*>(args.q), p.B * p.H * p.Lq, p.D),
        dout(static_cast<const T*>(args.dout), p.B * p.H * p.Lq, p.D),
        k(static_cast<const T*>(args.k), p.B * p.Hkv * p.Lk, p.D),
        v(static_cast<const T*>(args.v), p.B * p.Hkv * p.Lk, p.D),
        lse(static_cast<const Acc*>(args.lse)),
        delta(new Acc[std::max<int64_t>(p.B * p.H * p.Lq, 1)]) {
    // delta_i = rowsum(dout_i * out_i), the softmax backward's correction term.
    const T* o = static_cast<const T*>(args.out);
    const T* dy = static_cast<const T*>(args.dout);
    const int64_t D = p.D;
    at::parallel_for(0, p.B * p.H * p.Lq, std::max<int64_t>(1, 16384 / D), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        Acc acc = 0;
        for (int64_t d = 0; d < D; ++d) {
          acc += static_cast<Acc>(o[r * D + d]) * static_cast<Acc>(dy[r * D + d]);
        }
        delta[r] = acc;
      }
    });
  }
  AccRows<T> q, dout, k, v;
  const Acc* lse;
  std::unique_ptr<Acc[]> delta;
};

// dk, dv: key block [k0, k0 + bk) of one kv head, in query-major tiles s (bq x BK) = q_blk k_blk^T.
template <typename T>
void attention_bwd_dkdv(const AttentionBwdArgs& args, const AttnProblem& p,
                        const AttnBwdInputs<T>& in) {
  using Acc = acc_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t BQ = kAttnBlockQ, BK = kAttnBlockK;
  static_assert(BK % V == 0, "a key block is whole vectors");
  const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk, Dp = round_up(D, V);
  const int64_t nkb = (Lk + BK - 1) / BK;
  const Acc scale = static_cast<Acc>(p.scale), keep_scale = static_cast<Acc>(p.keep_scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  T* dk = static_cast<T*>(args.dk);
  T* dv = static_cast<T*>(args.dv);

  at::parallel_for(0, p.B * p.Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<Acc[]> scratch(new Acc[2 * D * BK + 2 * BQ * BK + 2 * BK * Dp + 2 * BK]);
    Acc* kt = scratch.get();        // k block transposed (D x BK)
    Acc* vt = kt + D * BK;          // v block transposed (D x BK)
    Acc* pr = vt + D * BK;          // probabilities, after dropout (bq x BK)
    Acc* ds = pr + BQ * BK;         // dp, then ds (bq x BK)
    Acc* dk_acc = ds + BQ * BK;     // (bk x Dp)
    Acc* dv_acc = dk_acc + BK * Dp; // (bk x Dp)
    Acc* bias = dv_acc + BK * Dp;   // 0 for an allowed key, -inf for a padded one (BK)
    Acc* keep = bias + BK;          // dropout multipliers of one query (BK)
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bkv = t / nkb, b = bkv / p.Hkv;
      const int64_t k0 = balanced_block(t % nkb, nkb) * BK, bk = std::min(BK, Lk - k0);
      const int64_t kv_row = bkv * Lk + k0;
      std::fill(dk_acc, dk_acc + bk * Dp, Acc(0));
      std::fill(dv_acc, dv_acc + bk * Dp, Acc(0));
      const int64_t allowed = p.allowed_keys(b, k0, bk);
      // Queries [q_first, Lq) see some key of the block.
      const int64_t q_first = p.causal ? std::clamp<int64_t>(k0 - p.shift, 0, Lq) : 0;
      if (allowed > 0 && q_first < Lq) {
        pack_transposed(in.k.data + kv_row * in.k.ld, in.k.ld, bk, D, kt, BK);
        pack_transposed(in.v.data + kv_row * in.v.ld, in.v.ld, bk, D, vt, BK);
        for (int64_t j = 0; j < BK; ++j) {
          bias[j] = j < bk && (allowed == bk || p.mask[b * Lk + k0 + j]) ? Acc(0) : neg_inf;
        }
        for (int64_t g = 0; g < p.group; ++g) {
          const int64_t bh = (bkv / p.Hkv) * p.H + (bkv % p.Hkv) * p.group + g;
          for (int64_t q0 = q_first / BQ * BQ; q0 < Lq; q0 += BQ) {
            const int64_t bq = std::min(BQ, Lq - q0), q_row = bh * Lq + q0;
            const Acc* q_blk = in.q.data + q_row * in.q.ld;
            const Acc* dout_blk = in.dout.data + q_row * in.dout.ld;
            gemm(bq, BK, D, q_blk, in.q.ld, int64_t(1), kt, BK, pr, BK, false);
            gemm(bq, BK, D, dout_blk, in.dout.ld, int64_t(1), vt, BK, ds, BK, false);
            const bool cut = p.causal_cut(q0, k0, bk);
            for (int64_t i = 0; i < bq; ++i) {
              Acc* prow = pr + i * BK;
              Acc* dsrow = ds + i * BK;
              const Vec lse_i(in.lse[q_row + i]), delta_i(in.delta[q_row + i]);
              for (int64_t c = 0; c < BK; c += V) {
                const Vec sc = Vec::loadu(prow + c) * Vec(scale) + Vec::loadu(bias + c);
                sc.store(prow + c);
              }
              if (cut) {
                // Keys past q0 + i + shift are barred from query q0 + i.
                const int64_t open = std::clamp<int64_t>(q0 + i + p.shift - k0 + 1, 0, BK);
                std::fill(prow + open, prow + BK, neg_inf);
              }
              if (p.dropout) dropout_row<true>(p, bh, q0 + i, k0, BK, keep_scale, keep);
              for (int64_t c = 0; c < BK; c += V) {
                const Vec prob = vexp(Vec::loadu(prow + c) - lse_i);
                Vec dp = Vec::loadu(dsrow + c);
                Vec dropped = prob;
                if (p.dropout) {
                  const Vec kv = Vec::loadu(keep + c);
                  dp = dp * kv;
                  dropped = prob * kv;
                }
                (prob * (dp - delta_i)).store(dsrow + c);
                dropped.store(prow + c);
              }
            }
            gemm(bk, D, bq, pr, int64_t(1), BK, dout_blk, in.dout.ld, dv_acc, Dp, true);
            gemm(bk, D, bq, ds, int64_t(1), BK, q_blk, in.q.ld, dk_acc, Dp, true);
          }
        }
      }
      for (int64_t j = 0; j < bk; ++j) {
        narrow_row(dk_acc + j * Dp, D, scale, dk + (kv_row + j) * D);
        narrow_row(dv_acc + j * Dp, D, Acc(1), dv + (kv_row + j) * D);
      }
    }
  });
}

// dq: query block [q0, q0 + bq) of one head, in key-major tiles s (bk x BQ) = k_blk q_blk^T.
template <typename T>
void attention_bwd_dq(const AttentionBwdArgs& args, const AttnProblem& p,
                      const AttnBwdInputs<T>& in) {
  using Acc = acc_t<T>;
  using Vec = Vectorized<Acc>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t BQ = kAttnBlockQ, BK = kAttnBlockK;
  const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk, Dp = round_up(D, V);
  const int64_t nqb = (Lq + BQ - 1) / BQ;
  const Acc scale = static_cast<Acc>(p.scale), keep_scale = static_cast<Acc>(p.keep_scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  T* dq = static_cast<T*>(args.dq);

  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<Acc[]> scratch(new Acc[2 * D * BQ + 2 * BK * BQ + BQ * Dp + 3 * BQ]);
    Acc* qt = scratch.get();         // q block transposed (D x BQ)
    Acc* dot = qt + D * BQ;          // dout block transposed (D x BQ)
    Acc* st = dot + D * BQ;          // scores (bk x BQ)
    Acc* ds = st + BK * BQ;          // dp, then ds (bk x BQ)
    Acc* dq_acc = ds + BK * BQ;      // (BQ x Dp)
    Acc* lse = dq_acc + BQ * Dp;     // lse of the block's queries, +inf past its end (BQ)
    Acc* delta = lse + BQ;           // (BQ)
    Acc* keep = delta + BQ;          // dropout multipliers of one key (BQ)
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = balanced_block(t % nqb, nqb) * BQ, bq = std::min(BQ, Lq - q0);
      const int64_t q_row = bh * Lq + q0, kv_off = (b * p.Hkv + h / p.group) * Lk;
      pack_transposed(in.q.data + q_row * in.q.ld, in.q.ld, bq, D, qt, BQ);
      pack_transposed(in.dout.data + q_row * in.dout.ld, in.dout.ld, bq, D, dot, BQ);
      for (int64_t i = 0; i < BQ; ++i) {
        lse[i] = i < bq ? in.lse[q_row + i] : std::numeric_limits<Acc>::infinity();
        delta[i] = i < bq ? in.delta[q_row + i] : Acc(0);
      }
      std::fill(dq_acc, dq_acc + BQ * Dp, Acc(0));
      const int64_t k_end = p.key_end(q0, bq);
      for (int64_t k0 = 0; k0 < k_end; k0 += BK) {
        const int64_t bk = std::min(BK, k_end - k0);
        const int64_t allowed = p.allowed_keys(b, k0, bk);
        if (allowed == 0) continue;
        const Acc* k_blk = in.k.data + (kv_off + k0) * in.k.ld;
        const Acc* v_blk = in.v.data + (kv_off + k0) * in.v.ld;
        gemm(bk, BQ, D, k_blk, in.k.ld, int64_t(1), qt, BQ, st, BQ, false);
        gemm(bk, BQ, D, v_blk, in.v.ld, int64_t(1), dot, BQ, ds, BQ, false);
        const bool cut = p.causal_cut(q0, k0, bk);
        for (int64_t j = 0; j < bk; ++j) {
          Acc* srow = st + j * BQ;
          Acc* dsrow = ds + j * BQ;
          if (allowed < bk && !p.mask[b * Lk + k0 + j]) {
            std::fill(dsrow, dsrow + BQ, Acc(0));
            continue;
          }
          for (int64_t c = 0; c < BQ; c += V) (Vec::loadu(srow + c) * Vec(scale)).store(srow + c);
          if (cut) std::fill(srow, srow + causal_barred_lanes(p, k0 + j, q0, BQ), neg_inf);
          if (p.dropout) dropout_row<false>(p, bh, k0 + j, q0, BQ, keep_scale, keep);
          for (int64_t c = 0; c < BQ; c += V) {
            const Vec prob = vexp(Vec::loadu(srow + c) - Vec::loadu(lse + c));
            Vec dp = Vec::loadu(dsrow + c);
            if (p.dropout) dp = dp * Vec::loadu(keep + c);
            (prob * (dp - Vec::loadu(delta + c))).store(dsrow + c);
          }
        }
        gemm(bq, D, bk, ds, int64_t(1), BQ, k_blk, in.k.ld, dq_acc, Dp, true);
      }
      for (int64_t i = 0; i < bq; ++i) narrow_row(dq_acc + i * Dp, D, scale, dq + (q_row + i) * D);
    }
  });
}

template <typename T>
void attention_bwd_typed(const AttentionBwdArgs& args) {
  const AttnProblem p(args.params);
  const AttnBwdInputs<T> in(args, p);
  attention_bwd_dkdv<T>(args, p, in);
  attention_bwd_dq<T>(args, p, in);
}

template <typename T>
struct AttentionFwd {
  static void run(const AttentionFwdArgs& args) { attention_fwd_typed<T>(args); }
};
template <typename T>
struct AttentionBwd {
  static void run(const AttentionBwdArgs& args) { attention_bwd_typed<T>(args); }
};

void attention_fwd(const AttentionFwdArgs& args) { dispatch_float_types<AttentionFwd>(args); }
void attention_bwd(const AttentionBwdArgs& args) { dispatch_float_types<AttentionBwd>(args); }

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
