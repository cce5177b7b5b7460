// Fused attention for fp16 / bf16 after FlashAttention-2 (Dao, 2023): the (Lq, Lk) score matrix
// never leaves the chip. Semantics (masking, causal_shift, dropout, lse) are those of the
// attention_fwd / attention_bwd schemas in csrc/dlfast.cpp.
//
// Every kernel runs 4 warps and every warp owns 16 rows of the tile it accumulates, so all
// matrix products are warp-local mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix from
// shared memory; blocks share only the tiles they stream in with cp.async.
//   forward: a block per (64 query rows, b * H + h); the key tiles stream in while the values
//            of the previous tile are used and the value tiles while the scores are computed
//            (FlashAttention-2's order); online softmax in registers.
//   backward: delta = rowsum(dout * out); then a dq kernel shaped like the forward (it recomputes
//            P from lse), and a dk/dv kernel per (b * Hkv + kv head, 64 keys) that loops over the
//            query heads of its group and their query tiles. Both write their gradient once from
//            registers: no atomics, so the backward is always deterministic.
// Head dims are served by 8 instantiations, D rounded up to a multiple of 32 with zero-filled
// loads: D = 80 runs as 96, where with only 64 / 128 / 256 it would do 60% more matrix work.
// Hopper (sm_90) runs this sm_80 mma.sync path for now; a WGMMA/TMA path is future work.
//
// Only cuda_runtime / cuda_fp16 / cuda_bf16 here: the file compile-checks with plain nvcc.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../philox.h"
#include "launchers.h"
#include "ptx.h"

namespace dlfast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Rows (queries in the forward and dq kernels, keys in the dk/dv kernel) per block.
constexpr int kBlockRows = 16 * kWarps;
// Shared-memory rows hold D + 8 elements: the 16-byte skew puts the 8 rows that one ldmatrix
// phase reads in 8 different bank groups (D / 8 + 1 is odd), so tile reads are conflict-free.
constexpr int kPad = 8;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a kernel needs besides its template parameters; built once by the launchers.
struct Params {
  const void* q;          // (B, H, Lq, D)
  const void* k;          // (B, Hkv, Lk, D)
  const void* v;          // (B, Hkv, Lk, D)
  const void* dout;       // (B, H, Lq, D), backward only
  void* out;              // (B, H, Lq, D), forward output
  float* lse_out;         // (B, H, Lq), forward output
  const float* lse;       // (B, H, Lq), backward input
  const float* delta;     // (B, H, Lq), backward: rowsum(dout * out)
  void* dq;               // (B, H, Lq, D)
  void* dk;               // (B, Hkv, Lk, D)
  void* dv;               // (B, Hkv, Lk, D)
  const uint8_t* mask;    // (B, Lk) key padding mask (nonzero = attend), or nullptr
  const int64_t* seed;    // 0-dim dropout seed, read on the device
  int H, Hkv, group, Lq, Lk, D;
  bool causal;
  int shift;              // causal_shift clamped to [-Lq, Lk]: same mask, and int-sized
  bool dropout;
  uint32_t dropout_threshold;
  float dropout_rescale;  // 1 / (1 - dropout_p), 1 without dropout
  float scale;
  float scale_log2;       // scale * log2(e): the softmax runs on exp2
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Two floats rounded to T, `lo` in the low half (the lower column index of a fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  }
  return bits;
}

// ---------------------------------------------------------------------------------------------
// Warp-level tile products and data movement

// Rows [row0, row0 + kRows) of a row-major (rows, D) matrix into shared rows of kD + kPad
// elements, by the whole block, asynchronously. Rows past `rows` and columns past D are zeros:
// a zero column adds nothing to a dot product, and zero rows are masked or never stored.
template <int kRows, int kD, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int row0, int rows, int D) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row; D % 8 == 0 keeps them whole
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies the same chunk count");
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    const bool valid = row0 + r < rows && col < D;
    cp_async_16(dst + r * (kD + kPad) + col, valid ? src + int64_t(row0 + r) * D + col : src,
                valid);
  }
}

// acc (16 x 8kN) += A B^T with A = 16 rows of `a` and B = 8kN rows of `b`, both kK * 16 columns
// wide in shared rows of kStride elements (queries x keys for Q K^T, and the like).
template <typename T, int kN, int kK, int kStride>
__device__ __forceinline__ void gemm_abt(float (&acc)[kN][4], const T* a, const T* b, int lane) {
  static_assert(kN % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (n * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 +
                          (lane / 8 % 2) * 8);
      mma_16816<T>(acc[n], af, bf[0], bf[1]);
      mma_16816<T>(acc[n + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x 8kN) += A B with A in registers (16 x 16kK, from to_a_fragments) and B the
// (16kK, 8kN) top-left corner of row-major shared rows of kStride elements (keys x head dim
// for P V, and the like).
template <typename T, int kN, int kK, int kStride>
__device__ __forceinline__ void gemm_ab(float (&acc)[kN][4], const uint32_t (&a)[kK][4],
                                        const T* b, int lane) {
  static_assert(kN % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + lane % 8 + (lane / 8 % 2) * 8) * kStride + n * 8 +
                                (lane / 16) * 8);
      mma_16816<T>(acc[n], a[kk], bf[0], bf[1]);
      mma_16816<T>(acc[n + 1], a[kk], bf[2], bf[3]);
    }
  }
}

