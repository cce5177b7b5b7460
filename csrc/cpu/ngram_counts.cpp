// N-gram counting on the CPU (schema and semantics: ngram_counts_ in csrc/dlfast.cpp). The op
// fills `counts`: each bin is written once, never read first.
//
// Tables that fit a core's cache several times over (the course's 27 x 27 up to 256 x 256) are
// counted into private tables per thread, each thread taking one contiguous chunk of token
// positions and the tables merged once at the end, so the hot loop has no shared writes. Each
// thread keeps kWays interleaved copies (n-gram i goes to copy i % kWays): the increments of
// consecutive n-grams that hit the same bin, frequent with 27 symbols, would otherwise wait on
// each other through memory. Larger tables (a 4096-token vocabulary's 16.8M bins) would make
// every increment a cache miss, so they are counted by partitions of 2^kPartitionShift
// consecutive bins (a radix pass): the n-grams are counted per partition, their bin indices
// scattered into their partitions, and each partition counted by one thread into a table of
// its own that stays in cache, then written out in order, past the caches when the whole
// table is far larger than they are.
//
// A block of tokens each in [0, V) or ignore_index takes the fast loop, which has the ISA's
// vector kernel compute the n-grams' bins a chunk at a time (marking those holding ignore_index)
// and increments them; a block with a token outside takes the general one, which checks each
// token (the first one outside [0, V) that is not ignore_index is reported) and skips the
// n-grams containing a bad or ignored token. The block check and the bins are built per ISA
// (ngram_counts_kernel.h); the increments are scalar. (Prefetching the next block while one is
// counted was tried: no clear gain at V = 27, 10-20% slower at V = 256, whose 256 KiB table it
// pushed out of L2.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace {

// Bins up to which each thread counts into private tables (32-bit counters: 256 KiB at V = 256,
// n = 2, within a core's 1 MiB L2); past it the partitioned count. Measured on the 2-core EPYC
// VM (benchmarks/results/cpu-epyc-2core-avx512/bigram_counts.json).
constexpr int64_t kPrivateTablesMaxBins = int64_t(1) << 16;
constexpr int kWays = 4;
// Bytes of a thread's private copies up to which it keeps kWays of them, within a core's 48 KiB
// L1d; past it one (a table that large has few same-bin neighbours to separate, and copies that
// spill to L2 cost more than they save: V = 65 counted 15% faster in one copy).
constexpr int64_t kWaysMaxBytes = int64_t(32) << 10;
// Tokens per block of the fast-path check, and per parallel task.
constexpr int64_t kGrainTokens = int64_t(1) << 16;
// The most bins a table may have: bins are computed in 32 bits, UINT32_MAX marking a skipped
// n-gram (kSkippedNgramBin).
constexpr int64_t kMaxBins = (int64_t(1) << 32) - 1;
// Bins per partition of the partitioned count: 256 KiB of 32-bit counters, within a core's L2,
// and a bin's place in its partition fits 16 bits.
constexpr int kPartitionShift = 16;
constexpr int64_t kPartitionBins = int64_t(1) << kPartitionShift;
// Bytes of a table (the L3's size) from which the partitioned count writes it past the caches.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;
// Tokens per batch of the partitioned count, which holds one index buffer of this length.
constexpr int64_t kBatchTokens = int64_t(1) << 24;

struct NgramProblem {
  int64_t rows, L, V;
  int n;
  bool has_ignore;
  int64_t ignore;
};

template <int N, typename T>
inline int64_t ngram_index(const T* t, int64_t V) {
  int64_t index = 0;
  for (int k = 0; k < N; ++k) index = index * V + static_cast<int64_t>(t[k]);
  return index;
}

// The ISA's vectorised check of tokens [begin, end): whether each is in [0, V) or is
// ignore_index (valid), and whether any is ignore_index (has_ignored).
struct BlockCheck {
  bool valid, has_ignored;
};

template <typename T>
BlockCheck check_block(const NgramProblem& p, const T* tokens, int64_t begin, int64_t end) {
  BlockCheck result{false, false};
  const TokensInVocabArgs args{tokens + begin, end - begin, p.V, p.has_ignore, p.ignore,
                               c10::CppTypeToScalarType<T>::value, &result.valid, &result.has_ignored};
  DLFAST_CPU_DISPATCH(tokens_in_vocab, args);
  return result;
}

// Where the n-grams go: sink(w, index) for each n-gram's bin index, w being the n-gram's way
// (its position in the unrolled loop, < kWays; 0 outside it).
template <typename C>
struct TableSink {  // increments a private table's kWays copies
  C* table;
  int64_t way_stride;
  void operator()(int w, int64_t index) const { ++table[w * way_stride + index]; }
};

