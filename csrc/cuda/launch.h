// Launch templates: the tile configuration of each (dtype, head dim) and the kernel launches.
// Included only by the instantiation units in inst/ (one per dtype, head dim and direction), which
// explicitly instantiate run_attention_fwd / run_attention_bwd for their pair.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <utility>

#include "bwd_kernel.h"
#include "dispatch.h"
#include "fwd_kernel.h"

namespace attnkern {
namespace cuda {

// Forward: kBlockN keys per tile, 4 warps (64 query rows per CTA). Larger head dims take smaller key
// tiles so the output accumulators (head_dim / 2 floats per thread) and scores fit in registers.
template <typename T, int HD>
struct FwdConfig {
  using Traits = FwdTraits<HD, (HD <= 64 ? 128 : (HD <= 128 ? 64 : 32)), 4, T>;
};

// dK/dV: 4 warps (64 keys per CTA), query tiles of 64 rows up to head dim 64, else 32 (16 over head
// dim 192); head dims over 128 split dK/dV across two CTAs (each recomputing S and dP) so the dK and dV
// accumulators fit in registers. dQ and dMask: 4 warps (64 rows), key tiles of 64 up to head dim 64,
// else 32 (16 over head dim 192). Head dim 256 takes the 16-row tiles so that its backward fits the
// 99 KB of shared memory of sm_86/sm_89 (with 32 it needed 129 KB: no launch there).
template <typename T, int HD>
struct BwdConfig {
  static constexpr int kTile = HD <= 64 ? 64 : (HD <= 192 ? 32 : 16);
  using DkDv = BwdTraits<HD, kTile, 4, (HD <= 128 ? 1 : 2), T>;
  // With a user mask the per-element mask reads need registers too: query tiles of at most 32 rows,
  // and the column split from head dim 128 on.
  using DkDvMasked = BwdTraits<HD, (kTile < 32 ? kTile : 32), 4, (HD < 128 ? 1 : 2), T>;
  using Dq = DqTraits<HD, kTile, 4, T>;
};

// The opt-in to more than 48 KB of dynamic shared memory. The attribute stays set, and setting it is a
// driver call: once per (device, kernel), not on every launch.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::set<std::pair<int, const void*>> done;
  const std::pair<int, const void*> key(device, reinterpret_cast<const void*>(kernel));
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.insert(key);
  return err;
}

template <typename T, int HD>
cudaError_t run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Traits = typename FwdConfig<T, HD>::Traits;
  // Two kernels: with and without the user-mask reads (the maskless one keeps fewer registers).
  const bool has_mask = p.mask_kind != MaskKind::kNone;
  auto kernel = has_mask ? attention_fwd_kernel<Traits, true> : attention_fwd_kernel<Traits, false>;
  cudaError_t err = allow_smem(kernel, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((p.L + Traits::kBlockM - 1) / Traits::kBlockM), unsigned(p.Hq), unsigned(p.B));
  if (grid.x * grid.y * grid.z == 0) return cudaSuccess;  // nothing to compute (a launch would fail)
  ATTNKERN_LAUNCH(kernel, grid, Traits::kThreads, Traits::kSmemBytes, stream)(p);
  return cudaGetLastError();
}

template <typename Traits, bool kHasMask>
cudaError_t launch_dkdv(const AttentionParams& p, const float* delta, cudaStream_t stream) {
  auto kernel = attention_bwd_dkdv_kernel<Traits, kHasMask>;
  cudaError_t err = allow_smem(kernel, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((p.S + Traits::kBlockN - 1) / Traits::kBlockN * Traits::kSplit), unsigned(p.Hkv),
                  unsigned(p.B));
  ATTNKERN_LAUNCH(kernel, grid, Traits::kThreads, Traits::kSmemBytes, stream)(p, delta);
  return cudaGetLastError();
}

template <typename T, int HD>
cudaError_t run_attention_bwd(const AttentionParams& p, float* delta, cudaStream_t stream) {
  using DkDv = typename BwdConfig<T, HD>::DkDv;
  using Dq = typename BwdConfig<T, HD>::Dq;
  if (p.B * p.Hq == 0) return cudaSuccess;
  const bool has_mask = p.mask_kind != MaskKind::kNone;
  cudaError_t err = cudaSuccess;
  constexpr int kRowsPerBlock = 8;  // preprocess: one warp per row
  if (p.L > 0) {
    const dim3 grid_pre(unsigned((p.L + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(p.Hq), unsigned(p.B));
    ATTNKERN_LAUNCH(attention_bwd_preprocess_kernel<T>, grid_pre, kRowsPerBlock * 32, 0, stream)(p, delta);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  if (p.S > 0) {  // with no query rows it writes zeros
    err = has_mask ? launch_dkdv<typename BwdConfig<T, HD>::DkDvMasked, true>(p, delta, stream)
                   : launch_dkdv<DkDv, false>(p, delta, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.L > 0) {  // with no keys it writes zeros
    auto dq = has_mask ? attention_bwd_dq_kernel<Dq, true> : attention_bwd_dq_kernel<Dq, false>;
    if ((err = allow_smem(dq, Dq::kSmemBytes)) != cudaSuccess) return err;
    const dim3 grid_q(unsigned((p.L + Dq::kBlockM - 1) / Dq::kBlockM), unsigned(p.Hq), unsigned(p.B));
    ATTNKERN_LAUNCH(dq, grid_q, Dq::kThreads, Dq::kSmemBytes, stream)(p, delta);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.dmask && p.L > 0 && p.S > 0) {
    auto dm = attention_bwd_dmask_kernel<Dq>;
    if ((err = allow_smem(dm, Dq::kSmemBytes)) != cudaSuccess) return err;
    const bool sum_l = p.Lm == 1 && p.L > 1, sum_s = p.Sm == 1 && p.S > 1;
    const dim3 grid_m(sum_l ? 1u : unsigned((p.L + Dq::kBlockM - 1) / Dq::kBlockM),
                      sum_s ? 1u : unsigned((p.S + Dq::kBlockN - 1) / Dq::kBlockN), unsigned(p.Bm * p.Hm));
    ATTNKERN_LAUNCH(dm, grid_m, Dq::kThreads, Dq::kSmemBytes, stream)(p, delta, static_cast<float*>(p.dmask));
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cuda
}  // namespace attnkern