// An accumulator tile (16 x 8kN) as the A operand (16 x 16 * kN/2) of the next product: the
// C layout of two adjacent 8-column tiles is the A layout of one 16-column slice. Element
// acc[n][r] becomes 0 where bit 4n + r of `keep` is clear (dropout).
template <typename T, int kN>
__device__ __forceinline__ void to_a_fragments(uint32_t (&a)[kN / 2][4], const float (&acc)[kN][4],
                                               uint32_t keep) {
  static_assert(kN <= 8, "one keep bit per element of a 32-bit mask");
  const auto kept = [&](int n, int r) { return (keep >> (4 * n + r)) & 1u ? acc[n][r] : 0.f; };
#pragma unroll
  for (int kk = 0; kk < kN / 2; ++kk) {
    a[kk][0] = pack2<T>(kept(2 * kk, 0), kept(2 * kk, 1));
    a[kk][1] = pack2<T>(kept(2 * kk, 2), kept(2 * kk, 3));
    a[kk][2] = pack2<T>(kept(2 * kk + 1, 0), kept(2 * kk + 1, 1));
    a[kk][3] = pack2<T>(kept(2 * kk + 1, 2), kept(2 * kk + 1, 3));
  }
}

// Writes a warp's 16 x 8kN accumulator, rows g and g + 8 of each lane times mul[0] and mul[1],
// to rows [row0, row0 + 16) and columns col0 + [0, 8kN), clipped to rows and D, of a row-major
// (rows, D) matrix. It goes through this warp's own 16 shared rows `stage` (free by then), so
// that global stores are whole 16-byte chunks of a row instead of scattered 4-byte pairs.
template <typename T, int kN, int kStride>
__device__ __forceinline__ void store_warp_tile(const float (&acc)[kN][4], const float (&mul)[2],
                                                T* stage, T* dst, int row0, int rows, int col0,
                                                int D, int lane) {
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    *reinterpret_cast<uint32_t*>(stage + g * kStride + n * 8 + 2 * t) =
        pack2<T>(acc[n][0] * mul[0], acc[n][1] * mul[0]);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * kStride + n * 8 + 2 * t) =
        pack2<T>(acc[n][2] * mul[1], acc[n][3] * mul[1]);
  }
  __syncwarp();
#pragma unroll
  for (int c = lane; c < 16 * kN; c += 32) {
    const int r = c / kN;
    const int col = (c % kN) * 8;
    if (row0 + r < rows && col0 + col < D) {
      *reinterpret_cast<uint4*>(dst + int64_t(row0 + r) * D + col0 + col) =
          *reinterpret_cast<const uint4*>(stage + r * kStride + col);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Masking and dropout

__device__ __forceinline__ bool key_allowed(const uint8_t* mask_row, int key, int Lk) {
  return key < Lk && (mask_row == nullptr || mask_row[key] != 0);
}

// Bit 4n + r set iff element acc[n][r] of this lane survives dropout, for an accumulator whose
// rows are `row` (r < 2) and row + 8 (r >= 2) and whose columns are col0 + 8n + 2(lane % 4) +
// r % 2. kRowsAreQueries says which of the two indexes the query (Philox counter word 1).
template <int kN, bool kRowsAreQueries>
__device__ __forceinline__ uint32_t dropout_keep_bits(const Params& p, uint64_t seed, int bh,
                                                      int row, int col0, int lane) {
  uint32_t bits = 0;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const uint32_t rr = row + (r / 2) * 8;
      const uint32_t cc = col0 + n * 8 + 2 * (lane % 4) + r % 2;
      const bool keep = kRowsAreQueries
                            ? dropout_keep(seed, p.dropout_threshold, bh, rr, cc)
                            : dropout_keep(seed, p.dropout_threshold, bh, cc, rr);
      bits |= uint32_t(keep) << (4 * n + r);
    }
  }
  return bits;
}

// Query-major scores (forward, dq) to log2 units; -inf where query `row` (+8 for r >= 2) may
// not attend key k0 + column: key_ok[column] == 0 (past Lk or padded) or, when causal, past
// the diagonal. need_mask == false means the caller knows every element is allowed.
template <int kN>
__device__ __forceinline__ void scale_and_mask_scores(float (&s)[kN][4], const Params& p, int row,
                                                      int k0, const uint8_t* key_ok,
                                                      bool need_mask, int lane) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int col = n * 8 + 2 * (lane % 4) + r % 2;
      const bool ok = !need_mask || (key_ok[col] != 0 &&
                                     (!p.causal || k0 + col - (row + (r / 2) * 8) <= p.shift));
      s[n][r] = ok ? s[n][r] * p.scale_log2 : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Key/value streaming shared by the forward and dq kernels