struct PartitionHistSink {  // counts the indices per partition
  int64_t* hist;
  void operator()(int, int64_t index) const { ++hist[index >> kPartitionShift]; }
};

// Writes from[0, size) widened to int64 at `to`. Past the caches (non-temporal stores) when
// `stream` and `to` is 16-byte aligned: a table far larger than the caches is written once, and
// ordinary stores would first read every line of it from memory.
inline void store_widened(int64_t* to, const uint32_t* from, int64_t size, bool stream) {
  int64_t b = 0;
#if defined(__SSE2__)
  if (stream && reinterpret_cast<uintptr_t>(to) % 16 == 0) {
    const __m128i zero = _mm_setzero_si128();
    for (; b + 4 <= size; b += 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + b));
      _mm_stream_si128(reinterpret_cast<__m128i*>(to + b), _mm_unpacklo_epi32(v, zero));
      _mm_stream_si128(reinterpret_cast<__m128i*>(to + b + 2), _mm_unpackhi_epi32(v, zero));
    }
    _mm_sfence();
  }
#endif
  for (; b < size; ++b) to[b] = from[b];
}

struct ScatterSink {  // writes each index's place in its partition to the partition's next slot
  uint16_t* grouped;
  int64_t* next;  // per partition: its next slot in `grouped`
  void operator()(int, int64_t index) const {
    grouped[next[index >> kPartitionShift]++] = static_cast<uint16_t>(index);
  }
};

// Passes the N-grams starting at flat positions [begin, end) to `sink`, all of whose tokens are
// known to be in [0, V) or ignore_index (the n-grams holding it skipped where skip_ignored):
// kChunk n-grams at a time, their bins computed by the ISA's vector kernel into a buffer that
// stays in L1, then handed to the sink one by one.
template <int N, typename T, typename Sink>
void count_valid(const NgramProblem& p, const T* tokens, int64_t begin, int64_t end,
                 bool skip_ignored, Sink& sink) {
  constexpr int64_t kChunk = 512;
  uint32_t bins[kChunk];
  for (int64_t i = begin; i < end;) {
    const int64_t row_end = (i / p.L + 1) * p.L;
    const int64_t stop = std::min(end, row_end - N + 1);  // n-grams must not cross the row's end
    for (int64_t s = i; s < stop; s += kChunk) {
      const int64_t count = std::min(kChunk, stop - s);
      const NgramBinsArgs args{tokens + s, count, static_cast<uint32_t>(p.V), N, skip_ignored,
                               p.ignore, c10::CppTypeToScalarType<T>::value, bins};
      DLFAST_CPU_DISPATCH(ngram_bins, args);
      int64_t k = 0;
      if (skip_ignored) {
        for (; k < count; ++k) {
          if (bins[k] != kSkippedNgramBin) sink(static_cast<int>(k % kWays), bins[k]);
        }
      }
      for (; k + kWays <= count; k += kWays) {
        for (int w = 0; w < kWays; ++w) sink(w, bins[k + w]);
      }
      for (; k < count; ++k) sink(0, bins[k]);
    }
    i = std::min(end, row_end);
  }
}

// The general loop over [begin, end): tokens outside [0, V) and ignore_index end the n-grams
// that contain them. Returns the first position in [begin, end) of a token outside [0, V) that
// is not ignore_index, or INT64_MAX: each token is checked as it is read as an n-gram's first.
template <int N, typename T, typename Sink>
int64_t count_checked(const NgramProblem& p, const T* tokens, int64_t begin, int64_t end, Sink& sink) {
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  int64_t col = begin % p.L;
  for (int64_t i = begin; i < end; ++i, ++col) {
    if (col == p.L) col = 0;
    const int64_t first = static_cast<int64_t>(tokens[i]);
    if ((first < 0 || first >= p.V) && !(p.has_ignore && first == p.ignore) &&
        first_bad == std::numeric_limits<int64_t>::max()) {
      first_bad = i;
    }
    if (col + N > p.L) continue;  // too close to the row's end: the n-gram would cross it
    bool keep = true;
    for (int k = 0; k < N; ++k) {
      const int64_t t = static_cast<int64_t>(tokens[i + k]);
      keep = keep && t >= 0 && t < p.V && !(p.has_ignore && t == p.ignore);
    }
    if (keep) sink(0, ngram_index<N>(tokens + i, p.V));
  }
  return first_bad;
}

