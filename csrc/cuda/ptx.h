// PTX wrappers shared by the kernels (attention.cu, conv2d_relu.cu, layer_norm.cu). ldmatrix and
// cp.async are volatile so they keep their place relative to the barriers around them.
// tests/cuda_emulator/gen.py replaces the #include of this header by
// tests/cuda_emulator/emu_ptx.inc, which defines the same functions in C++ for the host emulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace dlfast {
namespace cuda {

// bf16 -> fp32, a 16-bit shift, as opaque PTX so that the compiler converts where a value is used
// instead of keeping an fp32 copy of every packed element alive (with __bfloat162float the
// LayerNorm forward kernels needed 96 registers where fp16 needed 64).
__device__ __forceinline__ float bf16_to_float(__nv_bfloat16 v) {
  float f;
  asm("{ .reg .b16 z; mov.b16 z, 0; mov.b32 %0, {z, %1}; }"
      : "=f"(f)
      : "h"(__bfloat16_as_ushort(v)));
  return f;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid (the
// source is then not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` of this thread's most recent commit groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and each lane gets
// (row lane / 4, columns 2 * (lane % 4) + {0, 1}) of every matrix (transposed with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16x8, fp32) += a (16x16, row-major) * b (16x8, column-major). With g = lane / 4 and
// t = lane % 4, a lane holds c rows {g, g + 8} x columns {2t, 2t + 1} as c[0..1] (row g) and
// c[2..3] (row g + 8); a[0..3] = a rows {g, g + 8, g, g + 8} x columns {2t.., 2t.., 2t + 8..,
// 2t + 8..}; b0 / b1 = b rows {2t, 2t + 1} / {2t + 8, 2t + 9} x column g.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, "
        "%7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace cuda
}  // namespace dlfast
