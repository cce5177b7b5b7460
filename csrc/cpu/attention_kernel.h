// Attention kernels (FlashAttention style), written once with at::vec and compiled once per ISA
// by kernels_<isa>.cpp (which defines CPU_CAPABILITY before including this file).
//
// Scores live only in per-thread (key block x query block) tiles. Every block product runs
// through a register-blocked micro-kernel that accumulates each output element as one chain of
// multiply-adds in a fixed order, whatever the tile shapes around it, and no two tasks write the
// same output, so the results are bitwise repeatable and independent of the thread count.
//
// A tile is either "key-major" (rows are keys, lanes are queries: the forward and the dq pass,
// where the softmax statistics of a query block are vectors) or "query-major" (the backward's
// pass over key blocks, whose statistics are per-row scalars). Two kinds of block product:
//   score products, tile (m x lanes) = rows of one input (m x D) . panel (D x lanes), the panel
//     being a block of another input transposed, packed once per task;
//   output products, acc (m x D) += A (m x k) . rows of an input (k x D), A being a tile read
//     transposed or, for the fused dq, along its rows.
// A "path" (FloatPath, Bf16Path) fixes the operand formats of both.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

#include "../philox.h"
#include "cpu_kernels.h"
#include "layer_norm_kernel.h"  // acc_t, RowIO, dispatch_float_types

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

// Query and key block sizes: the tiles of one block pair (scores, the packed panels, the output
// accumulator) stay in L1/L2 for the head dims the models use.
constexpr int64_t kAttnBlockQ = 64;
constexpr int64_t kAttnBlockK = 128;
// The largest per-thread dq accumulator (floats) of the fused backward pass.
constexpr int64_t kMaxFusedDqFloats = int64_t(1) << 22;

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

// The micro-kernel of the float path: C (MR rows x NV vectors) = [C +] A B over k < K, with
// A(i, k) = a[i * a_rs + k * a_cs] (any strides, as A is only ever broadcast) and row-major B, C.
template <typename Acc>
struct FmaTile {
  using Word = Acc;
  using Out = Acc;
  static constexpr int64_t kLanes = Vectorized<Acc>::size();

  template <int MR, int NV>
  static void run(int64_t K, const Acc* a, int64_t a_rs, int64_t a_cs, const Acc* b, int64_t ldb,
                  Acc* c, int64_t ldc, bool accumulate) {
    using Vec = Vectorized<Acc>;
    Vec acc[MR][NV];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * kLanes) : Vec(Acc(0));
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      Vec bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + k * ldb + v * kLanes);
      const Acc* ak = a + k * a_cs;
      for (int r = 0; r < MR; ++r) {
        const Vec ar(ak[r * a_rs]);
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * kLanes);
    }
  }
};

