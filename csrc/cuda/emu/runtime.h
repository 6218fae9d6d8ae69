// The SIMT emulator's view from the kernels: what csrc/cuda/ptx.h maps the GPU primitives to when the
// kernel units are compiled as host C++ (-x c++ -DATTNKERN_CUDA_EMU), and the launch the launch macro
// becomes. The emulator itself (fibers, warp collectives, barriers, the checks) is runtime.cpp,
// compiled without instrumentation; the kernel units are compiled with outline address instrumentation
// (-fsanitize=kernel-address with calls), so every load and store they make reaches the checks there.
//
// Model: one CTA at a time; each CUDA thread is a cooperative fiber. Warp collectives (ldmatrix, mma,
// shfl) run when all 32 lanes of the warp have arrived; __syncthreads when every thread of the block has.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace attnkern {
namespace emu {

// The executing fiber's CUDA coordinates (runtime.cpp).
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// The most blocks grid y and z may hold: 65535, or less under ATTNKERN_EMU_MAX_GRID_YZ (tests lower it so
// that small problems take the launches' over-the-limit paths).
unsigned max_grid_yz();

void syncthreads();
void syncwarp();
uint32_t shfl_xor(uint32_t bits, int lane_mask, unsigned member_mask, int width);

void cp_async(void* smem, const void* gmem, int bytes, bool valid);  // bytes: 4, 8 or 16
void cp_async_commit();
void cp_async_wait(int n);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
enum class MmaType { kF16, kBF16 };
void mma_16816(MmaType type, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
float ex2_approx_ftz(float x);

// Launch attributes: the dynamic shared-memory opt-in above 48 KB.
cudaError_t func_set_attribute(const void* kernel, const char* name, cudaFuncAttribute attr, int value);
cudaError_t get_last_error();
cudaError_t get_device(int* device);  // device 0
// How many times the kernels have set a function attribute (tests: once per kernel, not per call).
int64_t attribute_calls();

// What the emulated kernels executed, per kernel (demangled name), summed over launches since the last
// reset: the instruction mix compile-report's CUDA main-loop figures are computed from. mma and ldmatrix
// are warp instructions (m16n8k16, x4), ex2 counts lanes; loads are bytes read from the tensors passed
// in, by tensor name, through cp.async or plain (synchronous) loads.
struct KernelCounts {
  int64_t launches = 0, ctas = 0, mma = 0, ldmatrix = 0, ex2_lanes = 0;
  std::map<std::string, int64_t> async_load_bytes, sync_load_bytes;
};
std::map<std::string, KernelCounts> kernel_counts();
void reset_kernel_counts();

// Runs thunk(ctx) (a kernel call) once per thread of every block of the grid; throws
// std::runtime_error naming the kernel, block, thread and address of the first failed check, or the
// threads of a deadlock. The launching thread's stack (where ctx lives) is outside every check.
void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
            void (*thunk)(const void*), const void* ctx);

// The launch macro's target: ATTNKERN_LAUNCH(kernel, grid, block, smem, stream)(args...).
template <typename Kernel>
struct Launcher {
  Kernel kernel;
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(const Args&... args) const {
    struct Ctx {
      Kernel kernel;
      std::tuple<const Args&...> args;
    } ctx{kernel, std::tuple<const Args&...>(args...)};
    // Each fiber calls the kernel with its own copies of the arguments, as a launch passes them.
    auto thunk = [](const void* c) {
      const Ctx& x = *static_cast<const Ctx*>(c);
      std::apply([&](const Args&... a) { x.kernel(a...); }, x.args);
    };
    launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem, +thunk, &ctx);
  }
};

// The global ranges a launch may touch: every tensor passed in (name, first byte, one past the last).
struct GlobalRange {
  const char* name;
  const void* begin;
  const void* end;
};
// Registers ranges for the launches made while it lives (nested scopes add to the outer ones).
class GlobalRanges {
 public:
  explicit GlobalRanges(std::initializer_list<GlobalRange> ranges);
  ~GlobalRanges();
  GlobalRanges(const GlobalRanges&) = delete;
  GlobalRanges& operator=(const GlobalRanges&) = delete;

 private:
  size_t count_;
};

}  // namespace emu

namespace cuda {
// Host stand-ins for the device math the kernels call on 64-bit integers.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
}  // namespace cuda
}  // namespace attnkern

#define threadIdx (::attnkern::emu::thread_idx())
#define blockIdx (::attnkern::emu::block_idx())
#define blockDim (::attnkern::emu::block_dim())
#define gridDim (::attnkern::emu::grid_dim())
#define cudaFuncSetAttribute(kernel, attr, value) \
  ::attnkern::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), #kernel, attr, value)
#define cudaGetLastError() ::attnkern::emu::get_last_error()
#define cudaGetDevice(device) ::attnkern::emu::get_device(device)

inline void __syncthreads() { ::attnkern::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::attnkern::emu::syncwarp(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
  uint32_t bits;
  __builtin_memcpy(&bits, &var, 4);
  bits = ::attnkern::emu::shfl_xor(bits, lane_mask, mask, width);
  __builtin_memcpy(&var, &bits, 4);
  return var;
}

#define ATTNKERN_LAUNCH(kernel, grid, block, smem, stream) \
  ::attnkern::emu::Launcher<std::decay_t<decltype(kernel)>>{kernel, #kernel, dim3(grid), dim3(block), size_t(smem)}
