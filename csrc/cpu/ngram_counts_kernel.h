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

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace CPU_CAPABILITY {

namespace ngram {

template <typename T>
bool in_vocab(const T* tokens, int64_t n, int64_t V) {
  const T last = V - 1 >= int64_t{std::numeric_limits<T>::max()} ? std::numeric_limits<T>::max()
                                                                  : static_cast<T>(V - 1);
  T lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, tokens[i]);
    hi = std::max(hi, tokens[i]);
  }
  return lo >= 0 && hi <= last;
}

template <int N, typename T>
void bins_of(const T* tokens, int64_t count, uint32_t V, uint32_t* bins) {
  for (int64_t k = 0; k < count; ++k) {
    uint32_t b = static_cast<uint32_t>(tokens[k]);
    for (int j = 1; j < N; ++j) b = b * V + static_cast<uint32_t>(tokens[k + j]);
    bins[k] = b;
  }
}

template <typename T>
void bins_of_n(const NgramBinsArgs& a) {
  const T* t = static_cast<const T*>(a.tokens);
  switch (a.n) {
    case 1: bins_of<1>(t, a.count, a.V, a.bins); break;
    case 2: bins_of<2>(t, a.count, a.V, a.bins); break;
    default: bins_of<3>(t, a.count, a.V, a.bins); break;
  }
}

}  // namespace ngram

void tokens_in_vocab(const TokensInVocabArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Byte: *a.result = ngram::in_vocab(static_cast<const uint8_t*>(a.tokens), a.n, a.V); break;
    case c10::ScalarType::Short: *a.result = ngram::in_vocab(static_cast<const int16_t*>(a.tokens), a.n, a.V); break;
    case c10::ScalarType::Int: *a.result = ngram::in_vocab(static_cast<const int32_t*>(a.tokens), a.n, a.V); break;
    case c10::ScalarType::Long: *a.result = ngram::in_vocab(static_cast<const int64_t*>(a.tokens), a.n, a.V); break;
    default: TORCH_CHECK(false, "dlfast::ngram_counts: tokens of ", a.dtype, " are not integer ids");
  }
}

void ngram_bins(const NgramBinsArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Byte: ngram::bins_of_n<uint8_t>(a); break;
    case c10::ScalarType::Short: ngram::bins_of_n<int16_t>(a); break;
    case c10::ScalarType::Int: ngram::bins_of_n<int32_t>(a); break;
    case c10::ScalarType::Long: ngram::bins_of_n<int64_t>(a); break;
    default: TORCH_CHECK(false, "dlfast::ngram_counts: tokens of ", a.dtype, " are not integer ids");
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