// The last nvec (< kTileVecs) vectors of a band of MR rows.
template <typename Tile, int MR, int NV>
inline void gemm_tile_cols(int64_t nvec, int64_t K, const typename Tile::Word* a, int64_t a_rs,
                           int64_t a_cs, const typename Tile::Word* b, int64_t ldb,
                           typename Tile::Out* c, int64_t ldc, bool accumulate) {
  if (nvec == NV) {
    Tile::template run<MR, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  } else if constexpr (NV > 1) {
    gemm_tile_cols<Tile, MR, NV - 1>(nvec, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  }
}

// One band of MR rows: whole tiles, then the remaining vectors.
template <typename Tile, int MR>
inline void gemm_band(int64_t nvec, int64_t K, const typename Tile::Word* a, int64_t a_rs,
                      int64_t a_cs, const typename Tile::Word* b, int64_t ldb,
                      typename Tile::Out* c, int64_t ldc, bool accumulate) {
  constexpr int64_t L = Tile::kLanes;
  int64_t v = 0;
  for (; v + kTileVecs <= nvec; v += kTileVecs) {
    Tile::template run<MR, kTileVecs>(K, a, a_rs, a_cs, b + v * L, ldb, c + v * L, ldc,
                                      accumulate);
  }
  if (v < nvec) {
    gemm_tile_cols<Tile, MR, kTileVecs - 1>(nvec - v, K, a, a_rs, a_cs, b + v * L, ldb,
                                            c + v * L, ldc, accumulate);
  }
}

// The last m (< kTileRows) rows.
template <typename Tile, int MR>
inline void gemm_band_rows(int64_t m, int64_t nvec, int64_t K, const typename Tile::Word* a,
                           int64_t a_rs, int64_t a_cs, const typename Tile::Word* b, int64_t ldb,
                           typename Tile::Out* c, int64_t ldc, bool accumulate) {
  if (m == MR) {
    gemm_band<Tile, MR>(nvec, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  } else if constexpr (MR > 1) {
    gemm_band_rows<Tile, MR - 1>(m, nvec, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  }
}

// C (m x n) = [C +] A (m x K) B (K x n), A strided as in FmaTile, B and C row-major, K counted in
// the tile's words. Works in whole vectors: rows of B must be readable, and rows of C writable,
// up to n rounded up to a vector; the lanes of C past n come out as garbage.
template <typename Tile>
void gemm(int64_t m, int64_t n, int64_t K, const typename Tile::Word* a, int64_t a_rs,
          int64_t a_cs, const typename Tile::Word* b, int64_t ldb, typename Tile::Out* c,
          int64_t ldc, bool accumulate) {
  const int64_t nvec = (n + Tile::kLanes - 1) / Tile::kLanes;
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    gemm_band<Tile, kTileRows>(nvec, K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc,
                               accumulate);
  }
  if (i < m) {
    gemm_band_rows<Tile, kTileRows - 1>(m - i, nvec, K, a + i * a_rs, a_rs, a_cs, b, ldb,
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

// dst (K x ld_dst) = the transpose of rows [0, n) of src (stride ld_src, K words each), zero past
// n: the panel a score product reads along vector lanes.
template <typename Word>
inline void pack_transposed(const Word* src, int64_t ld_src, int64_t n, int64_t K, Word* dst,
                            int64_t ld_dst) {
  for (int64_t k = 0; k < K; ++k) {
    Word* out = dst + k * ld_dst;
    for (int64_t i = 0; i < n; ++i) out[i] = src[i * ld_src + k];
    std::fill(out + n, out + ld_dst, Word(0));
  }
}

// The float path: every product in Acc (float, or double for double input) on FmaTile. An input
// is one set of Acc rows, read by score and output products alike.
template <typename T_>
struct FloatPath {
  using T = T_;
  using Acc = acc_t<T>;
  using Tile = FmaTile<Acc>;
  using Word = Acc;
  static int64_t words(int64_t n) { return n; }

  // A (heads, L, D) input as Acc rows whose stride is a whole number of vectors: the tensor
  // itself when it already is one, else a widened, zero-padded copy made once per call (so no
  // block product converts or pads anything). output_operand says whether output products read
  // it too (only the bf16 path keeps a separate copy for them).
  class Input {
   public:
    Input(const T* src, int64_t heads, int64_t L, int64_t D, bool /*output_operand*/) : L_(L) {
      const int64_t padded = round_up(D, Tile::kLanes);
      if constexpr (std::is_same_v<T, Acc>) {
        if (padded == D) {
          data_ = src;
          ld_ = D;
          return;
        }
      }
      const int64_t rows = heads * L;
      copy_.reset(new Acc[std::max<int64_t>(rows * padded, 1)]);
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / padded), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) widen_row(src + r * D, D, padded, copy_.get() + r * padded);
      });
      data_ = copy_.get();
      ld_ = padded;
    }
    // Row r of head `head`, as the A operand of a score product (words along D).
    const Word* rows(int64_t head, int64_t r) const { return data_ + (head * L_ + r) * ld_; }
    int64_t ld() const { return ld_; }
    // Rows [r, ...) of head `head`, as the B operand of an output product (r a block start).
    const Word* output_rows(int64_t head, int64_t r) const { return rows(head, r); }
    int64_t output_ld() const { return ld_; }

   private:
    const Acc* data_;
    int64_t ld_;
    int64_t L_;
    std::unique_ptr<Acc[]> copy_;
  };

  // A tile (k rows x ld lanes) as the A operand of an output product (transposed: A(i, r) is
  // tile[r][i]); the float tile is read as it is.
  static const Word* tile_operand(const Acc* tile, int64_t /*k*/, int64_t /*ld*/, Word* /*buf*/) {
    return tile;
  }
  // A tile (rows x ld lanes) as the A operand of an output product read along its rows: A(i, w)
  // is word w of row i, rows words(ld) apart.
  static const Word* row_operand(const Acc* tile, int64_t /*rows*/, int64_t /*ld*/, Word* /*buf*/) {
    return tile;
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// The bf16 path, for bfloat16 input on CPUs with AVX512-BF16: the products run on vdpbf16ps
// (bf16 pairs multiplied and summed into float), at twice the FMA rate of the float path. A
// word is a pair of bf16 along the product's inner dimension. Inputs are read in place by the
// score products (pairs along D, so D must be even); the output products read a copy packed in
// row pairs. The probabilities and score gradients are rounded to bf16 for the output products
// (as the GPU kernels do); the softmax itself, and every sum, stays in float.
#define DLFAST_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

inline bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

struct Bf16DotTile {
  using Word = uint32_t;
  using Out = float;
  static constexpr int64_t kLanes = 16;

  template <int MR, int NV>
  DLFAST_BF16_TARGET static void run(int64_t K, const uint32_t* a, int64_t a_rs, int64_t a_cs,
                                     const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                                     bool accumulate) {
    __m512 acc[MR][NV];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * kLanes) : _mm512_setzero_ps();
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      __m512bh bv[NV];
      for (int v = 0; v < NV; ++v) {
        bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + k * ldb + v * kLanes));
      }
      const uint32_t* ak = a + k * a_cs;
      for (int r = 0; r < MR; ++r) {
        const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(ak[r * a_rs]));
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * kLanes, acc[r][v]);
    }
  }
};

