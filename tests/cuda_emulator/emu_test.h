// What the emulator tests share: the CUDA runtime calls the launchers make, and device buffers
// that the emulator bounds-checks.
#pragma once
#include "emu.h"
#include <vector>

extern "C" cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (size_t(value) > emu::kSmemBytes) return cudaErrorInvalidValue;
    emu::g_max_dyn_smem[f] = value;
  }
  return cudaSuccess;
}
extern "C" cudaError_t cudaGetLastError() { cudaError_t e = emu::g_last_error; emu::g_last_error = cudaSuccess; return e; }
extern "C" const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "ok" : "error"; }

// A device buffer: registered for bounds checks, canaries on both sides, NaN-filled.
struct Buf {
  std::vector<char> mem;
  size_t bytes;
  static constexpr size_t kGuard = 256;
  explicit Buf(size_t n) : mem(n + 2 * kGuard + 16), bytes(n) {
    memset(mem.data(), 0xA5, mem.size());
    memset(ptr(), 0xff, n);
    emu::g_buffers.push_back({static_cast<const char*>(ptr()), n});
  }
  ~Buf() {
    for (auto it = emu::g_buffers.begin(); it != emu::g_buffers.end(); ++it)
      if (it->first == ptr()) { emu::g_buffers.erase(it); break; }
  }
  void* ptr() { return mem.data() + kGuard + (16 - reinterpret_cast<uintptr_t>(mem.data() + kGuard) % 16) % 16; }
  bool guards_ok() {
    const char* p = static_cast<const char*>(ptr());
    for (const char* c = mem.data(); c < p; ++c) if (*c != char(0xA5)) return false;
    for (const char* c = p + bytes; c < mem.data() + mem.size(); ++c) if (*c != char(0xA5)) return false;
    return true;
  }
};

inline uint16_t to_bits(float f, bool bf16) {
  if (bf16) { __nv_bfloat16 h = __float2bfloat16_rn(f); uint16_t u; memcpy(&u, &h, 2); return u; }
  __half h = __float2half_rn(f); uint16_t u; memcpy(&u, &h, 2); return u;
}
inline float from_bits(uint16_t u, bool bf16) { return bf16 ? emu::bf16_bits_to_float(u) : emu::half_bits_to_float(u); }
