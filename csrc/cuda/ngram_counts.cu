// N-gram counting (ngram_counts_ in csrc/dlfast.cpp defines the semantics): for every n adjacent
// tokens (t0, ..., tn-1) of a row, counts[((t0 V + t1) V + ...) + tn-1] += 1.
//
// Work split. The flat (rows * L) token array is read as 16-byte vectors (16 / sizeof(T) tokens)
// from its first 16-byte boundary on, whatever the alignment of the data pointer. Each token is
// the first token of one candidate n-gram; the n - 1 tokens past a vector (its halo) come from
// scalar loads that hit L1, since the next lane loads the same bytes as its vector. The tokens
// before the first boundary and after the last whole vector (fewer than 32) are taken one per
// thread. A grid-stride loop gives each warp kUnroll x 32 consecutive vectors per step. Every
// token is checked against [0, V) exactly once, as a first token, so the smallest bad position
// is one atomicMin per thread that saw one, onto a result that starts as all-ones: the largest
// unsigned value is also -1 as int64, so "no bad token" needs no epilogue.
//
// Row boundaries cost no division per token: each thread tracks the column of its vectors'
// first tokens, advancing it by (grid stride mod L) per step; a vector that ends close to a
// row's end walks its columns one by one.
//
// Small tables (V^n 32-bit bins within the device's opt-in shared memory, V <= 241 for bigrams
// and V <= 38 for trigrams on an H100): each block counts into private shared-memory tables with
// shared atomics, and adds them into the int64 table once at the end (skipping empty bins).
// Tables much smaller than the budget are replicated, one copy per group of warps, so that a
// frequent bin (a space before a common letter) is not one shared address every warp fights for.
// Large tables: global atomics straight into the int64 table, aggregated within a warp: the
// lanes holding the same bin (found with __match_any_sync) send one atomic with their number,
// which keeps a frequent bin from serialising at one L2 address.
//
// Only cuda_runtime here: the file compile-checks with plain nvcc.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "launchers.h"

namespace dlfast {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Vectors per lane in flight per loop step: a large-table block runs alone on its SM, and one
// 16-byte load per thread would leave too few bytes in flight to cover memory latency. Not for
// uint8: two vectors of 16 tokens took those kernels to 64-96 registers (one 512-thread block
// per SM, a spill on sm_90a), one keeps them at 40-60, two blocks per SM.
template <typename T>
constexpr int kUnroll = sizeof(T) == 1 ? 1 : 2;
constexpr unsigned kFullMask = 0xffffffffu;
// Shared memory that extra copies of a small table may take per block: enough for one copy per
// warp of a unigram or a 27 x 27 bigram table while several blocks still fit on an SM.
constexpr int64_t kCopyBudgetBytes = 48 * 1024;
// A block counts at most this many tokens, so no 32-bit shared bin can wrap around.
constexpr int64_t kMaxTokensPerBlock = int64_t(1) << 31;
// Fewer tokens per block than this (or than 4 x its table) and the final merge of the shared
// tables would cost more than the counting: small inputs get fewer blocks instead.
constexpr int64_t kMinTokensPerBlock = int64_t(kThreads) * 64;
constexpr unsigned long long kNoBadPosition = ~0ull;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16 bytes of tokens, loaded with one 128-bit instruction.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kLen = 16 / static_cast<int>(sizeof(T));
  T v[kLen];
};

// Tokens widened for the range and ignore_index tests: int32 holds every uint8, int16 and int32
// value, and 32-bit compares are half the work of 64-bit ones.
template <typename T>
using Wide = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;

template <typename T>
struct Params {
  const T* tokens;                    // (rows * L,) flat, row-major
  unsigned long long* counts;         // (V^n,) int64 table, added to
  unsigned long long* bad_position;   // 0-dim int64, all bits set on entry
  int64_t total;                      // rows * L
  int64_t L;                          // tokens per row
  int64_t head;                       // tokens before the first 16-byte boundary
  int64_t nvec;                       // whole 16-byte vectors from there on
  int64_t start_limit;                // L - n: the last column an n-gram may start at
  uint64_t vocab;                     // V
  // A token t is in [0, V) iff the unsigned reading of Wide(t) is below this: min(V, 2^31) for
  // 32-bit Wide (negative values read as >= 2^31), V for 64-bit.
  uint64_t valid_limit;
  Wide<T> ignore;                     // meaningful only when has_ignore
  bool has_ignore;
  int bins;                           // V^n, shared-memory kernel only
  int copies;                         // table copies per block, shared-memory kernel only
};

