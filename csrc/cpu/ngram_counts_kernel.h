// The vocabulary check of n-gram counting, compiled once per ISA by kernels_<isa>.cpp (which
// defines CPU_CAPABILITY first): a min and a max over the tokens in their own width, which the
// compiler vectorises with the ISA's packed compares. Built for baseline x86-64 only (SSE2, no
// packed 32-bit min/max), the check of a block cost more than counting it.
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

}  // namespace CPU_CAPABILITY
}  // namespace dlfast::cpu
