// Host-side checks of what the CUDA kernels assume of a call, shared by the CUDA ops (ops_cuda.cpp,
// decode_ops_cuda.cpp through decode_host.h) and their emulated twins (emu/ops_emu.cpp). `who` starts
// each message ("attnkern cuda", "attnkern cuda-emu decode", ...). Host code only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "dispatch.h"  // kHeadDims

namespace attnkern {

// The instantiated head dim a problem runs on: the smallest in cuda::kHeadDims >= e, or -1.
inline int head_dim_bucket(int64_t e) {
  for (int hd : cuda::kHeadDims) {
    if (e <= hd) return hd;
  }
  return -1;
}

// cp.async copies 16-byte chunks: a 4-D tensor's head dim (last) is unit-stride, and its base and every
// row 16-byte aligned.
inline void check_cp_async_layout(const at::Tensor& t, const char* name, const char* who) {
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, who, ": ", name,
              " needs a unit-stride head dim (last dim), got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, who, ": ", name,
              " must start at a 16-byte aligned address");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.size(d) == 1 || (t.stride(d) * t.element_size()) % 16 == 0, who, ": ", name, " stride of dim ",
                d, " must be a multiple of 16 bytes, got strides ", t.strides());
  }
}

// The dtypes and head dims the kernels are instantiated for: fp16/bf16, E and Ev multiples of 8 up to 256.
inline void check_dtype_and_head_dims(at::ScalarType dtype, int64_t E, int64_t Ev, const char* who) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, who,
              ": the CUDA kernels take float16 and bfloat16, got ", dtype);
  TORCH_CHECK(E % 8 == 0 && Ev % 8 == 0, who, ": head dims must be multiples of 8, got E=", E, " Ev=", Ev);
  TORCH_CHECK(head_dim_bucket(std::max(E, Ev)) > 0, who, ": head dims up to 256, got E=", E, " Ev=", Ev);
}

}  // namespace attnkern