// Passes the n-grams starting in [begin, end) to `sink` block by block, each block by the fast
// loop when its tokens (and the N - 1 after it that its n-grams read) are all in [0, V) or
// ignore_index. Returns the first bad position as count_checked does.
template <int N, typename T, typename Sink>
int64_t count_range(const NgramProblem& p, const T* tokens, int64_t begin, int64_t end, Sink& sink) {
  const int64_t total = p.rows * p.L;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  for (int64_t b = begin; b < end; b += kGrainTokens) {
    const int64_t e = std::min(end, b + kGrainTokens);
    const BlockCheck check = check_block(p, tokens, b, std::min(total, e + N - 1));
    if (check.valid) {
      count_valid<N>(p, tokens, b, e, check.has_ignored, sink);
    } else {
      first_bad = std::min(first_bad, count_checked<N>(p, tokens, b, e, sink));
    }
  }
  return first_bad;
}

template <typename T, typename Sink>
int64_t count_range_n(const NgramProblem& p, const T* tokens, int64_t begin, int64_t end, Sink& sink) {
  switch (p.n) {
    case 1: return count_range<1>(p, tokens, begin, end, sink);
    case 2: return count_range<2>(p, tokens, begin, end, sink);
    default: return count_range<3>(p, tokens, begin, end, sink);
  }
}

// Private tables: each thread counts its chunk into kWays copies of C counters (one past
// kWaysMaxBytes), then the copies of every thread are added into `counts` bin by bin. C (uint32_t where no chunk can reach 2^32
// n-grams) halves the tables' cache footprint.
template <typename C, typename T>
int64_t count_private(const NgramProblem& p, const T* tokens, int64_t bins, int64_t* counts) {
  const int64_t total = p.rows * p.L;
  const int threads = at::get_num_threads();
  const int ways = kWays * bins * int64_t(sizeof(C)) <= kWaysMaxBytes ? kWays : 1;
  std::vector<std::vector<C>> tables(threads);
  std::vector<int64_t> first_bad(threads, std::numeric_limits<int64_t>::max());
  at::parallel_for(0, total, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    auto& own = tables[tid];
    if (own.empty()) own.assign(ways * bins, 0);
    TableSink<C> sink{own.data(), ways > 1 ? bins : 0};  // stride 0: the ways share one copy
    first_bad[tid] = std::min(first_bad[tid], count_range_n(p, tokens, begin, end, sink));
  });
  at::parallel_for(0, bins, kGrainTokens, [&](int64_t begin, int64_t end) {
    bool written = false;  // the first copy is stored, the others added
    for (const auto& own : tables) {
      if (own.empty()) continue;
      for (int w = 0; w < ways; ++w, written = true) {
        const C* way = own.data() + w * bins;
        if (written) {
          for (int64_t b = begin; b < end; ++b) counts[b] += static_cast<int64_t>(way[b]);
        } else {
          for (int64_t b = begin; b < end; ++b) counts[b] = static_cast<int64_t>(way[b]);
        }
      }
    }
    if (!written) std::fill(counts + begin, counts + end, 0);
  });
  return *std::min_element(first_bad.begin(), first_bad.end());
}

// The partitioned count, a batch of kBatchTokens positions at a time, each of `tasks` chunks of
// the batch on one thread: (1) each chunk counts its n-grams per partition; (2) prefix sums give
// every (partition, chunk) pair its stretch of `grouped`, and each chunk writes there where in
// the partition each of its n-grams falls (16 bits), computing the n-grams again rather than
// storing them between the passes;
// (3) each partition is counted by one thread into a table of its own, which stays in cache,
// then written to its slice of `counts` in order (added to it after the first batch).
template <typename T>
int64_t count_partitioned(const NgramProblem& p, const T* tokens, int64_t bins, int64_t* counts) {
  const int64_t total = p.rows * p.L;
  const int64_t parts = ((bins - 1) >> kPartitionShift) + 1;
  const int64_t tasks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t batch = std::min(total, kBatchTokens);
  const std::unique_ptr<uint16_t[]> grouped(new uint16_t[batch]);  // uninitialised: all written
  std::vector<int64_t> hist(tasks * parts), place(tasks * parts), start(parts + 1);
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  for (int64_t b0 = 0; b0 < total; b0 += batch) {
    const int64_t b1 = std::min(total, b0 + batch);
    // Task t's positions: [b0 + offset(t), b0 + offset(t + 1)).
    const auto offset = [&](int64_t t) { return b0 + t * (b1 - b0) / tasks; };
    std::vector<int64_t> bad(tasks, std::numeric_limits<int64_t>::max());
    at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        PartitionHistSink sink{hist.data() + t * parts};
        std::fill_n(sink.hist, parts, 0);
        bad[t] = count_range_n(p, tokens, offset(t), offset(t + 1), sink);
      }
    });
    first_bad = std::min(first_bad, *std::min_element(bad.begin(), bad.end()));
    int64_t filled = 0;
    for (int64_t q = 0; q < parts; ++q) {
      start[q] = filled;
      for (int64_t t = 0; t < tasks; ++t) {
        place[t * parts + q] = filled;
        filled += hist[t * parts + q];
      }
    }
    start[parts] = filled;
    at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        ScatterSink sink{grouped.get(), place.data() + t * parts};
        count_range_n(p, tokens, offset(t), offset(t + 1), sink);
      }
    });
    at::parallel_for(0, parts, 1, [&](int64_t q_begin, int64_t q_end) {
      std::vector<uint32_t> local(std::min(bins, kPartitionBins));  // batch < 2^32 n-grams
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t base = q << kPartitionShift;
        const int64_t size = std::min(kPartitionBins, bins - base);
        std::fill_n(local.data(), size, 0);
        for (int64_t k = start[q]; k < start[q + 1]; ++k) ++local[grouped[k]];
        int64_t* slice = counts + base;
        if (b0 == 0) {
          store_widened(slice, local.data(), size, bins * int64_t(sizeof(int64_t)) >= kStreamMinBytes);
        } else {
          for (int64_t b = 0; b < size; ++b) slice[b] += local[b];
        }
      }
    });
  }
  return first_bad;
}