// How many key tiles, from the first, query rows [q0, q0 + kBlockRows) visit: all of them, or
// when causal those up to the diagonal of the last row that exists. Wholly padded tiles are
// skipped later, one by one (stream_kv_tiles).
template <int kBc>
__device__ __forceinline__ int key_tile_count(const Params& p, int q0) {
  int end = p.Lk;
  if (p.causal) {
    const int last_row = min(q0 + kBlockRows, p.Lq) - 1;
    end = max(0, min(end, last_row + p.shift + 1));  // |shift| <= 2^22 after clamping
  }
  return int(ceil_div(end, kBc));
}

// Streams key and value tiles [0, tiles) through shared memory in FlashAttention-2's
// order: a tile's values load while key_step(key_stage, k0, all_allowed) computes its scores,
// and the next tile's keys load while value_step(key_stage, k0) uses the values. One value
// buffer thus suffices, and one key buffer (kKeyStages = 1) unless value_step reads the keys
// too, as the dq kernel's does (dq += dS K): it gets two, so the next keys go to the other one.
// key_ok[kBc] says which keys of the current tile may be attended (inside Lk, not padded);
// their mask bytes are read a tile ahead into a register, so the latency hides behind the
// current tile, and a tile with no allowed key skips both steps.
template <int kBc, int kD, int kKeyStages, typename T, typename KeyStep, typename ValueStep>
__device__ __forceinline__ void stream_kv_tiles(const Params& p, int tiles, const T* k,
                                                const T* v, const uint8_t* mask_row, T* sK,
                                                T* sV, uint8_t* key_ok, KeyStep&& key_step,
                                                ValueStep&& value_step) {
  if (tiles == 0) return;
  load_tile<kBc, kD>(sK, k, 0, p.Lk, p.D);
  cp_async_commit();
  bool ok = threadIdx.x < kBc && key_allowed(mask_row, threadIdx.x, p.Lk);
  for (int tile = 0; tile < tiles; ++tile) {
    const int key_stage = tile % kKeyStages;
    const bool has_next = tile + 1 < tiles;
    cp_async_wait<0>();  // this tile's keys
    if (threadIdx.x < kBc) key_ok[threadIdx.x] = ok;  // key_step(tile - 1) ended before a barrier
    // After this barrier the keys and key_ok are visible, and every warp is done with the
    // previous tile's values, so their buffer can be refilled.
    const int allowed = __syncthreads_count(ok);
    load_tile<kBc, kD>(sV, v, tile * kBc, p.Lk, p.D);
    cp_async_commit();
    ok = has_next && threadIdx.x < kBc &&
         key_allowed(mask_row, (tile + 1) * kBc + threadIdx.x, p.Lk);
    if (allowed > 0) key_step(key_stage, tile * kBc, allowed == kBc);
    cp_async_wait<0>();  // this tile's values
    // After this barrier every warp is done with key_step: with one key stage its buffer is
    // free; with two, the other one was last read by value_step(tile - 1), before the barrier
    // above.
    __syncthreads();
    if (has_next) {
      load_tile<kBc, kD>(sK + (key_stage + 1) % kKeyStages * kBc * (kD + kPad), k,
                         (tile + 1) * kBc, p.Lk, p.D);
      cp_async_commit();
    }
    if (allowed > 0) value_step(key_stage, tile * kBc);
  }
}

// One online-softmax step (FlashAttention-2, Algorithm 1) for a lane's two rows: s holds
// scores in log2 units (-inf where masked) and leaves as unnormalised probabilities
// exp2(s - m); the running max m, the lane's partial row sums l and the output accumulator o
// are rescaled to the new max. A row with nothing allowed yet keeps m = -inf and
// subtracts 0 instead, so no inf - inf appears.
template <int kN, int kDn>
__device__ __forceinline__ void online_softmax_step(float (&s)[kN][4], float (&m)[2],
                                                    float (&l)[2], float (&o)[kDn][4]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = m[i];
#pragma unroll
    for (int n = 0; n < kN; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
    // The 4 lanes of a quad hold the same row.
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m[i] - base);
    m[i] = mx;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      s[n][2 * i] = exp2f(s[n][2 * i] - base);
      s[n][2 * i + 1] = exp2f(s[n][2 * i + 1] - base);
      sum += s[n][2 * i] + s[n][2 * i + 1];
    }
    l[i] = l[i] * alpha + sum;
#pragma unroll
    for (int d = 0; d < kDn; ++d) {
      o[d][2 * i] *= alpha;
      o[d][2 * i + 1] *= alpha;
    }
  }
}

// Where a forward or dq block works: grid (B * H, query tiles), query tiles in reverse order
// (under a causal mask the last ones have the most keys, and starting them first shortens the
// tail of the launch); this lane's warp and query rows.
template <typename T>
struct QueryBlock {
  int lane;
  int warp;
  int bh;              // b * H + h
  int q0;              // first query row of the block
  int warp_row;        // first query row of this warp
  int row;             // query row of acc[.][0..1]; row + 8 of acc[.][2..3]
  int64_t q_offset;    // of this (b, h) in q, out, dout and dq
  const T* k;          // this (b, kv head)'s keys
  const T* v;          // and values
  const uint8_t* mask_row;  // this b's key padding mask, or nullptr