struct TokenClass {
  bool ok;   // in [0, V) and not ignore_index: usable as an index
  bool bad;  // outside [0, V) and not ignore_index: reported
};

template <typename T>
__device__ __forceinline__ TokenClass classify(const Params<T>& p, T x) {
  using U = std::make_unsigned_t<Wide<T>>;
  const Wide<T> w = static_cast<Wide<T>>(x);
  const bool in_range = static_cast<U>(w) < static_cast<U>(p.valid_limit);
  const bool ignored = p.has_ignore && w == p.ignore;
  return {in_range && !ignored, !in_range && !ignored};
}

// Bin of the n-gram whose token values are vals[0..N-1]; I is wide enough for V^n - 1.
template <int N, typename I>
__device__ __forceinline__ I gram_bin(const I* vals, I vocab) {
  I bin = vals[0];
#pragma unroll
  for (int k = 1; k < N; ++k) bin = bin * vocab + vals[k];
  return bin;
}

// The n-grams that start at the kLen tokens of one vector. The tokens stay packed (4 registers
// for 16 uint8 tokens) and each bin is computed where it is used: materialising kLen bins per
// vector for two vectors took the uint8 kernels to 110+ registers.
template <typename T, int N, typename I>
struct VectorGrams {
  static constexpr int kLen = Vec16<T>::kLen;
  Vec16<T> vec;
  T halo[N > 1 ? N - 1 : 1];  // the N - 1 tokens after the vector
  unsigned counted;           // bit e: the n-gram starting at token e is counted
  unsigned bad;               // bit e: token e is outside [0, V) and not ignore_index

  __device__ __forceinline__ I value(int i) const {
    return static_cast<I>(static_cast<Wide<T>>(i < kLen ? vec.v[i] : halo[i - kLen]));
  }
  // Call with a compile-time e (an unrolled loop) so that value() resolves to registers.
  __device__ __forceinline__ I bin(int e, I vocab) const {
    I b = value(e);
#pragma unroll
    for (int k = 1; k < N; ++k) b = b * vocab + value(e + k);
    return b;
  }
};

// Classifies the n-grams starting in g.vec (g.vec and g.halo set by the caller), whose first
// token sits at column col0 of its row; halo token k is meaningful only when bit k of halo_ok
// is set (past the end of the array it is not loaded).
template <typename T, int N, typename I>
__device__ __forceinline__ void classify_vector(const Params<T>& p, VectorGrams<T, N, I>& g,
                                                unsigned halo_ok, int64_t col0) {
  constexpr int kLen = Vec16<T>::kLen;
  constexpr unsigned kLenMask = (1u << kLen) - 1;
  unsigned tok_ok = 0;
  g.bad = 0;
#pragma unroll
  for (int e = 0; e < kLen; ++e) {
    const TokenClass c = classify(p, g.vec.v[e]);
    tok_ok |= unsigned(c.ok) << e;
    g.bad |= unsigned(c.bad) << e;
  }
#pragma unroll
  for (int k = 0; k < N - 1; ++k) {
    tok_ok |= unsigned(classify(p, g.halo[k]).ok && ((halo_ok >> k) & 1)) << (kLen + k);
  }

  unsigned starts;
  if (col0 + kLen - 1 <= p.start_limit) {
    starts = kLenMask;  // the whole vector and its halo lie inside one row
  } else {
    starts = 0;
    int64_t col = col0;
#pragma unroll
    for (int e = 0; e < kLen; ++e) {
      starts |= unsigned(col <= p.start_limit) << e;
      if (++col == p.L) col = 0;
    }
  }
  unsigned counted = starts;
#pragma unroll
  for (int k = 0; k < N; ++k) counted &= tok_ok >> k;
  g.counted = counted;
}

// The n-gram starting at flat position q, for the few tokens outside the whole vectors.
// Returns whether it is counted; sets bin when it is and bad when token q is bad.
template <typename T, int N, typename I>
__device__ __forceinline__ bool scalar_gram(const Params<T>& p, int64_t q, I& bin, bool& bad) {
  const TokenClass first = classify(p, p.tokens[q]);
  bad = first.bad;
  // A start column within the limit keeps all N tokens inside q's row, hence inside the array.
  bool ok = first.ok && q % p.L <= p.start_limit;
  I vals[N] = {};
  vals[0] = static_cast<I>(static_cast<Wide<T>>(p.tokens[q]));
#pragma unroll
  for (int k = 1; k < N; ++k) {
    if (ok) {
      const T x = p.tokens[q + k];
      ok = classify(p, x).ok;
      vals[k] = static_cast<I>(static_cast<Wide<T>>(x));
    }
  }
  if (ok) bin = gram_bin<N>(vals, static_cast<I>(p.vocab));
  return ok;
}