// The bf16 bits of 16 floats, rounded to nearest even, in the high halves of 32-bit lanes.
inline __m512i bf16_high_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

struct Bf16Path {
  using T = c10::BFloat16;
  using Acc = float;
  using Tile = Bf16DotTile;
  using Word = uint32_t;
  static int64_t words(int64_t n) { return (n + 1) / 2; }

  class Input {
   public:
    Input(const T* src, int64_t heads, int64_t L, int64_t D, bool output_operand)
        : data_(reinterpret_cast<const uint32_t*>(src)), L_(L), D_(D),
          pairs_ld_(round_up(D, Tile::kLanes)) {
      if (!output_operand) return;
      // Word (p, d) of a head = rows 2p and 2p + 1 at column d; zero past D and past an odd L.
      const int64_t pairs = (L + 1) / 2;
      pairs_.reset(new uint32_t[std::max<int64_t>(heads * pairs * pairs_ld_, 1)]);
      const auto* x = reinterpret_cast<const uint16_t*>(src);
      const int64_t grain = std::max<int64_t>(1, 8192 / pairs_ld_);
      at::parallel_for(0, heads * pairs, grain, [&](int64_t b, int64_t e) {
        for (int64_t hp = b; hp < e; ++hp) {
          const int64_t h = hp / pairs, r = 2 * (hp % pairs);
          pack_row_pair(x + (h * L + r) * D, r + 1 < L ? x + (h * L + r + 1) * D : nullptr,
                        pairs_.get() + hp * pairs_ld_);
        }
      });
    }
    const Word* rows(int64_t head, int64_t r) const { return data_ + (head * L_ + r) * (D_ / 2); }
    int64_t ld() const { return D_ / 2; }
    const Word* output_rows(int64_t head, int64_t r) const {
      return pairs_.get() + (head * ((L_ + 1) / 2) + r / 2) * pairs_ld_;
    }
    int64_t output_ld() const { return pairs_ld_; }