  __device__ explicit QueryBlock(const Params& p)
      : lane(threadIdx.x % 32),
        warp(threadIdx.x / 32),
        bh(blockIdx.x),
        q0((gridDim.y - 1 - blockIdx.y) * kBlockRows),
        warp_row(q0 + warp * 16),
        row(warp_row + lane / 4),
        q_offset(int64_t(bh) * p.Lq * p.D) {
    const int b = bh / p.H;
    const int64_t kv_offset = (int64_t(b) * p.Hkv + bh % p.H / p.group) * p.Lk * p.D;
    k = static_cast<const T*>(p.k) + kv_offset;
    v = static_cast<const T*>(p.v) + kv_offset;
    mask_row = p.mask != nullptr ? p.mask + int64_t(b) * p.Lk : nullptr;
  }
};

// The scores of this warp's 16 query rows (shared rows sQw) against key tile k0 (sK), in log2
// units and masked: the first half of a key step in the forward and dq kernels. False, with s
// left zero, when the causal mask hides the whole tile from these rows.
template <typename T, int kD, int kBc>
__device__ __forceinline__ bool warp_scores(float (&s)[kBc / 8][4], const Params& p,
                                            const QueryBlock<T>& qb, const T* sQw, const T* sK,
                                            int k0, bool all_allowed, const uint8_t* key_ok) {
  if (p.causal && k0 - (qb.warp_row + 15) > p.shift) return false;
  gemm_abt<T, kBc / 8, kD / 16, kD + kPad>(s, sQw, sK, qb.lane);
  const bool need_mask = !all_allowed || (p.causal && k0 + kBc - 1 - qb.warp_row > p.shift);
  scale_and_mask_scores(s, p, qb.row, k0, key_ok, need_mask, qb.lane);
  return true;
}

// Tile shapes per padded head dim kD, chosen to stay within 255 registers without spilling and
// within the 163 KB of shared memory an sm_80 block may have.
template <int kD>
struct TileConfig {
  static constexpr int kStride = kD + kPad;
  // Keys per tile of the forward kernel: its fp32 output accumulator takes kD / 2 registers per
  // lane, and a 64-key score tile 32 more, which fits up to kD = 128.
  static constexpr int kFwdKeyTile = kD <= 128 ? 64 : 32;
  // The dq kernel holds a score and a dP tile besides its accumulator: with 64-key tiles it
  // needed 242 registers per lane at kD = 128 (2 blocks per SM), with 32-key tiles 168 (3).
  static constexpr int kDqKeyTile = kD <= 64 ? 64 : 32;
  // Query rows per tile of the dk/dv kernel, whose two accumulators take kD registers per lane
  // between them, plus 2 * (rows / 2) for the score and dP tiles.
  static constexpr int kDkdvQueryTile = kD <= 64 ? 64 : 32;
  // Above kD = 128, dk and dv would need more than 128 accumulator registers per lane: the
  // head dim is split over two blocks, each recomputing the scores over the full kD.
  static constexpr int kDkdvSlices = kD <= 128 ? 1 : 2;
  static constexpr int kDkdvSliceWidth = kD / kDkdvSlices;

  static constexpr size_t kRowBytes = size_t(kStride) * 2;  // one shared row of fp16 / bf16
  // Q, K and V tiles, then the key flags.
  static constexpr size_t kFwdSmem =
      (kBlockRows + 2 * kFwdKeyTile) * kRowBytes + kFwdKeyTile;
  // Q and dout, two K stages and V, then the key flags.
  static constexpr size_t kDqSmem = (2 * kBlockRows + 3 * kDqKeyTile) * kRowBytes + kDqKeyTile;
  // K and V, two Q and two dout stages, then two stages of lse and delta.
  static constexpr size_t kDkdvSmem = (2 * kBlockRows + 4 * kDkdvQueryTile) * kRowBytes +
                                      4 * kDkdvQueryTile * sizeof(float);
};

// ---------------------------------------------------------------------------------------------
// Kernels

