// Thin wrappers over the PTX instructions the CUDA kernels are built from (sm80 and newer):
//   cp.async      global -> shared copies of 16 bytes, zero-filled when out of bounds, in commit groups
//   ldmatrix      8x8 b16 matrices from shared memory into the mma fragment layout (.trans: transposed)
//   mma.sync      m16n8k16, fp16 or bf16 inputs, fp32 accumulators
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * g + t, g in [0, 8), t in [0, 4)):
//   A 16x16 row-major: a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B 16x8 (k x n):    b0 = (k = 2t..2t+1, n = g)  b1 = (k = 2t+8.., n = g)
//   C 16x8 fp32:       c0, c1 = (g, 2t..2t+1)  c2, c3 = (g+8, 2t..2t+1)
// No torch headers here: the kernel translation units compile with nvcc alone.
//
// With ATTNKERN_CUDA_EMU (the units compiled as host C++ for the SIMT emulator, emu/runtime.h) the
// instructions below become calls into the emulator; everything else in the kernels is the same source.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifdef ATTNKERN_CUDA_EMU
#include <type_traits>

#include "emu/runtime.h"
#else
// The launch macro: ATTNKERN_LAUNCH(kernel, grid, block, smem, stream)(args...).
#define ATTNKERN_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace attnkern {
namespace cuda {

// The most blocks grid y or z holds (grid x: 2^31 - 1). The emulator may report less, so that tests
// take the launches' loops over batch chunks (launch.h) on small problems.
inline int64_t max_grid_yz() {
#ifdef ATTNKERN_CUDA_EMU
  return emu::max_grid_yz();
#else
  return 65535;
#endif
}

#ifdef ATTNKERN_CUDA_EMU
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  emu::cp_async(smem, gmem, 16, valid);
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  emu::cp_async(smem, gmem, 4, valid);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  emu::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu::ldmatrix_x4(r, smem, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  emu::ldmatrix_x4(r, smem, true);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816(std::is_same<T, __half>::value ? emu::MmaType::kF16 : emu::MmaType::kBF16,
                 c, a, b0, b1);
}
__device__ __forceinline__ float fast_exp2(float x) { return emu::ex2_approx_ftz(x); }
#else

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; copies `valid` ? 16 : 0 bytes and zero-fills the rest of the destination.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

// 4-byte async copy (one float; .ca: .cg takes 16 bytes only), zero-filled when not `valid`.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l supplies the row address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// c (+)= a * b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOp<T>::run(c, a, b0, b1);
}

// 2^x in one special-function instruction (ex2.approx: about 2 ulp, exactly 0 for -inf); the
// softmax computes exp(s - m) as 2^((s - m) log2 e).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif  // ATTNKERN_CUDA_EMU

// Two floats -> one register of two T (the low half is `lo`).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<double>(double x) {
  return static_cast<float>(x);
}

// pack2's two values rounded to T and back, the residuals lo - rounded, hi - rounded rounded to T in a
// second register: out + out_lo (see params.h).
template <typename T>
__device__ __forceinline__ uint32_t pack2_residual(float lo, float hi) {
  const uint32_t r = pack2<T>(lo, hi);
  const T* h = reinterpret_cast<const T*>(&r);
  return pack2<T>(lo - to_float(h[0]), hi - to_float(h[1]));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace cuda
}  // namespace attnkern
