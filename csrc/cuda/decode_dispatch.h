// Entry points of the CUDA split-KV decode kernels (decode_kernel.h), one explicit instantiation per
// (dtype, head dim) in inst/decode_hdim*, and the host-side choices the op layers (decode_ops_cuda.cpp,
// emu/ops_emu.cpp) make before a launch. Declarations and plain host arithmetic only: no kernel code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../decode_params.h"

namespace attnkern {
namespace cuda {

// Query rows per CTA: a kv head's group of query heads times Lq rows ride on the MMA's M dimension,
// 16 per warp, 4 warps.
constexpr int kDecodeBlockM = 64;
// The most splits a call is cut into (the workspace holds num_splits partial outputs per row).
constexpr int64_t kDecodeMaxSplits = 128;

// Where the splits leave their partial results for the combine kernel; unused with one split (the
// split kernel then writes out and lse directly).
//   out (num_splits, B, Hq, Lq, Ev) float32: each split's output, normalized by its own denominator
//   lse (num_splits, B, Hq, Lq) float32: each split's log-sum-exp (-inf: it saw no key)
struct DecodeWorkspace {
  float* out = nullptr;
  float* lse = nullptr;
  int64_t num_splits = 1;
};

// CTAs along grid x per split: the query rows of one kv head's group.
inline int64_t decode_row_blocks(const DecodeParams& p) {
  return (p.group * p.Lq + kDecodeBlockM - 1) / kDecodeBlockM;
}

// The split count: p.num_splits when given, else enough splits to fill the device's `num_sms` SMs
// with the (row block, kv head, batch) CTAs, no more than the key tiles of `max_keys` (the most keys a
// batch element may hold: the cache's capacity, so that the count does not depend on the lengths'
// values and needs no read of them) allow. One split when the CTAs already fill most of the device.
inline int64_t decode_num_splits(const DecodeParams& p, int64_t max_keys, int64_t num_sms, int64_t tile_keys) {
  if (p.num_splits > 0) return p.num_splits < kDecodeMaxSplits ? p.num_splits : kDecodeMaxSplits;
  const int64_t ctas = decode_row_blocks(p) * p.Hkv * p.B;
  if (ctas == 0 || ctas * 5 >= num_sms * 4) return 1;
  const int64_t tiles = (max_keys + tile_keys - 1) / tile_keys;
  int64_t splits = (num_sms + ctas - 1) / ctas;
  if (splits > tiles) splits = tiles;
  if (splits > kDecodeMaxSplits) splits = kDecodeMaxSplits;
  return splits < 1 ? 1 : splits;
}

// Keys per K/V tile of the head dim the problem runs on (decode_kernel.h's DecodeConfig): the largest
// with which ptxas keeps the split kernel free of spills on sm_80 and sm_90a (64-key tiles spilled at
// head dim 96, 32-key ones at 160 on sm_80).
constexpr int decode_tile_keys(int head_dim) { return head_dim <= 64 ? 64 : (head_dim <= 128 ? 32 : 16); }

// The split kernel (and, with several splits, the combine kernel) for one (dtype, head dim).
template <typename T, int HD>
cudaError_t run_decode(const DecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream);

#define ATTNKERN_DECLARE_DECODE(T, HD) \
  extern template cudaError_t run_decode<T, HD>(const DecodeParams&, const DecodeWorkspace&, cudaStream_t);
#define ATTNKERN_FOR_EACH_DECODE_HEAD_DIM(M, T) M(T, 32) M(T, 64) M(T, 96) M(T, 128) M(T, 160) M(T, 192) M(T, 256)
ATTNKERN_FOR_EACH_DECODE_HEAD_DIM(ATTNKERN_DECLARE_DECODE, __half)
ATTNKERN_FOR_EACH_DECODE_HEAD_DIM(ATTNKERN_DECLARE_DECODE, __nv_bfloat16)

}  // namespace cuda
}  // namespace attnkern