// Grid (B * H, query tiles), see QueryBlock.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params p) {
  using Cfg = TileConfig<kD>;
  constexpr int kBc = Cfg::kFwdKeyTile;
  constexpr int kStride = Cfg::kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockRows * kStride;
  T* sV = sK + kBc * kStride;
  uint8_t* key_ok = reinterpret_cast<uint8_t*>(sV + kBc * kStride);
  const QueryBlock<T> qb(p);
  T* sQw = sQ + qb.warp * 16 * kStride;

  load_tile<kBlockRows, kD>(sQ, static_cast<const T*>(p.q) + qb.q_offset, qb.q0, p.Lq, p.D);
  cp_async_commit();

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  float o[kD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  uint32_t pf[kBc / 16][4];  // this tile's probabilities as the A operand of P V
  bool active = false;       // whether this warp's rows see any key of the tile
  stream_kv_tiles<kBc, kD, 1>(
      p, key_tile_count<kBc>(p, qb.q0), qb.k, qb.v, qb.mask_row, sK, sV, key_ok,
      [&](int, int k0, bool all_allowed) {
        float s[kBc / 8][4] = {};
        active = warp_scores<T, kD, kBc>(s, p, qb, sQw, sK, k0, all_allowed, key_ok);
        if (!active) return;
        online_softmax_step(s, m, l, o);
        // Dropout applies to P V only: l sums the probabilities before dropout.
        const uint32_t keep =
            p.dropout ? dropout_keep_bits<kBc / 8, true>(p, seed, qb.bh, qb.row, k0, qb.lane)
                      : kFullMask;
        to_a_fragments<T>(pf, s, keep);
      },
      [&](int, int) {
        if (active) gemm_ab<T, kD / 8, kBc / 16, kStride>(o, pf, sV, qb.lane);
      });
  cp_async_wait<0>();  // the Q copy is still pending when there was no key tile
  __syncthreads();

  float mul[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(kFullMask, l[i], 1);
    l[i] += __shfl_xor_sync(kFullMask, l[i], 2);
    mul[i] = l[i] > 0.f ? p.dropout_rescale / l[i] : 0.f;  // no allowed key: zeros
  }
  store_warp_tile<T, kD / 8, kStride>(o, mul, sQw, static_cast<T*>(p.out) + qb.q_offset,
                                      qb.warp_row, p.Lq, 0, p.D, qb.lane);
  if (qb.lane % 4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (qb.row + 8 * i < p.Lq) {
        p.lse_out[int64_t(qb.bh) * p.Lq + qb.row + 8 * i] =
            l[i] > 0.f ? m[i] * kLn2 + logf(l[i]) : INFINITY;
      }
    }
  }
}

// delta[row] = sum_d dout[row, d] * out[row, d] (the D_i of FlashAttention-2), a warp per row.
// It equals sum_j P_ij dP_ij with or without dropout, which the dS = P (dP - delta) of the
// other two kernels needs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_delta_kernel(const T* dout, const T* out, float* delta, int64_t rows, int D) {
  using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  const int lane = threadIdx.x % 32;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kWarps) {
    float acc = 0.f;
    for (int c = lane * 8; c < D; c += 32 * 8) {
      const uint4 a = *reinterpret_cast<const uint4*>(dout + row * D + c);
      const uint4 b = *reinterpret_cast<const uint4*>(out + row * D + c);
      T2 a2[4];  // memcpy, not a pointer cast: reading a uint4 through a T2* breaks aliasing rules
      T2 b2[4];
      memcpy(a2, &a, sizeof(a));
      memcpy(b2, &b, sizeof(b));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 x;
        float2 y;
        if constexpr (std::is_same_v<T, __half>) {
          x = __half22float2(a2[i]);
          y = __half22float2(b2[i]);
        } else {
          x = __bfloat1622float2(a2[i]);
          y = __bfloat1622float2(b2[i]);
        }
        acc += x.x * y.x + x.y * y.y;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      acc += __shfl_xor_sync(kFullMask, acc, offset);
    if (lane == 0) delta[row] = acc;
  }
}

// dq = scale * dS K with dS = P (dP - delta), P = exp(scale * q.k - lse) and dP = dout V^T
// (times the dropout keep / (1 - p)). Grid and key streaming as the forward's.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const Params p) {
  using Cfg = TileConfig<kD>;
  constexpr int kBc = Cfg::kDqKeyTile;
  constexpr int kStride = Cfg::kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlockRows * kStride;
  T* sK = sdO + kBlockRows * kStride;
  T* sV = sK + 2 * kBc * kStride;  // after two key stages
  uint8_t* key_ok = reinterpret_cast<uint8_t*>(sV + kBc * kStride);
  const QueryBlock<T> qb(p);
  T* sQw = sQ + qb.warp * 16 * kStride;
  const T* sdOw = sdO + qb.warp * 16 * kStride;

  load_tile<kBlockRows, kD>(sQ, static_cast<const T*>(p.q) + qb.q_offset, qb.q0, p.Lq, p.D);
  load_tile<kBlockRows, kD>(sdO, static_cast<const T*>(p.dout) + qb.q_offset, qb.q0, p.Lq, p.D);
  cp_async_commit();

  // lse in log2 units; rows past Lq get +inf, which makes their P exactly 0.
  float lse_log2[2];
  float delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool valid = qb.row + 8 * i < p.Lq;
    const int64_t at = int64_t(qb.bh) * p.Lq + qb.row + 8 * i;
    lse_log2[i] = valid ? p.lse[at] * kLog2e : INFINITY;
    delta[i] = valid ? p.delta[at] : 0.f;
  }

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  float dq[kD / 8][4] = {};
  float prob[kBc / 8][4];  // this tile's P, from the key step to the value step
  bool active = false;
  stream_kv_tiles<kBc, kD, 2>(
      p, key_tile_count<kBc>(p, qb.q0), qb.k, qb.v, qb.mask_row, sK, sV, key_ok,
      [&](int key_stage, int k0, bool all_allowed) {
        float s[kBc / 8][4] = {};
        active = warp_scores<T, kD, kBc>(s, p, qb, sQw, sK + key_stage * kBc * kStride, k0,
                                         all_allowed, key_ok);
        if (!active) return;
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) {
#pragma unroll
          for (int r = 0; r < 4; ++r) prob[n][r] = exp2f(s[n][r] - lse_log2[r / 2]);
        }
      },
      [&](int key_stage, int k0) {
        if (!active) return;
        float ds[kBc / 8][4] = {};
        gemm_abt<T, kBc / 8, kD / 16, kStride>(ds, sdOw, sV, qb.lane);
        const uint32_t keep =
            p.dropout ? dropout_keep_bits<kBc / 8, true>(p, seed, qb.bh, qb.row, k0, qb.lane)
                      : kFullMask;
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float dp = (keep >> (4 * n + r)) & 1u ? ds[n][r] * p.dropout_rescale : 0.f;
            ds[n][r] = prob[n][r] * (dp - delta[r / 2]);
          }
        }
        uint32_t a[kBc / 16][4];
        to_a_fragments<T>(a, ds, kFullMask);
        gemm_ab<T, kD / 8, kBc / 16, kStride>(dq, a, sK + key_stage * kBc * kStride, qb.lane);
      });
  cp_async_wait<0>();
  __syncthreads();
  const float mul[2] = {p.scale, p.scale};
  store_warp_tile<T, kD / 8, kStride>(dq, mul, sQw, static_cast<T*>(p.dq) + qb.q_offset,
                                      qb.warp_row, p.Lq, 0, p.D, qb.lane);
}

