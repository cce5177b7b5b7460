// What the emulator tests share: the CUDA runtime calls the launchers make, device buffers
// that the emulator bounds-checks, and the loop that runs the cases and counts failures.
#pragma once
#include "emu.h"
#include <string>
#include <vector>

extern "C" cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (size_t(value) > emu::kSmemBytes) return cudaErrorInvalidValue;
    emu::g_max_dyn_smem[f] = value;
  }
  return cudaSuccess;
}
// Emulated devices, picked by g_device: 0 has an H100's shared memory and 8 SMs, 1 no shared
// memory to opt in to (kernels that need it take their fallback), 2 only 2 SMs (few blocks:
// persistent and grid-stride loops turn).
inline int g_device = 0;
extern "C" cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = device == 2 ? 2 : 8;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = device == 1 ? 0 : int(emu::kSmemBytes);
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t smem) {
  *n = smem > emu::kSmemBytes / 2 ? 1 : 2;
  return cudaSuccess;
}
extern "C" cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  emu::check_global(p, bytes, 1);
  memset(p, value, bytes);
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

// Failed checks, counted by every test of the binary.
inline int failures = 0;

// Runs the cases whose name contains argv[1] (all of them without one), one "ok" / "FAIL" line
// each, then run_invalid (the configs a launcher must refuse) unless argv[1] excludes it, and
// prints the failure count; returns main's exit status.
template <typename Case, typename Run>
int run_cases(int argc, char** argv, const std::vector<Case>& cases, Run&& run,
              void (*run_invalid)() = nullptr) {
  const std::string only = argc > 1 ? argv[1] : "";
  for (const Case& c : cases) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    const int before = failures;
    run(c);
    printf("%s %s\n", failures == before ? "ok  " : "FAIL", c.name.c_str());
    fflush(stdout);
  }
  if (run_invalid != nullptr && (only.empty() || std::string("invalid").find(only) != std::string::npos)) {
    const int before = failures;
    run_invalid();
    printf("%s invalid\n", failures == before ? "ok  " : "FAIL");
  }
  printf("%d failure(s)\n", failures);
  return failures != 0;
}