// The loop both kernels share. add_one(bin) counts one n-gram from the edge tokens (any thread,
// divergent); add_vector(grams) counts a vector's n-grams and is called by all 32 lanes of a warp
// together (lanes past the last vector bring an empty mask), so it may use warp collectives.
template <typename T, int N, typename I, typename AddOne, typename AddVector>
__device__ __forceinline__ void count_ngrams(const Params<T>& p, AddOne&& add_one,
                                             AddVector&& add_vector) {
  constexpr int kLen = Vec16<T>::kLen;
  constexpr int kSteps = kUnroll<T>;
  const int lane = threadIdx.x % 32;
  const int64_t thread = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  unsigned long long first_bad = kNoBadPosition;

  // Edge tokens: before the first 16-byte boundary, then after the last whole vector.
  const int64_t tail_start = p.head + p.nvec * kLen;
  if (thread < p.head + (p.total - tail_start)) {
    const int64_t q = thread < p.head ? thread : tail_start + (thread - p.head);
    I bin = 0;
    bool bad = false;
    if (scalar_gram<T, N, I>(p, q, bin, bad)) add_one(bin);
    if (bad) first_bad = static_cast<unsigned long long>(q);
  }

  // Warp w takes vectors [base, base + 32 kSteps) with base = w * 32 kSteps, then strides
  // over all warps of the grid; lane l of step u holds vector base + 32 u + l.
  const int64_t warp = thread / 32;
  const int64_t step = int64_t(gridDim.x) * kThreads * kSteps;  // vectors per grid step
  const int64_t col_step = (step * kLen) % p.L;
  const Vec16<T>* vecs = reinterpret_cast<const Vec16<T>*>(p.tokens + p.head);
  int64_t col0[kSteps];
#pragma unroll
  for (int u = 0; u < kSteps; ++u) {
    col0[u] = (p.head + (warp * 32 * kSteps + 32 * u + lane) * kLen) % p.L;
  }
  for (int64_t base = warp * 32 * kSteps; base < p.nvec; base += step) {
    VectorGrams<T, N, I> g[kSteps] = {};
    unsigned halo_ok[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int64_t v = base + 32 * u + lane;
      halo_ok[u] = 0;
      if (v < p.nvec) {
        g[u].vec = vecs[v];
        const int64_t next = p.head + (v + 1) * kLen;
#pragma unroll
        for (int k = 0; k < N - 1; ++k) {
          if (next + k < p.total) {
            g[u].halo[k] = p.tokens[next + k];
            halo_ok[u] |= 1u << k;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int64_t v = base + 32 * u + lane;
      classify_vector(p, g[u], halo_ok[u], col0[u]);
      if (v >= p.nvec) g[u].counted = g[u].bad = 0;
      add_vector(g[u]);
      if (g[u].bad != 0) {
        const auto q = static_cast<unsigned long long>(p.head + v * kLen + __ffs(g[u].bad) - 1);
        first_bad = q < first_bad ? q : first_bad;
      }
      col0[u] += col_step;
      if (col0[u] >= p.L) col0[u] -= p.L;
    }
  }
  if (first_bad != kNoBadPosition) atomicMin(p.bad_position, first_bad);
}

// Small tables: private shared-memory tables, merged into counts at the end. Dynamic shared
// memory: copies x bins 32-bit counters; warp w counts into copy w % copies.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) ngram_counts_smem_kernel(const Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned* tables = reinterpret_cast<unsigned*>(smem);
  const int words = p.bins * p.copies;
  for (int i = threadIdx.x; i < words; i += kThreads) tables[i] = 0;
  __syncthreads();

  unsigned* table = tables + (threadIdx.x / 32) % p.copies * p.bins;
  const auto vocab = static_cast<uint32_t>(p.vocab);
  count_ngrams<T, N, uint32_t>(
      p, [&](uint32_t bin) { atomicAdd(table + bin, 1u); },
      [&](const VectorGrams<T, N, uint32_t>& g) {
#pragma unroll
        for (int e = 0; e < Vec16<T>::kLen; ++e) {
          if ((g.counted >> e) & 1) atomicAdd(table + g.bin(e, vocab), 1u);
        }
      });
  __syncthreads();

  for (int b = threadIdx.x; b < p.bins; b += kThreads) {
    unsigned long long sum = 0;
    for (int c = 0; c < p.copies; ++c) sum += tables[c * p.bins + b];
    if (sum != 0) atomicAdd(p.counts + b, sum);
  }
}

// Large tables: warp-aggregated atomics on the int64 table. I: uint32_t when every bin and the
// "not counted" key ~0u fit in 32 bits (any table that fits in memory today), else uint64_t.
template <typename T, int N, typename I>
__global__ void __launch_bounds__(kThreads) ngram_counts_global_kernel(const Params<T> p) {
  const int lane = threadIdx.x % 32;
  const auto vocab = static_cast<I>(p.vocab);
  count_ngrams<T, N, I>(
      p, [&](I bin) { atomicAdd(p.counts + bin, 1ull); },
      [&](const VectorGrams<T, N, I>& g) {
#pragma unroll
        for (int e = 0; e < Vec16<T>::kLen; ++e) {
          const bool counted = (g.counted >> e) & 1;
          const I bin = g.bin(e, vocab);
          const unsigned peers = __match_any_sync(kFullMask, counted ? bin : ~I(0));
          if (counted && lane == __ffs(peers) - 1) {
            atomicAdd(p.counts + bin, static_cast<unsigned long long>(__popc(peers)));
          }
        }
      });
}

// ---------------------------------------------------------------------------------------------
// Host side

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // largest dynamic shared memory per block after opting in
};

// Cached per device: these queries cost more than a small launch.
DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(device);
    if (it != cache.end()) return it->second;
  }
  DeviceInfo info;
  if (cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                             device) != cudaSuccess) {
    (void)cudaGetLastError();
    return {};  // not cached: the launch that follows reports the real error
  }
  std::lock_guard<std::mutex> lock(mutex);
  cache[device] = info;
  return info;
}