// dk = scale * dS^T Q and dv = (P * keep / (1 - p))^T dout for 64 keys of one (b, kv head),
// summed over the query heads of its group and all their query tiles in a fixed order. Each
// warp owns 16 keys and works on the transposed products (keys x queries), so the rows of dk
// and dv it accumulates are its own: no atomics. Grid (B * Hkv, key tiles, head-dim slices).
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const Params p) {
  using Cfg = TileConfig<kD>;
  constexpr int kBr = Cfg::kDkdvQueryTile;
  constexpr int kDv = Cfg::kDkdvSliceWidth;
  constexpr int kStride = Cfg::kStride;
  constexpr int kQTile = kBr * kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlockRows * kStride;
  T* sQ = sV + kBlockRows * kStride;
  T* sdO = sQ + 2 * kQTile;
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kQTile);
  float* sDelta = sLse + 2 * kBr;

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int b = blockIdx.x / p.Hkv;
  const int first_head = blockIdx.x % p.Hkv * p.group;
  const int k0 = blockIdx.y * kBlockRows;
  const int col0 = blockIdx.z * kDv;  // the head-dim columns of dk and dv this block writes
  const int warp_key = k0 + warp * 16;
  const int key = warp_key + lane / 4;  // key of acc[.][0..1]; key + 8 of acc[.][2..3]
  const int64_t kv_offset = int64_t(blockIdx.x) * p.Lk * p.D;
  const uint8_t* mask_row = p.mask != nullptr ? p.mask + int64_t(b) * p.Lk : nullptr;
  const bool key_ok[2] = {key_allowed(mask_row, key, p.Lk), key_allowed(mask_row, key + 8, p.Lk)};
  const bool block_any = __syncthreads_or(key_ok[0] || key_ok[1]);
  const bool warp_any = __any_sync(kFullMask, key_ok[0] || key_ok[1]);
  const bool warp_all = __all_sync(kFullMask, key_ok[0] && key_ok[1]);
  // Causal: query i sees key j iff i >= j - shift, so rows before first_q see none of these
  // keys. A block whose keys are all padded or unseen only writes zeros.
  const int first_q = p.causal ? max(0, k0 - p.shift) : 0;
  const int q_tiles =
      block_any && first_q < p.Lq ? int(ceil_div(p.Lq, kBr)) - first_q / kBr : 0;
  const int iterations = p.group * q_tiles;  // (query head, query tile) pairs, head-major

  const auto head_of = [&](int it) { return first_head + it / q_tiles; };
  const auto first_row_of = [&](int it) { return (first_q / kBr + it % q_tiles) * kBr; };
  const auto load_queries = [&](int stage, int it) {
    const int64_t bh = int64_t(b) * p.H + head_of(it);
    const int qi0 = first_row_of(it);
    load_tile<kBr, kD>(sQ + stage * kQTile, static_cast<const T*>(p.q) + bh * p.Lq * p.D, qi0,
                       p.Lq, p.D);
    load_tile<kBr, kD>(sdO + stage * kQTile, static_cast<const T*>(p.dout) + bh * p.Lq * p.D,
                       qi0, p.Lq, p.D);
    if (threadIdx.x < kBr) {
      const bool valid = qi0 + int(threadIdx.x) < p.Lq;  // rows past Lq are masked out
      const int64_t at = bh * p.Lq + (valid ? qi0 + threadIdx.x : 0);
      cp_async_4(sLse + stage * kBr + threadIdx.x, p.lse + at, valid);
      cp_async_4(sDelta + stage * kBr + threadIdx.x, p.delta + at, valid);
    }
  };

  if (iterations > 0) {
    load_tile<kBlockRows, kD>(sK, static_cast<const T*>(p.k) + kv_offset, k0, p.Lk, p.D);
    load_tile<kBlockRows, kD>(sV, static_cast<const T*>(p.v) + kv_offset, k0, p.Lk, p.D);
    load_queries(0, 0);
  }
  cp_async_commit();

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const T* sKw = sK + warp * 16 * kStride;
  const T* sVw = sV + warp * 16 * kStride;
  float dk[kDv / 8][4] = {};
  float dv[kDv / 8][4] = {};
  for (int it = 0; it < iterations; ++it) {
    const int stage = it % 2;
    // The other stage was last read in the previous iteration, which ended with a barrier.
    if (it + 1 < iterations) load_queries(stage ^ 1, it + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int qi0 = first_row_of(it);
    const T* sQs = sQ + stage * kQTile;
    const T* sdOs = sdO + stage * kQTile;
    const float* lse = sLse + stage * kBr;
    const float* delta = sDelta + stage * kBr;
    // Nothing to do when this warp's keys are all padded, or all past the diagonal of the
    // tile's last query.
    const bool skip = !warp_any || (p.causal && warp_key - (qi0 + kBr - 1) > p.shift);
    if (!skip) {
      const bool need_mask =
          !warp_all || qi0 + kBr > p.Lq || (p.causal && warp_key + 15 - qi0 > p.shift);
      float pt[kBr / 8][4] = {};  // P^T: keys x queries
      gemm_abt<T, kBr / 8, kD / 16, kStride>(pt, sKw, sQs, lane);
#pragma unroll
      for (int n = 0; n < kBr / 8; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = n * 8 + 2 * (lane % 4) + r % 2;  // query qi0 + col
          const bool ok =
              !need_mask || (key_ok[r / 2] && qi0 + col < p.Lq &&
                             (!p.causal || key + (r / 2) * 8 - (qi0 + col) <= p.shift));
          pt[n][r] = ok ? exp2f(pt[n][r] * p.scale_log2 - lse[col] * kLog2e) : 0.f;
        }
      }
      const uint32_t keep =
          p.dropout ? dropout_keep_bits<kBr / 8, false>(p, seed, b * p.H + head_of(it), key,
                                                        qi0, lane)
                    : kFullMask;
      uint32_t a[kBr / 16][4];
      to_a_fragments<T>(a, pt, keep);
      gemm_ab<T, kDv / 8, kBr / 16, kStride>(dv, a, sdOs + col0, lane);

      float ds[kBr / 8][4] = {};  // dP^T = V dout^T, then dS^T
      gemm_abt<T, kBr / 8, kD / 16, kStride>(ds, sVw, sdOs, lane);
#pragma unroll
      for (int n = 0; n < kBr / 8; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = n * 8 + 2 * (lane % 4) + r % 2;
          const float dp = (keep >> (4 * n + r)) & 1u ? ds[n][r] * p.dropout_rescale : 0.f;
          ds[n][r] = pt[n][r] * (dp - delta[col]);
        }
      }
      to_a_fragments<T>(a, ds, kFullMask);
      gemm_ab<T, kDv / 8, kBr / 16, kStride>(dk, a, sQs + col0, lane);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  const float dk_mul[2] = {p.scale, p.scale};
  const float dv_mul[2] = {p.dropout_rescale, p.dropout_rescale};
  store_warp_tile<T, kDv / 8, kStride>(dk, dk_mul, sK + warp * 16 * kStride,
                                       static_cast<T*>(p.dk) + kv_offset, warp_key, p.Lk, col0,
                                       p.D, lane);
  store_warp_tile<T, kDv / 8, kStride>(dv, dv_mul, sV + warp * 16 * kStride,
                                       static_cast<T*>(p.dv) + kv_offset, warp_key, p.Lk, col0,
                                       p.D, lane);
}

