// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator behind dlfast's attention dropout. One header for the CPU and CUDA
// kernels, free of torch includes so nvcc compiles it anywhere; dlfast/reference.py
// (philox4x32_10, dropout_keep_mask) and triton_kernels/attention.py implement the same rule, so
// every backend drops the same attention probabilities and a backward pass redraws its forward's
// mask instead of storing it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DLFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DLFAST_HOST_DEVICE inline
#endif

namespace dlfast {

// Word 0 of the Philox4x32-10 block for `counter` under the 64-bit `seed` (key word 0 is its low
// half, key word 1 its high half).
DLFAST_HOST_DEVICE uint32_t philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                          uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// The draw below which a probability is dropped: floor(p * 2^32) in double, clamped to 32 bits
// (dlfast.reference.dropout_threshold).
inline uint32_t dropout_threshold(double dropout_p) {
  const double t = dropout_p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Whether attention probability [b, h, i, j] survives dropout; bh = b * H + h.
DLFAST_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t threshold, uint32_t bh, uint32_t i,
                                     uint32_t j) {
  return philox4x32_10(seed, j, i, bh, 0u) >= threshold;
}

}  // namespace dlfast
