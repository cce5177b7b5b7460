// A CUDA block emulator for host testing: 128 "threads" as ucontext fibers on one OS thread,
// switched at every barrier, so warp collectives (ldmatrix, mma, shfl) see all 32 lanes.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

#define EMU_FAIL(...) do { fprintf(stderr, "EMU FAIL %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); abort(); } while (0)

namespace emu {
constexpr size_t kSmemBytes = 232448;  // H100 opt-in limit
inline unsigned char* g_smem = nullptr;
inline size_t g_dyn_smem = 0;
inline uint3 g_block_idx;
inline dim3 g_grid, g_block_dim;
inline cudaError_t g_last_error = cudaSuccess;
inline std::map<const void*, int> g_max_dyn_smem;
inline std::vector<std::pair<const char*, size_t>> g_buffers;

struct Copy { void* dst; const void* src; int size; int src_bytes; };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  bool done = false;
  uint3 tid;
  int lane = 0, warp = 0;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct Barrier {
  int n = 0, count = 0;
  unsigned gen = 0;
};

inline std::vector<Fiber>* g_fibers = nullptr;
inline int g_cur = 0;
inline ucontext_t g_sched;
inline uint64_t g_progress = 0;
inline Barrier g_block_bar;
inline Barrier g_warp_bar[32];
struct WarpX { const uint16_t* ptr[32]; uint32_t frag[32][6]; float f[32]; int i[32]; };
inline WarpX g_wx[32];
inline int g_block_ints[1024];

inline Fiber& cur() { return (*g_fibers)[g_cur]; }
inline void yield() { swapcontext(&cur().ctx, &g_sched); }
inline void wait(Barrier& b) {
  const unsigned g = b.gen;
  ++g_progress;
  if (++b.count == b.n) { b.count = 0; ++b.gen; return; }
  while (b.gen == g) yield();
}
inline void warp_wait() { wait(g_warp_bar[cur().warp]); }
inline WarpX& wx() { return g_wx[cur().warp]; }

inline void check_smem(const void* p, size_t n, size_t align) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < g_smem || c + n > g_smem + g_dyn_smem) EMU_FAIL("smem access out of the dynamic allocation: offset %td size %zu (dyn %zu)", c - g_smem, n, g_dyn_smem);
  if (reinterpret_cast<uintptr_t>(p) % align) EMU_FAIL("misaligned smem access");
}
inline void check_global(const void* p, size_t n, size_t align) {
  const char* c = static_cast<const char*>(p);
  for (auto& b : g_buffers) if (c >= b.first && c + n <= b.first + b.second) {
    if (reinterpret_cast<uintptr_t>(p) % align) EMU_FAIL("misaligned global access");
    return;
  }
  EMU_FAIL("global access outside every buffer");
}

inline float half_bits_to_float(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp(float(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(float(m | 1024), e - 25);
  return sign ? -v : v;
}
inline float bf16_bits_to_float(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; memcpy(&f, &u, 4); return f; }

inline void run_block(unsigned threads, const std::function<void()>& body) {
  static std::function<void()> s_body;
  s_body = body;
  // Stacks outlive the block: allocating (and page-faulting) 512 KB per thread for every block
  // would dominate the run time.
  constexpr size_t kStackBytes = 512 * 1024;
  static std::vector<std::unique_ptr<char[]>> s_stacks;
  while (s_stacks.size() < threads) s_stacks.emplace_back(new char[kStackBytes]);
  std::vector<Fiber> fibers(threads);
  g_fibers = &fibers;
  g_block_bar = Barrier{int(threads), 0, 0};
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) g_warp_bar[w] = Barrier{32, 0, 0};
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.tid = make_uint3(t, 0, 0);
    f.lane = t % 32;
    f.warp = t / 32;
    f.stack = s_stacks[t].get();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, +[] { s_body(); cur().done = true; }, 0);
  }
  unsigned remaining = threads;
  while (remaining > 0) {
    const uint64_t before = g_progress;
    for (unsigned t = 0; t < threads; ++t) {
      if (fibers[t].done) continue;
      g_cur = t;
      swapcontext(&g_sched, &fibers[t].ctx);
      if (fibers[t].done) { --remaining; ++g_progress; }
    }
    if (g_progress == before) EMU_FAIL("deadlock: every live thread waits at a barrier that cannot complete");
  }
  for (auto& f : fibers) if (!f.groups.empty() || !f.open.empty()) EMU_FAIL("thread %u exits with cp.async copies pending", f.tid.x);
  g_fibers = nullptr;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, unsigned threads, size_t smem, cudaStream_t, A... args) {
  if (smem > 48 * 1024) {
    auto it = g_max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
    if (it == g_max_dyn_smem.end() || size_t(it->second) < smem) { g_last_error = cudaErrorInvalidValue; return; }
  }
  if (smem > kSmemBytes) { g_last_error = cudaErrorInvalidValue; return; }
  if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0) { g_last_error = cudaErrorInvalidConfiguration; return; }
  g_grid = grid;
  g_block_dim = dim3(threads);
  g_dyn_smem = smem;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = make_uint3(x, y, z);
        memset(g_smem, 0xff, kSmemBytes);  // NaN in fp16, bf16 and fp32: stale reads show
        run_block(threads, [&] { kernel(args...); });
      }
}
}  // namespace emu