// ---------------------------------------------------------------------------------------------
// Host side

// f(std::integral_constant<int, kD>{}) for the smallest instantiated head dim kD >= D, one of
// 32, 64, ..., 256 (D validated by the caller).
template <int kD = 32, typename F>
auto dispatch_head_dim(int64_t D, F&& f) {
  if constexpr (kD == 256) {
    return f(std::integral_constant<int, kD>{});
  } else {
    return D <= kD ? f(std::integral_constant<int, kD>{}) : dispatch_head_dim<kD + 32>(D, f);
  }
}

// f(static_cast<T*>(nullptr)) for the element type T of `dtype`; fp32 is not served here.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16:
      return f(static_cast<__half*>(nullptr));
    case DType::BFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    case DType::Float32:
      break;
  }
  return cudaErrorInvalidValue;
}

bool valid_config(const AttentionConfig& c, const int64_t* seed) {
  return c.batch >= 0 && c.heads >= 0 && c.kv_heads >= 1 && c.heads % c.kv_heads == 0 &&
         c.q_len >= 0 && c.q_len <= kAttentionMaxSeqLen && c.k_len >= 0 &&
         c.k_len <= kAttentionMaxSeqLen && c.head_dim >= 16 && c.head_dim <= 256 &&
         c.head_dim % 8 == 0 && c.batch * c.heads <= INT_MAX && c.dropout_p >= 0.0 &&
         c.dropout_p < 1.0 && (c.dropout_p == 0.0 || seed != nullptr);
}