   private:
    void pack_row_pair(const uint16_t* lo, const uint16_t* hi, uint32_t* out) const {
      for (int64_t d = 0; d < pairs_ld_; d += 16) {
        const int64_t n = std::clamp<int64_t>(D_ - d, 0, 16);
        const __mmask16 m = static_cast<__mmask16>((uint32_t(1) << n) - 1);
        const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + d));
        const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + d))
                             : _mm512_setzero_si512();
        _mm512_storeu_si512(out + d, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
      }
    }
    const uint32_t* data_;
    int64_t L_, D_, pairs_ld_;
    std::unique_ptr<uint32_t[]> pairs_;
  };

  // Word (p, i) = tile rows 2p and 2p + 1 at lane i, rounded to bf16 (zero for the missing row
  // of an odd k).
  static const Word* tile_operand(const float* tile, int64_t k, int64_t ld, Word* buf) {
    for (int64_t p = 0; p < words(k); ++p) {
      const float* lo = tile + 2 * p * ld;
      const bool has_hi = 2 * p + 1 < k;
      for (int64_t i = 0; i < ld; i += 16) {
        const __m512i l = _mm512_srli_epi32(bf16_high_bits(_mm512_loadu_ps(lo + i)), 16);
        const __m512i h =
            has_hi ? bf16_high_bits(_mm512_loadu_ps(lo + ld + i)) : _mm512_setzero_si512();
        _mm512_storeu_si512(buf + p * ld + i, _mm512_or_si512(l, h));
      }
    }
    return buf;
  }
  // Word (i, w) = lanes 2w and 2w + 1 of tile row i, rounded to bf16 as tile_operand rounds them.
  static const Word* row_operand(const float* tile, int64_t rows, int64_t ld, Word* buf) {
    auto* out = reinterpret_cast<uint16_t*>(buf);
    for (int64_t i = 0; i < rows * ld; i += 16) {
      const __m512i bits = _mm512_srli_epi32(bf16_high_bits(_mm512_loadu_ps(tile + i)), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(bits));
    }
    return buf;
  }
};
#endif

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
  // In a key-major tile row (key `key` against queries q0 + lane), how many leading lanes the
  // causal diagonal bars from that key.
  int64_t barred_lanes(int64_t key, int64_t q0, int64_t lanes) const {
    return std::clamp<int64_t>(key - shift - q0, 0, lanes);
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
// c in [0, n): keys first + c of query `fixed` when kAlongKeys, else queries first + c of key
// `fixed`.
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

// For one vector of scaled scores x: returns ds = p * (dp * keep - delta) with p = exp(x - lse),
// and sets *dropped to p * keep when asked. keep points at the dropout multipliers (1 / (1 -
// dropout_p), or 0 where dropped), or is nullptr without dropout. Both backward schemes call
// this on values read from memory, and its multiply-add is spelled out, so they round alike
// whatever contractions the compiler makes elsewhere.
template <typename Acc>
inline Vectorized<Acc> softmax_grad(const Vectorized<Acc>& x, const Vectorized<Acc>& lse,
                                    const Vectorized<Acc>& dp, const Vectorized<Acc>& delta,
                                    const Acc* keep, Vectorized<Acc>* dropped) {
  using Vec = Vectorized<Acc>;
  const Vec prob = vexp(x - lse);
  if (keep == nullptr) {
    if (dropped) *dropped = prob;
    return prob * (dp - delta);
  }
  const Vec kv = Vec::loadu(keep);
  if (dropped) *dropped = prob * kv;
  return prob * at::vec::fmsub(dp, kv, delta);
}

// The forward and backward passes on one path.
template <typename Path>
class AttentionPasses {
  using T = typename Path::T;
  using Acc = typename Path::Acc;
  using Word = typename Path::Word;
  using Tile = typename Path::Tile;
  using Vec = Vectorized<Acc>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t BQ = kAttnBlockQ, BK = kAttnBlockK, QV = BQ / V;
  static_assert(BQ % V == 0 && BK % V == 0 && BQ % Tile::kLanes == 0 && BK % Tile::kLanes == 0,
                "query and key blocks are whole vectors");
  static constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

 public:
  // Forward: one task per (batch, head, query block). Each key block gives a key-major score tile
  // s (bk x BQ) = k_blk q_blk^T; the running max and sum of every query are vectors across lanes.
  static void run(const AttentionFwdArgs& args) {
    const AttnProblem p(args.params);
    const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk, Dp = round_up(D, Tile::kLanes);
    const int64_t kw = Path::words(D);
    const typename Path::Input q(static_cast<const T*>(args.q), p.B * p.H, Lq, D, false);
    const typename Path::Input k(static_cast<const T*>(args.k), p.B * p.Hkv, Lk, D, false);
    const typename Path::Input v(static_cast<const T*>(args.v), p.B * p.Hkv, Lk, D, true);
    T* out = static_cast<T*>(args.out);
    Acc* lse = static_cast<Acc*>(args.lse);
    const int64_t nqb = (Lq + BQ - 1) / BQ;
    const Acc scale = static_cast<Acc>(p.scale);

    at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<Acc[]> scratch(new Acc[BK * BQ + BQ * Dp + 4 * BQ]);
      Acc* s = scratch.get();        // scores, then probabilities (bk x BQ)
      Acc* o = s + BK * BQ;          // unnormalised output (BQ x Dp)
      Acc* alpha = o + BQ * Dp;      // per-query rescale of o (BQ)
      Acc* keep = alpha + BQ;        // dropout multipliers of one key (BQ)
      Acc* m_out = keep + BQ;        // final running max (BQ)
      Acc* l_out = m_out + BQ;       // final running sum (BQ)
      std::unique_ptr<Word[]> words(new Word[kw * BQ + BK * BQ]);
      Word* qt = words.get();        // q block transposed (kw x BQ)
      Word* p_op = qt + kw * BQ;     // probabilities as an output-product operand
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nqb, b = bh / p.H, h = bh % p.H;
        const int64_t q0 = balanced_block(t % nqb, nqb) * BQ, bq = std::min(BQ, Lq - q0);
        const int64_t kvh = b * p.Hkv + h / p.group;
        pack_transposed(q.rows(bh, q0), q.ld(), bq, kw, qt, BQ);
        std::fill(o, o + BQ * Dp, Acc(0));
        Vec m[QV], l[QV];
        for (int64_t c = 0; c < QV; ++c) {
          m[c] = Vec(kNegInf);
          l[c] = Vec(Acc(0));
        }
        const int64_t k_end = p.key_end(q0, bq);
        for (int64_t k0 = 0; k0 < k_end; k0 += BK) {
          const int64_t bk = std::min(BK, k_end - k0);
          const int64_t allowed = p.allowed_keys(b, k0, bk);
          if (allowed == 0) continue;
          gemm<typename Path::Tile>(bk, BQ, kw, k.rows(kvh, k0), k.ld(), 1, qt, BQ, s, BQ, false);
          const bool cut = p.causal_cut(q0, k0, bk);
          Vec block_max[QV];
          for (int64_t c = 0; c < QV; ++c) block_max[c] = Vec(kNegInf);
          for (int64_t j = 0; j < bk; ++j) {
            Acc* row = s + j * BQ;
            if (allowed < bk && !p.mask[b * Lk + k0 + j]) {
              std::fill(row, row + BQ, kNegInf);
              continue;
            }
            for (int64_t c = 0; c < QV; ++c) {
              (Vec::loadu(row + c * V) * Vec(scale)).store(row + c * V);
            }
            if (cut) std::fill(row, row + p.barred_lanes(k0 + j, q0, BQ), kNegInf);
            for (int64_t c = 0; c < QV; ++c) {
              block_max[c] = at::vec::maximum(block_max[c], Vec::loadu(row + c * V));
            }
          }
          // A query with no allowed key yet keeps max -inf; it exponentiates against 0 instead,
          // so its probabilities (exp(-inf)) and rescale factor come out 0, never NaN.
          Vec shift_by[QV], sum[QV];
          for (int64_t c = 0; c < QV; ++c) {
            const Vec m_new = at::vec::maximum(m[c], block_max[c]);
            shift_by[c] = Vec::blendv(m_new, Vec(Acc(0)), m_new == Vec(kNegInf));
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
              for (int64_t d = 0; d < Dp; d += V) {
                (Vec::loadu(orow + d) * Vec(alpha[i])).store(orow + d);
              }
            }
          }
          gemm<typename Path::Tile>(bq, D, Path::words(bk), Path::tile_operand(s, bk, BQ, p_op), 1,
                                    BQ, v.output_rows(kvh, k0), v.output_ld(), o, Dp, true);
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

  // Backward, FlashAttention-2 style from the saved lse, with tasks that each own their outputs (no
  // atomics, no order that depends on scheduling): dk and dv per (batch, kv head, key block),
  // summing the group's heads and query blocks in a fixed order, then dq per (batch, head, query
  // block), both recomputing p = exp(scale s - lse) and dp = dout v^T; or, given enough kv heads,
  // one pass per (batch, kv head) that also sums dq, with the same bits. The `deterministic` flag
  // is therefore ignored: this backward is always bitwise repeatable, whatever the thread count.
  static void run(const AttentionBwdArgs& args) {
    const AttnProblem p(args.params);
    const BwdInputs in(args, p);
    // One pass over the kv heads (five block products) where there are enough kv heads to keep
    // every thread busy and their dq accumulators fit; else a pass that splits them into key
    // blocks, then the dq pass (seven products, as s and dp are computed twice).
    const int64_t dq_floats = p.group * p.Lq * round_up(p.D, Tile::kLanes);
    const bool fused_dq =
        p.B * p.Hkv >= 2 * at::get_num_threads() && dq_floats <= kMaxFusedDqFloats;
    backward_kv(args, p, in, fused_dq);
    if (!fused_dq) backward_dq(args, p, in);
  }

 private:
  struct BwdInputs {
    BwdInputs(const AttentionBwdArgs& args, const AttnProblem& p)
        : q(static_cast<const T*>(args.q), p.B * p.H, p.Lq, p.D, true),
          dout(static_cast<const T*>(args.dout), p.B * p.H, p.Lq, p.D, true),
          k(static_cast<const T*>(args.k), p.B * p.Hkv, p.Lk, p.D, true),
          v(static_cast<const T*>(args.v), p.B * p.Hkv, p.Lk, p.D, false),
          lse(static_cast<const Acc*>(args.lse)),
          delta(new Acc[std::max<int64_t>(p.B * p.H * p.Lq, 1)]) {
      // delta_i = rowsum(dout_i * out_i), the softmax backward's correction term.
      const T* o = static_cast<const T*>(args.out);
      const T* dy = static_cast<const T*>(args.dout);
      const int64_t D = p.D;
      using IO = RowIO<T>;
      const int64_t grain = std::max<int64_t>(1, 16384 / D);
      at::parallel_for(0, p.B * p.H * p.Lq, grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const T* orow = o + r * D;
          const T* dyrow = dy + r * D;
          typename IO::Vec acc(Acc(0));
          int64_t d = 0;
          for (; d + IO::kStep <= D; d += IO::kStep) {
            typename IO::Vec x[IO::kVecs], y[IO::kVecs];
            IO::load(orow + d, x);
            IO::load(dyrow + d, y);
            for (int s = 0; s < IO::kVecs; ++s) acc = at::vec::fmadd(x[s], y[s], acc);
          }
          Acc sum = at::vec::vec_reduce_all<Acc>([](auto& u, auto& w) { return u + w; }, acc);
          for (; d < D; ++d) sum += static_cast<Acc>(orow[d]) * static_cast<Acc>(dyrow[d]);
          delta[r] = sum;
        }
      });
    }
    typename Path::Input q, dout, k, v;
    const Acc* lse;
    std::unique_ptr<Acc[]> delta;
  };

  // dk, dv (and with fused_dq, dq): key blocks of one kv head, in query-major tiles
  // s (bq x BK) = q_blk k_blk^T. Without fused_dq a task is one key block; with it a task is a
  // whole kv head, whose key blocks run in ascending order so that each dq row sums its key
  // blocks in the order backward_dq does, with the same multiply-adds on the same values: the
  // two schemes give the same bits, so which one runs may depend on the thread count.
  static void backward_kv(const AttentionBwdArgs& args, const AttnProblem& p, const BwdInputs& in,
                          bool fused_dq) {
    const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk, Dp = round_up(D, Tile::kLanes);
    const int64_t kw = Path::words(D), nkb = (Lk + BK - 1) / BK;
    const int64_t blocks_per_task = fused_dq ? nkb : 1;
    const int64_t dq_size = fused_dq ? p.group * Lq * Dp : 0;
    const Acc scale = static_cast<Acc>(p.scale), keep_scale = static_cast<Acc>(p.keep_scale);
    T* dq = static_cast<T*>(args.dq);
    T* dk = static_cast<T*>(args.dk);
    T* dv = static_cast<T*>(args.dv);

    at::parallel_for(0, p.B * p.Hkv * nkb / blocks_per_task, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<Acc[]> scratch(new Acc[2 * BQ * BK + 2 * BK * Dp + 2 * BK + dq_size]);
      Acc* pr = scratch.get();        // probabilities, after dropout (bq x BK)
      Acc* ds = pr + BQ * BK;         // dp, then ds (bq x BK)
      Acc* dk_acc = ds + BQ * BK;     // (bk x Dp)
      Acc* dv_acc = dk_acc + BK * Dp; // (bk x Dp)
      Acc* bias = dv_acc + BK * Dp;   // 0 for an allowed key, -inf for a padded one (BK)
      Acc* keep = bias + BK;          // dropout multipliers of one query (BK)
      Acc* dq_acc = keep + BK;        // with fused_dq: dq of the group's heads (group x Lq x Dp)
      std::unique_ptr<Word[]> words(new Word[2 * kw * BK + 3 * BQ * BK]);
      Word* kt = words.get();         // k block transposed (kw x BK)
      Word* vt = kt + kw * BK;        // v block transposed (kw x BK)
      Word* p_op = vt + kw * BK;      // pr as an output-product operand
      Word* ds_op = p_op + BQ * BK;   // ds as an output-product operand
      Word* ds_rows = ds_op + BQ * BK; // ds as the A operand of the dq product
      for (int64_t t = begin; t < end; ++t) {
        const int64_t kvh = fused_dq ? t : t / nkb, b = kvh / p.Hkv;
        std::fill(dq_acc, dq_acc + dq_size, Acc(0));
        for (int64_t kb = 0; kb < blocks_per_task; ++kb) {
          const int64_t k0 = (fused_dq ? kb : balanced_block(t % nkb, nkb)) * BK;
          const int64_t bk = std::min(BK, Lk - k0);
          std::fill(dk_acc, dk_acc + bk * Dp, Acc(0));
          std::fill(dv_acc, dv_acc + bk * Dp, Acc(0));
          const int64_t allowed = p.allowed_keys(b, k0, bk);
          // Queries [q_first, Lq) see some key of the block.
          const int64_t q_first = p.causal ? std::clamp<int64_t>(k0 - p.shift, 0, Lq) : 0;
          if (allowed > 0 && q_first < Lq) {
            pack_transposed(in.k.rows(kvh, k0), in.k.ld(), bk, kw, kt, BK);
            pack_transposed(in.v.rows(kvh, k0), in.v.ld(), bk, kw, vt, BK);
            for (int64_t j = 0; j < BK; ++j) {
              bias[j] = j < bk && (allowed == bk || p.mask[b * Lk + k0 + j]) ? Acc(0) : kNegInf;
            }
            for (int64_t g = 0; g < p.group; ++g) {
              const int64_t bh = b * p.H + (kvh % p.Hkv) * p.group + g;
              for (int64_t q0 = q_first / BQ * BQ; q0 < Lq; q0 += BQ) {
                const int64_t bq = std::min(BQ, Lq - q0), q_row = bh * Lq + q0;
                gemm<Tile>(bq, BK, kw, in.q.rows(bh, q0), in.q.ld(), 1, kt, BK, pr, BK, false);
                gemm<Tile>(bq, BK, kw, in.dout.rows(bh, q0), in.dout.ld(), 1, vt, BK, ds, BK,
                           false);
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
                    std::fill(prow + open, prow + BK, kNegInf);
                  }
                  if (p.dropout) dropout_row<true>(p, bh, q0 + i, k0, BK, keep_scale, keep);
                  for (int64_t c = 0; c < BK; c += V) {
                    Vec dropped;
                    softmax_grad(Vec::loadu(prow + c), lse_i, Vec::loadu(dsrow + c), delta_i,
                                 p.dropout ? keep + c : nullptr, &dropped)
                        .store(dsrow + c);
                    dropped.store(prow + c);
                  }
                }
                const int64_t qw = Path::words(bq);
                gemm<Tile>(bk, D, qw, Path::tile_operand(pr, bq, BK, p_op), 1, BK,
                           in.dout.output_rows(bh, q0), in.dout.output_ld(), dv_acc, Dp, true);
                gemm<Tile>(bk, D, qw, Path::tile_operand(ds, bq, BK, ds_op), 1, BK,
                           in.q.output_rows(bh, q0), in.q.output_ld(), dk_acc, Dp, true);
                if (fused_dq) {
                  gemm<Tile>(bq, D, Path::words(bk), Path::row_operand(ds, bq, BK, ds_rows),
                             Path::words(BK), 1, in.k.output_rows(kvh, k0), in.k.output_ld(),
                             dq_acc + (g * Lq + q0) * Dp, Dp, true);
                }
              }
            }
          }
          for (int64_t j = 0; j < bk; ++j) {
            narrow_row(dk_acc + j * Dp, D, scale, dk + (kvh * Lk + k0 + j) * D);
            narrow_row(dv_acc + j * Dp, D, Acc(1), dv + (kvh * Lk + k0 + j) * D);
          }
        }
        for (int64_t r = 0; r < dq_size / Dp; ++r) {
          const int64_t g = r / Lq, bh = b * p.H + (kvh % p.Hkv) * p.group + g;
          narrow_row(dq_acc + r * Dp, D, scale, dq + (bh * Lq + r % Lq) * D);
        }
      }
    });
  }

  // dq: query block [q0, q0 + bq) of one head, in key-major tiles s (bk x BQ) = k_blk q_blk^T.
  static void backward_dq(const AttentionBwdArgs& args, const AttnProblem& p, const BwdInputs& in) {
    const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk, Dp = round_up(D, Tile::kLanes);
    const int64_t kw = Path::words(D), nqb = (Lq + BQ - 1) / BQ;
    const Acc scale = static_cast<Acc>(p.scale), keep_scale = static_cast<Acc>(p.keep_scale);
    T* dq = static_cast<T*>(args.dq);

    at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<Acc[]> scratch(new Acc[2 * BK * BQ + BQ * Dp + 3 * BQ]);
      Acc* st = scratch.get();         // scores (bk x BQ)
      Acc* ds = st + BK * BQ;          // dp, then ds (bk x BQ)
      Acc* dq_acc = ds + BK * BQ;      // (BQ x Dp)
      Acc* lse = dq_acc + BQ * Dp;     // lse of the block's queries, +inf past its end (BQ)
      Acc* delta = lse + BQ;           // (BQ)
      Acc* keep = delta + BQ;          // dropout multipliers of one key (BQ)
      std::unique_ptr<Word[]> words(new Word[2 * kw * BQ + BK * BQ]);
      Word* qt = words.get();          // q block transposed (kw x BQ)
      Word* dot = qt + kw * BQ;        // dout block transposed (kw x BQ)
      Word* ds_op = dot + kw * BQ;     // ds as an output-product operand
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nqb, b = bh / p.H, h = bh % p.H;
        const int64_t q0 = balanced_block(t % nqb, nqb) * BQ, bq = std::min(BQ, Lq - q0);
        const int64_t q_row = bh * Lq + q0, kvh = b * p.Hkv + h / p.group;
        pack_transposed(in.q.rows(bh, q0), in.q.ld(), bq, kw, qt, BQ);
        pack_transposed(in.dout.rows(bh, q0), in.dout.ld(), bq, kw, dot, BQ);
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
          gemm<Tile>(bk, BQ, kw, in.k.rows(kvh, k0), in.k.ld(), 1, qt, BQ, st, BQ, false);
          gemm<Tile>(bk, BQ, kw, in.v.rows(kvh, k0), in.v.ld(), 1, dot, BQ, ds, BQ, false);
          const bool cut = p.causal_cut(q0, k0, bk);
          for (int64_t j = 0; j < bk; ++j) {
            Acc* srow = st + j * BQ;
            Acc* dsrow = ds + j * BQ;
            if (allowed < bk && !p.mask[b * Lk + k0 + j]) {
              std::fill(dsrow, dsrow + BQ, Acc(0));
              continue;
            }
            for (int64_t c = 0; c < BQ; c += V) (Vec::loadu(srow + c) * Vec(scale)).store(srow + c);
            if (cut) std::fill(srow, srow + p.barred_lanes(k0 + j, q0, BQ), kNegInf);
            if (p.dropout) dropout_row<false>(p, bh, k0 + j, q0, BQ, keep_scale, keep);
            for (int64_t c = 0; c < BQ; c += V) {
              softmax_grad(Vec::loadu(srow + c), Vec::loadu(lse + c), Vec::loadu(dsrow + c),
                           Vec::loadu(delta + c), p.dropout ? keep + c : nullptr,
                           static_cast<Vec*>(nullptr))
                  .store(dsrow + c);
            }
          }
          gemm<Tile>(bq, D, Path::words(bk), Path::tile_operand(ds, bk, BQ, ds_op), 1, BQ,
                     in.k.output_rows(kvh, k0), in.k.output_ld(), dq_acc, Dp, true);
        }
        for (int64_t i = 0; i < bq; ++i) {
          narrow_row(dq_acc + i * Dp, D, scale, dq + (q_row + i) * D);
        }
      }
    });
  }
};

// Runs the passes on the bf16 path where it applies, else on the float path.
template <typename T>
struct AttentionOps {
  template <typename Args>
  static void run(const Args& args) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (args.params.D % 2 == 0 && cpu_has_bf16_dot()) return AttentionPasses<Bf16Path>::run(args);
    }
#endif
    AttentionPasses<FloatPath<T>>::run(args);
  }
};

void attention_fwd(const AttentionFwdArgs& args) { dispatch_float_types<AttentionOps>(args); }
void attention_bwd(const AttentionBwdArgs& args) { dispatch_float_types<AttentionOps>(args); }

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