// Resident blocks per SM of `kernel` with `smem` bytes of dynamic shared memory; 0 when it
// cannot run. Past 48 KiB the kernel opts in to the device's whole limit, not to `smem`: the
// attribute is per kernel, and a call with a smaller table must not shrink it below what an
// earlier, cached, larger one needs. Cached per (kernel, device, smem).
int resident_blocks(const void* kernel, int device, size_t smem, int smem_optin) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(kernel, device, smem);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  const bool ok = smem <= static_cast<size_t>(smem_optin) &&
                  (smem <= 48 * 1024 ||
                   cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem_optin) == cudaSuccess) &&
                  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem) ==
                      cudaSuccess;
  if (!ok) {
    (void)cudaGetLastError();  // a failed query must not surface as the next launch's error
    n = 0;
  }
  std::lock_guard<std::mutex> lock(mutex);
  cache[key] = n;
  return n;
}

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, INT_MAX)));
}

template <typename T, int N>
cudaError_t launch(Params<T> p, int64_t bins, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const DeviceInfo info = device_info(device);
  if (info.sms == 0) return cudaErrorInvalidDevice;

  const int64_t table_bytes = bins * int64_t(sizeof(unsigned));
  if (table_bytes <= info.smem_optin) {
    p.bins = static_cast<int>(bins);
    p.copies = static_cast<int>(std::clamp<int64_t>(kCopyBudgetBytes / table_bytes, 1, kWarps));
    const size_t smem = static_cast<size_t>(table_bytes) * p.copies;
    const void* kernel = reinterpret_cast<const void*>(&ngram_counts_smem_kernel<T, N>);
    const int per_sm = resident_blocks(kernel, device, smem, info.smem_optin);
    if (per_sm > 0) {
      const int64_t min_tokens = std::max<int64_t>(kMinTokensPerBlock, 4 * bins * p.copies);
      int64_t blocks = std::min<int64_t>(int64_t(per_sm) * info.sms, ceil_div(p.total, min_tokens));
      blocks = std::max(blocks, ceil_div(p.total, kMaxTokensPerBlock));
      ngram_counts_smem_kernel<T, N><<<grid_size(blocks), kThreads, smem, stream>>>(p);
      return cudaGetLastError();
    }
  }

  // 32-bit bins and match keys whenever ~0u cannot be a bin.
  const bool narrow = bins <= int64_t(UINT32_MAX);
  const void* kernel =
      narrow ? reinterpret_cast<const void*>(&ngram_counts_global_kernel<T, N, uint32_t>)
             : reinterpret_cast<const void*>(&ngram_counts_global_kernel<T, N, uint64_t>);
  const int per_sm = std::max(1, resident_blocks(kernel, device, 0, info.smem_optin));
  const int64_t blocks = std::min<int64_t>(int64_t(per_sm) * info.sms,
                                           ceil_div(p.nvec, int64_t(kThreads) * kUnroll<T>));
  if (narrow) {
    ngram_counts_global_kernel<T, N, uint32_t><<<grid_size(blocks), kThreads, 0, stream>>>(p);
  } else {
    ngram_counts_global_kernel<T, N, uint64_t><<<grid_size(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* tokens, int64_t rows, int64_t L, int64_t V, int n,
                         bool has_ignore, int64_t ignore_index, int64_t bins, int64_t* counts,
                         int64_t* bad_position, cudaStream_t stream) {
  constexpr int kLen = Vec16<T>::kLen;
  const auto address = reinterpret_cast<uintptr_t>(tokens);
  if (address % sizeof(T) != 0) return cudaErrorInvalidValue;
  Params<T> p{};
  p.tokens = static_cast<const T*>(tokens);
  p.counts = reinterpret_cast<unsigned long long*>(counts);
  p.bad_position = reinterpret_cast<unsigned long long*>(bad_position);
  p.total = rows * L;
  p.L = L;
  p.head = std::min<int64_t>(p.total, ((16 - address % 16) % 16) / sizeof(T));
  p.nvec = (p.total - p.head) / kLen;
  p.start_limit = L - n;
  p.vocab = static_cast<uint64_t>(V);
  p.valid_limit = sizeof(T) == 8 ? static_cast<uint64_t>(V)
                                 : std::min<uint64_t>(static_cast<uint64_t>(V), uint64_t(1) << 31);
  // An ignore_index that no T can hold never matches a token.
  using Limits = std::numeric_limits<T>;
  p.has_ignore = has_ignore && ignore_index >= static_cast<int64_t>(Limits::min()) &&
                 (sizeof(T) == 8 || ignore_index <= static_cast<int64_t>(Limits::max()));
  p.ignore = p.has_ignore ? static_cast<Wide<T>>(ignore_index) : Wide<T>(0);
  switch (n) {
    case 1:
      return launch<T, 1>(p, bins, stream);
    case 2:
      return launch<T, 2>(p, bins, stream);
    default:
      return launch<T, 3>(p, bins, stream);
  }
}

}  // namespace

cudaError_t ngram_counts(const void* tokens, TokenDType dtype, int64_t rows, int64_t L,
                         int64_t vocab_size, int n, bool has_ignore, int64_t ignore_index,
                         int64_t* counts, int64_t* bad_position, cudaStream_t stream) {
  if (rows < 0 || L < 0 || vocab_size < 1 || n < 1 || n > 3) return cudaErrorInvalidValue;
  if (L > 0 && rows > INT64_MAX / L) return cudaErrorInvalidValue;
  int64_t bins = 1;
  for (int k = 0; k < n; ++k) {
    if (bins > INT64_MAX / vocab_size) return cudaErrorInvalidValue;
    bins *= vocab_size;
  }
  // All bits set: -1 as int64 (no bad token) and above every position for the kernels' atomicMin.
  cudaError_t err = cudaMemsetAsync(bad_position, 0xff, sizeof(int64_t), stream);
  if (err != cudaSuccess || rows == 0 || L == 0) return err;
  // The token type as T, for one instantiation of launch_typed per dtype.
  const auto launch_as = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return launch_typed<T>(tokens, rows, L, vocab_size, n, has_ignore, ignore_index, bins, counts,
                           bad_position, stream);
  };
  switch (dtype) {
    case TokenDType::UInt8:
      return launch_as(static_cast<uint8_t*>(nullptr));
    case TokenDType::Int16:
      return launch_as(static_cast<int16_t*>(nullptr));
    case TokenDType::Int32:
      return launch_as(static_cast<int32_t*>(nullptr));
    case TokenDType::Int64:
      return launch_as(static_cast<int64_t*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dlfast