Params make_params(const AttentionConfig& c, const int64_t* seed) {
  Params p{};
  p.H = static_cast<int>(c.heads);
  p.Hkv = static_cast<int>(c.kv_heads);
  p.group = p.H / p.Hkv;
  p.Lq = static_cast<int>(c.q_len);
  p.Lk = static_cast<int>(c.k_len);
  p.D = static_cast<int>(c.head_dim);
  p.mask = nullptr;
  p.seed = seed;
  p.causal = c.causal;
  p.shift = c.causal ? static_cast<int>(std::clamp<int64_t>(c.causal_shift, -c.q_len, c.k_len))
                     : 0;
  p.dropout = c.dropout_p > 0.0;
  p.dropout_threshold = dropout_threshold(c.dropout_p);
  p.dropout_rescale = static_cast<float>(1.0 / (1.0 - c.dropout_p));
  p.scale = static_cast<float>(c.scale);
  p.scale_log2 = static_cast<float>(c.scale * 1.4426950408889634);
  return p;
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const Params& p, cudaStream_t stream) {
  // More than 48 KB of dynamic shared memory is opt-in per kernel. Set at every launch, as
  // FlashAttention does: it is a cheap host call, and right for whichever device is current.
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// (B * H, query tiles): the grid of the forward and dq kernels.
dim3 query_grid(const AttentionConfig& c) {
  return dim3(static_cast<unsigned>(c.batch * c.heads),
              static_cast<unsigned>(ceil_div(c.q_len, kBlockRows)));
}

}  // namespace

size_t attention_smem_bytes(int64_t head_dim) {
  if (head_dim < 1 || head_dim > 256) return 0;
  return dispatch_head_dim(head_dim, [](auto d) {
    using Cfg = TileConfig<decltype(d)::value>;
    return std::max({Cfg::kFwdSmem, Cfg::kDqSmem, Cfg::kDkdvSmem});
  });
}

cudaError_t attention_fwd(const void* q, const void* k, const void* v,
                          const uint8_t* key_padding_mask, const int64_t* seed, void* out,
                          float* lse, const AttentionConfig& config, DType dtype,
                          cudaStream_t stream) {
  if (!valid_config(config, seed)) return cudaErrorInvalidValue;
  Params p = make_params(config, seed);
  p.q = q;
  p.k = k;
  p.v = v;
  p.mask = key_padding_mask;
  p.out = out;
  p.lse_out = lse;
  const dim3 grid = query_grid(config);
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return dispatch_head_dim(config.head_dim, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      return launch(attention_fwd_kernel<T, kD>, grid, TileConfig<kD>::kFwdSmem, p, stream);
    });
  });
}

cudaError_t attention_bwd(const void* dout, const void* q, const void* k, const void* v,
                          const void* out, const float* lse, const uint8_t* key_padding_mask,
                          const int64_t* seed, void* dq, void* dk, void* dv, float* delta,
                          const AttentionConfig& config, DType dtype, cudaStream_t stream) {
  if (!valid_config(config, seed)) return cudaErrorInvalidValue;
  Params p = make_params(config, seed);
  p.q = q;
  p.k = k;
  p.v = v;
  p.dout = dout;
  p.lse = lse;
  p.delta = delta;
  p.mask = key_padding_mask;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  const int64_t rows = config.batch * config.heads * config.q_len;
  const dim3 q_grid = query_grid(config);
  return dispatch_dtype(dtype, [&](auto type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return dispatch_head_dim(config.head_dim, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      using Cfg = TileConfig<kD>;
      if (rows > 0) {
        const unsigned blocks =
            static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kWarps), INT_MAX));
        attention_bwd_delta_kernel<T><<<blocks, kThreads, 0, stream>>>(
            static_cast<const T*>(dout), static_cast<const T*>(out), delta, rows, p.D);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        err = launch(attention_bwd_dq_kernel<T, kD>, q_grid, Cfg::kDqSmem, p, stream);
        if (err != cudaSuccess) return err;
      }
      const dim3 kv_grid(static_cast<unsigned>(config.batch * config.kv_heads),
                         static_cast<unsigned>(ceil_div(config.k_len, kBlockRows)),
                         Cfg::kDkdvSlices);
      if (kv_grid.x == 0 || kv_grid.y == 0) return cudaSuccess;
      return launch(attention_bwd_dkdv_kernel<T, kD>, kv_grid, Cfg::kDkdvSmem, p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace dlfast