template <typename T>
int64_t count_ngrams(const NgramProblem& p, const T* tokens, int64_t* counts) {
  int64_t bins = 1;
  for (int i = 0; i < p.n; ++i) bins *= p.V;
  int64_t bad;
  if (bins > kPrivateTablesMaxBins) {
    bad = count_partitioned(p, tokens, bins, counts);
  } else if (p.rows * p.L < (int64_t(1) << 32)) {
    bad = count_private<uint32_t>(p, tokens, bins, counts);
  } else {
    bad = count_private<int64_t>(p, tokens, bins, counts);
  }
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

at::Tensor ngram_counts_(at::Tensor& counts, const at::Tensor& tokens, int64_t vocab_size,
                         int64_t n, std::optional<int64_t> ignore_index) {
  TORCH_CHECK(tokens.dim() == 2, "dlfast::ngram_counts_: tokens must be 2-D (rows, L), got ",
              tokens.sizes());
  TORCH_CHECK(tokens.is_contiguous(), "dlfast::ngram_counts_: tokens must be contiguous");
  const auto dtype = tokens.scalar_type();
  TORCH_CHECK(dtype == at::kByte || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong,
              "dlfast::ngram_counts_: tokens must be uint8, int16, int32 or int64, got ", dtype);
  TORCH_CHECK(n >= 1 && n <= 3, "dlfast::ngram_counts_: n must be 1, 2 or 3, got ", n);
  TORCH_CHECK(vocab_size >= 1, "dlfast::ngram_counts_: vocab_size must be >= 1, got ", vocab_size);
  int64_t bins = 1;
  for (int64_t i = 0; i < n; ++i) {
    // Bins are computed in 32 bits (ngram_bins): up to 2^32 - 1 of them, 32 GiB of int64, past
    // the 2^28 that dlfast.ngram_counts builds densely.
    TORCH_CHECK(bins <= kMaxBins / vocab_size, "dlfast::ngram_counts_: vocab_size ** n (", vocab_size,
                " ** ", n, ") is more than the 2^32 - 1 bins the CPU kernel counts into");
    bins *= vocab_size;
  }
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.size(0) == bins &&
                  counts.is_contiguous(),
              "dlfast::ngram_counts_: counts must be a contiguous int64 tensor of ", bins,
              " (vocab_size ** n) elements, got ", counts.scalar_type(), " ", counts.sizes());
  TORCH_CHECK(counts.device() == tokens.device(), "dlfast::ngram_counts_: counts is on ",
              counts.device(), " but tokens is on ", tokens.device());
  const NgramProblem p{tokens.size(0), tokens.size(1), vocab_size, static_cast<int>(n),
                       ignore_index.has_value(), ignore_index.value_or(0)};
  int64_t bad = -1;
  if (tokens.numel() == 0) {
    counts.zero_();
  } else {
    auto* out = counts.data_ptr<int64_t>();
    switch (dtype) {
      case at::kByte: bad = count_ngrams(p, tokens.data_ptr<uint8_t>(), out); break;
      case at::kShort: bad = count_ngrams(p, tokens.data_ptr<int16_t>(), out); break;
      case at::kInt: bad = count_ngrams(p, tokens.data_ptr<int32_t>(), out); break;
      default: bad = count_ngrams(p, tokens.data_ptr<int64_t>(), out); break;
    }
  }
  return at::scalar_tensor(bad, tokens.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(dlfast, CPU, m) { m.impl("ngram_counts_", &ngram_counts_); }

}  // namespace dlfast::cpu