#define threadIdx (emu::cur().tid)
#define blockIdx (emu::g_block_idx)
#define gridDim (emu::g_grid)
#define blockDim (emu::g_block_dim)

inline void __syncthreads() { emu::wait(emu::g_block_bar); }
inline int __syncthreads_count(int pred) {
  emu::g_block_ints[threadIdx.x] = pred != 0;
  __syncthreads();
  int n = 0;
  for (unsigned i = 0; i < emu::g_block_dim.x; ++i) n += emu::g_block_ints[i];
  __syncthreads();
  return n;
}
inline int __syncthreads_or(int pred) { return __syncthreads_count(pred) > 0; }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_wait(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lanemask) {
  if (mask != 0xffffffffu) EMU_FAIL("partial shfl mask");
  emu::wx().f[emu::cur().lane] = v;
  emu::warp_wait();
  const float r = emu::wx().f[emu::cur().lane ^ lanemask];
  emu::warp_wait();
  return r;
}
// Lane i gets lane i + delta's value, its own where i + delta is past the warp.
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, int>, "float or int shuffles only");
  if (mask != 0xffffffffu) EMU_FAIL("partial shfl mask");
  auto& w = emu::wx();
  const int lane = emu::cur().lane;
  T* values;
  if constexpr (std::is_same_v<T, float>) values = w.f; else values = w.i;
  values[lane] = v;
  emu::warp_wait();
  const T r = lane + delta < 32 ? values[lane + delta] : v;
  emu::warp_wait();
  return r;
}
inline int emu_warp_count(int pred) {
  emu::wx().i[emu::cur().lane] = pred != 0;
  emu::warp_wait();
  int n = 0;
  for (int i = 0; i < 32; ++i) n += emu::wx().i[i];
  emu::warp_wait();
  return n;
}
inline int __any_sync(unsigned, int pred) { return emu_warp_count(pred) > 0; }
inline int __all_sync(unsigned, int pred) { return emu_warp_count(pred) == 32; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

// Atomics, bit counts and __match_any_sync (the n-gram kernels). Fibers switch only at barriers
// and warp collectives, so a plain read-modify-write is atomic here; each one is bounds-checked
// against shared memory or the registered global buffers.
inline void emu_check_atomic(const void* p, size_t n) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c >= emu::g_smem && c < emu::g_smem + emu::kSmemBytes) emu::check_smem(p, n, n);
  else emu::check_global(p, n, n);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  emu_check_atomic(p, sizeof(*p));
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  emu_check_atomic(p, sizeof(*p));
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  emu_check_atomic(p, sizeof(*p));
  const unsigned long long old = *p;
  *p = std::min(old, v);
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline uint64_t g_match_values[32][32];
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(std::is_integral_v<T>, "integer match keys only");
  if (mask != 0xffffffffu) EMU_FAIL("partial match mask");
  uint64_t* values = g_match_values[emu::cur().warp];
  const int lane = emu::cur().lane;
  values[lane] = static_cast<uint64_t>(v);
  emu::warp_wait();
  unsigned peers = 0;
  for (int i = 0; i < 32; ++i) peers |= unsigned(values[i] == values[lane]) << i;
  emu::warp_wait();
  return peers;
}
