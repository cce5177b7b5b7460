// N-gram counting on the CPU (schema and semantics: ngram_counts_ in csrc/dlfast.cpp).
//
// Each thread takes one contiguous chunk of token positions: it checks every token of the chunk
// against [0, V) and counts the n-grams that start in it (reading up to n - 1 tokens past the
// chunk's end, never past the row's). Small tables (the course's 27 x 27) are counted into a
// private table per thread, merged once at the end, so the hot loop has no shared writes; a
// table too large to copy per thread (a 4096-token vocabulary's 16M bins) takes relaxed atomic
// increments instead. Counting is scalar work on integer indices, so there is one build of this
// file, not one per ISA.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace dlfast::cpu {
namespace {

// Bins, summed over the threads' private tables (32 MiB of int64), up to which each thread
// counts into its own table. Past it the shared table takes atomic increments: at V = 4096
// (16.8M bins) on 2 cores, zeroing and merging two private tables made the count 0.8x the
// bincount composite, atomics 1.3x (both cache-miss bound); private tables at V <= 256: 9-12x.
constexpr int64_t kPrivateTablesMaxBins = int64_t(1) << 22;
// Tokens per parallel task.
constexpr int64_t kGrainTokens = int64_t(1) << 16;

struct NgramProblem {
  int64_t rows, L, V;
  int n;
  bool has_ignore;
  int64_t ignore;
};

// Adds the N-grams starting at flat positions [begin, end) into `table` (atomically when
// `atomic`); tokens outside [0, V) and ignore_index end the n-grams that contain them.
// Returns the first position in [begin, end) of a token outside [0, V) that is not
// ignore_index, or INT64_MAX: each token is checked as it is read as an n-gram's first.
template <int N, typename T>
int64_t count_range(const NgramProblem& p, const T* tokens, int64_t begin, int64_t end,
                    int64_t* table, bool atomic) {
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
    int64_t index = 0;
    bool keep = true;
    for (int k = 0; k < N; ++k) {
      const int64_t t = static_cast<int64_t>(tokens[i + k]);
      keep = keep && t >= 0 && t < p.V && !(p.has_ignore && t == p.ignore);
      index = index * p.V + t;
    }
    if (!keep) continue;
    if (atomic) {
      __atomic_fetch_add(table + index, int64_t(1), __ATOMIC_RELAXED);
    } else {
      ++table[index];
    }
  }
  return first_bad;
}

template <typename T>
int64_t count_ngrams(const NgramProblem& p, const T* tokens, int64_t* counts) {
  const int64_t total = p.rows * p.L;
  int64_t table_bins = 1;
  for (int i = 0; i < p.n; ++i) table_bins *= p.V;
  const int threads = at::get_num_threads();
  const bool private_tables = table_bins * threads <= kPrivateTablesMaxBins;
  std::vector<std::vector<int64_t>> tables(private_tables ? threads : 0);
  std::vector<int64_t> first_bad(threads, std::numeric_limits<int64_t>::max());

  at::parallel_for(0, total, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    int64_t* table = counts;
    if (private_tables) {
      auto& own = tables[tid];
      if (own.empty()) own.assign(table_bins, 0);
      table = own.data();
    }
    int64_t bad;
    switch (p.n) {
      case 1: bad = count_range<1>(p, tokens, begin, end, table, !private_tables); break;
      case 2: bad = count_range<2>(p, tokens, begin, end, table, !private_tables); break;
      default: bad = count_range<3>(p, tokens, begin, end, table, !private_tables); break;
    }
    first_bad[tid] = std::min(first_bad[tid], bad);
  });

  if (private_tables) {
    at::parallel_for(0, table_bins, kGrainTokens, [&](int64_t begin, int64_t end) {
      for (const auto& own : tables) {
        if (own.empty()) continue;
        for (int64_t b = begin; b < end; ++b) counts[b] += own[b];
      }
    });
  }
  const int64_t bad = *std::min_element(first_bad.begin(), first_bad.end());
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
  for (int64_t i = 0; i < n; ++i) bins *= vocab_size;
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.size(0) == bins &&
                  counts.is_contiguous(),
              "dlfast::ngram_counts_: counts must be a contiguous int64 tensor of ", bins,
              " (vocab_size ** n) elements, got ", counts.scalar_type(), " ", counts.sizes());
  TORCH_CHECK(counts.device() == tokens.device(), "dlfast::ngram_counts_: counts is on ",
              counts.device(), " but tokens is on ", tokens.device());
  const NgramProblem p{tokens.size(0), tokens.size(1), vocab_size, static_cast<int>(n),
                       ignore_index.has_value(), ignore_index.value_or(0)};
  int64_t bad = -1;
  if (tokens.numel() > 0) {
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
