// What the CUDA decode op (decode_ops_cuda.cpp) and its emulated twin (emu/ops_emu.cpp) share: the
// kernels' own requirements on a checked decode call (decode_op.cpp checks the arguments themselves),
// the split count and workspace, and the (dtype, head dim) dispatch. Host code with torch headers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "../decode_op.h"
#include "decode_dispatch.h"
#include "dispatch.h"  // kHeadDims
#include "host_checks.h"

namespace attnkern {
namespace cuda {

// The instantiated head dim a decode call runs on: the smallest in kHeadDims >= max(E, Ev), or -1.
// What the kernels assume beyond the op's checks: fp16/bf16, head dims that are multiples of 8 up to 256,
// tensors the 16-byte cp.async copies read in place, and kv heads and batch on grid y and z. `who`
// prefixes the messages ("attnkern cuda", "attnkern cuda-emu").
inline void check_decode_call(const DecodeParams& p, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& out, const char* who) {
  const std::string decode = std::string(who) + " decode";
  check_dtype_and_head_dims(q.scalar_type(), p.E, p.Ev, decode.c_str());
  TORCH_CHECK(p.Hkv <= 65535 && p.B <= 65535, who, " decode: at most 65535 kv heads (grid y) and batch elements ",
              "(grid z), got Hkv=", p.Hkv, " B=", p.B);
  for (const auto& [t, name] : {std::pair{&q, "query"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&out, "out"}}) {
    check_cp_async_layout(*t, name, decode.c_str());
  }
}

// The split count and its workspace (float32 tensors on the query's device; empty with one split).
struct DecodePlan {
  int head_dim = -1;
  DecodeWorkspace ws;
  at::Tensor ws_out, ws_lse;
};

inline DecodePlan plan_decode(const DecodeParams& p, const at::Tensor& q, const at::Tensor& k_cache,
                              const std::optional<at::Tensor>& block_table, int64_t num_sms) {
  DecodePlan plan;
  plan.head_dim = head_dim_bucket(std::max(p.E, p.Ev));
  // The most keys a batch element can hold: the split count must not depend on the lengths' values.
  const bool paged = block_table.has_value() && block_table->defined();
  const int64_t capacity = paged ? block_table->size(1) * p.page_size : k_cache.size(1);
  const int64_t splits = decode_num_splits(p, capacity, num_sms, decode_tile_keys(plan.head_dim));
  plan.ws.num_splits = splits;
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t n = splits > 1 ? splits : 0;
  plan.ws_out = at::empty({n, p.B, p.Hq, p.Lq, p.Ev}, f32);
  plan.ws_lse = at::empty({n, p.B, p.Hq, p.Lq}, f32);
  plan.ws.out = plan.ws_out.data_ptr<float>();
  plan.ws.lse = plan.ws_lse.data_ptr<float>();
  return plan;
}

template <typename T>
cudaError_t run_decode_head_dim(int hd, const DecodeParams& p, const DecodeWorkspace& ws, cudaStream_t s) {
  switch (hd) {
    case 32: return run_decode<T, 32>(p, ws, s);
    case 64: return run_decode<T, 64>(p, ws, s);
    case 96: return run_decode<T, 96>(p, ws, s);
    case 128: return run_decode<T, 128>(p, ws, s);
    case 160: return run_decode<T, 160>(p, ws, s);
    case 192: return run_decode<T, 192>(p, ws, s);
    default: return run_decode<T, 256>(p, ws, s);
  }
}

inline cudaError_t run_decode_plan(const DecodePlan& plan, const DecodeParams& p, at::ScalarType dtype,
                                   cudaStream_t s) {
  return dtype == at::kHalf ? run_decode_head_dim<__half>(plan.head_dim, p, plan.ws, s)
                            : run_decode_head_dim<__nv_bfloat16>(plan.head_dim, p, plan.ws, s);
}

}  // namespace cuda
}  // namespace attnkern
