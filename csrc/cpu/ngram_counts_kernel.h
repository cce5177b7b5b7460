// The vector parts of n-gram counting, compiled once per ISA by kernels_<isa>.cpp (which
// defines CPU_CAPABILITY first): the vocabulary check, a min and a max over the tokens in their
// own width, and the n-grams' bins, in 32-bit lanes, which the compiler vectorises with the ISA's
// packed compares and multiplies. Built for baseline x86-64 only (SSE2: no packed 32-bit min,
// max or multiply), the check of a block cost more than counting it; computed one n-gram at a
// time in the counting loop, the bins took a quarter of a 10^7-token count.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

namespace ngram {

// ignore_index as a T, or nullopt where no T equals it (then nothing is ignored).
template <typename T>
std::optional<T> as_token(bool has_ignore, int64_t ignore) {
  using Limits = std::numeric_limits<T>;
  if (!has_ignore || ignore < int64_t{Limits::min()} || ignore > int64_t{Limits::max()}) {
    return std::nullopt;
  }
  return static_cast<T>(ignore);
}

template <typename T>
void check_block(const TokensInVocabArgs& a) {
  const T* tokens = static_cast<const T*>(a.tokens);
  const T last = a.V - 1 >= int64_t{std::numeric_limits<T>::max()} ? std::numeric_limits<T>::max()
                                                                    : static_cast<T>(a.V - 1);
  const std::optional<T> ignore = as_token<T>(a.has_ignore, a.ignore);
  if (!ignore) {  // a min and a max
    T lo = 0, hi = 0;
    for (int64_t i = 0; i < a.n; ++i) {
      lo = std::min(lo, tokens[i]);
      hi = std::max(hi, tokens[i]);
    }
    *a.valid = lo >= 0 && hi <= last;
    *a.has_ignored = false;
    return;
  }
  // Or-reductions of per-token flags, in integers so that they vectorise.
  int bad = 0, seen = 0;
  for (int64_t i = 0; i < a.n; ++i) {
    const T t = tokens[i];
    const int ignored = t == *ignore;
    bad |= !((t >= 0 && t <= last) || ignored);
    seen |= ignored;
  }
  *a.valid = bad == 0;
  *a.has_ignored = seen != 0;
}

template <int N, bool kSkipIgnored, typename T>
void bins_of(const T* tokens, int64_t count, uint32_t V, T ignore, uint32_t* bins) {
  for (int64_t k = 0; k < count; ++k) {
    uint32_t b = static_cast<uint32_t>(tokens[k]);
    bool skip = kSkipIgnored && tokens[k] == ignore;
    for (int j = 1; j < N; ++j) {
      b = b * V + static_cast<uint32_t>(tokens[k + j]);
      if constexpr (kSkipIgnored) skip |= tokens[k + j] == ignore;
    }
    bins[k] = skip ? kSkippedNgramBin : b;
  }
}

template <int N, typename T>
void bins_of_n(const NgramBinsArgs& a, const T* tokens) {
  const std::optional<T> ignore = as_token<T>(a.skip_ignored, a.ignore);
  if (ignore) {
    bins_of<N, true>(tokens, a.count, a.V, *ignore, a.bins);
  } else {
    bins_of<N, false>(tokens, a.count, a.V, T(0), a.bins);
  }
}

template <typename T>
void bins_of_t(const NgramBinsArgs& a) {
  const T* tokens = static_cast<const T*>(a.tokens);
  switch (a.n) {
    case 1: bins_of_n<1>(a, tokens); break;
    case 2: bins_of_n<2>(a, tokens); break;
    default: bins_of_n<3>(a, tokens); break;
  }
}

}  // namespace ngram

// Calls f with a value of the C++ type of integer token ids of `dtype`.
template <typename F>
void with_token_type(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Byte: return f(uint8_t{});
    case c10::ScalarType::Short: return f(int16_t{});
    case c10::ScalarType::Int: return f(int32_t{});
    case c10::ScalarType::Long: return f(int64_t{});
    default: TORCH_CHECK(false, "dlfast::ngram_counts: tokens of ", dtype, " are not integer ids");
  }
}

void tokens_in_vocab(const TokensInVocabArgs& a) {
  with_token_type(a.dtype, [&](auto t) { ngram::check_block<decltype(t)>(a); });
}

void ngram_bins(const NgramBinsArgs& a) {
  with_token_type(a.dtype, [&](auto t) { ngram::bins_of_t<decltype(t)>(a); });
}

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
