// Launch templates: the tile configuration of each (dtype, head dim) and the kernel launches.
// Included only by the instantiation units in inst/ (one per dtype, head dim and direction, and one per
// dtype and head dim for the score modifications), which explicitly instantiate run_attention_fwd /
// run_attention_bwd, or run_attention_fwd_mods / run_attention_bwd_mods, for their pair.
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

// Forward: kBlockN keys per tile, 4 warps of 32 query rows (128 per CTA; each K/V fragment loaded from
// shared memory serves two m16 row tiles) up to head dim 128, of 16 rows above. The output accumulators
// (head_dim / 2 floats per thread and row tile) and the scores must fit in registers: key tiles of 64
// up to head dim 64, then 32 (128 x 64 at head dim 128 spilled 308 B).
template <typename T, int HD>
struct FwdConfig {
  using Traits = FwdTraits<HD, (HD <= 64 ? 64 : 32), 4, T, (HD <= 128 ? 2 : 1)>;
  // With a user mask (and any window): key tiles of 32; 32 rows per warp up to head dim 96 (at 128 the
  // mask reads' registers spilled 4 B on sm_80).
  using MaskedWindow = FwdTraits<HD, 32, 4, T, (HD <= 96 ? 2 : 1)>;
  // The kMods variant (soft-capping, ALiBi, dropout, with any mask and band): the capping and the dropout
  // draws need registers of their own, so key tiles of 64 up to head dim 96, 32 to 160, then 16.
  using Mods = FwdTraits<HD, (HD <= 96 ? 64 : (HD <= 160 ? 32 : 16)), 4, T>;
};

// dK/dV: 4 warps (64 keys per CTA), query tiles of 64 rows up to head dim 64, else 32 (16 over head
// dim 192); head dims over 128 split dK/dV across two CTAs (each recomputing S and dP) so the dK and dV
// accumulators fit in registers. dQ: 4 warps of 32 rows (128 per CTA) up to head dim 96, and at 128 with
// a user mask (the plain kernel, which also serves packed batches, spilled 28-32 B with 32 rows there),
// else of 16; key tiles of 32 (16 at 256). dMask: 4 warps of 16 rows, key tiles of 64 up to head dim
// 64, else 32 (16 over head dim 192). Head dim 256 takes the 16-row tiles so that its backward fits the
// 99 KB of shared memory of sm_86/sm_89 (with 32 it needed 129 KB: no launch there).
template <typename T, int HD>
struct BwdConfig {
  static constexpr int kTile = HD <= 64 ? 64 : (HD <= 192 ? 32 : 16);
  using DkDv = BwdTraits<HD, kTile, 4, (HD <= 128 ? 1 : 2), T>;
  // With a user mask the per-element mask reads need registers too: query tiles of at most 32 rows, 16
  // at head dim 128 (there 32 rows spilled without the column split, and the split computed S and dP
  // in both CTAs: 1.5x the products, 2 exps per score).
  using DkDvMasked = BwdTraits<HD, (HD == 128 ? 16 : (kTile < 32 ? kTile : 32)), 4, (HD <= 128 ? 1 : 2), T>;
  static constexpr int kDqTile = kTile < 32 ? kTile : 32;
  using Dq = DqTraits<HD, kDqTile, 4, T, (HD <= 96 ? 2 : 1)>;
  using DqMasked = DqTraits<HD, kDqTile, 4, T, (HD <= 128 ? 2 : 1)>;
  using Dm = DqTraits<HD, kTile, 4, T>;
  // The kMods variants (soft-capping, ALiBi, dropout, with any mask and band): the masked tiling, with
  // tiles of 16 from head dim 192 on (dK/dV's query tiles at 128 too, without the column split), and
  // key tiles of 32 for dQ and dMask at head dim 32.
  static constexpr int kModsTile = HD <= 32 ? 32 : (HD <= 64 ? 64 : (HD < 192 ? 32 : 16));
  using DkDvMods = BwdTraits<HD, (HD == 128 ? 16 : (kModsTile < 32 ? kModsTile : 32)), 4, (HD <= 128 ? 1 : 2), T>;
  using DqMods = DqTraits<HD, kModsTile, 4, T>;
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

// Grid limits. Every launch puts its tiles on x (2^31 - 1 blocks), heads on y and batches (or mask
// slices) on z, which hold 65535 each: the backend declines more than 65535 heads, and a launch over
// more batches than z holds runs as several, each on a slice of the batch. A slice is an ordinary
// smaller problem (per-batch pointers advanced), so the kernels carry no index arithmetic for it:
// decoding batch and head from grid x instead cost the forward and dK/dV passes registers they have not got.
inline const void* advance(const void* ptr, int64_t elems, size_t elem_bytes) {
  return ptr ? static_cast<const char*>(ptr) + elems * int64_t(elem_bytes) : ptr;
}
inline void* advance(void* ptr, int64_t elems, size_t elem_bytes) {
  return ptr ? static_cast<char*>(ptr) + elems * int64_t(elem_bytes) : ptr;
}

inline size_t mask_elem_bytes(const AttentionParams& p) {
  if (p.mask_kind == MaskKind::kBool) return 1;
  switch (p.mask_elem) {
    case MaskElem::kFloat64: return 8;
    case MaskElem::kFloat16:
    case MaskElem::kBFloat16: return 2;
    default: return 4;
  }
}

// p restricted to batches [b0, b0 + n). lse, stats, delta (B, Hq, L[, 2]) and dmask (Bm, Hm, Lm, Sm) are
// contiguous float32; a mask broadcast over the batch (Bm == 1, stride 0) stays whole.
// A packed batch (p.cu_seqlens_q) is sliced by its offsets: its tensors stay whole (its blocks find their
// rows through the offsets).
template <typename T>
AttentionParams batch_slice(const AttentionParams& p, int64_t b0, int64_t n) {
  AttentionParams s = p;
  s.B = n;
  if (p.cu_seqlens_q) {
    s.cu_seqlens_q = p.cu_seqlens_q + b0, s.cu_seqlens_k = p.cu_seqlens_k + b0;
    s.alibi = p.alibi ? p.alibi + b0 * p.alibi_st_b : nullptr;
    s.batch_base = p.batch_base + b0;  // the dropout streams of sequence b0 onwards
    return s;
  }
  s.q = advance(p.q, b0 * p.q_st.b, sizeof(T));
  s.k = advance(p.k, b0 * p.k_st.b, sizeof(T));
  s.v = advance(p.v, b0 * p.v_st.b, sizeof(T));
  s.out = advance(p.out, b0 * p.out_st.b, sizeof(T));
  s.out_lo = advance(p.out_lo, b0 * p.out_lo_st.b, sizeof(T));
  s.lse = advance(p.lse, b0 * p.Hq * p.L, sizeof(float));
  s.stats = advance(p.stats, b0 * p.Hq * p.L * 2, sizeof(float));
  s.dout = advance(p.dout, b0 * p.dout_st.b, sizeof(T));
  s.dlse = advance(p.dlse, b0 * p.dlse_st.b, sizeof(float));
  s.dq = advance(p.dq, b0 * p.dq_st.b, sizeof(T));
  s.dk = advance(p.dk, b0 * p.dk_st.b, sizeof(T));
  s.dv = advance(p.dv, b0 * p.dv_st.b, sizeof(T));
  s.dkv_parts = p.dkv_parts ? p.dkv_parts + b0 * p.S * (p.E + p.Ev) : nullptr;  // rows b * S + j
  s.alibi = p.alibi ? p.alibi + b0 * p.alibi_st_b : nullptr;
  s.batch_base = p.batch_base + b0;  // the dropout mask of batch b0 onwards
  if (p.Bm > 1) {
    s.Bm = n;
    s.mask = advance(p.mask, b0 * p.mask_st.b, mask_elem_bytes(p));
    s.dmask = advance(p.dmask, b0 * p.Hm * p.Lm * p.Sm, sizeof(float));
  }
  s.mask_map = p.mask_map ? p.mask_map + b0 * p.map_st.b : nullptr;  // map_st.b is 0 on a broadcast batch
  return s;
}

// launch(slice, delta of the slice) for consecutive batch slices of at most `per_launch` batches.
template <typename T, typename Launch>
cudaError_t for_batch_slices(const AttentionParams& p, float* delta, int64_t per_launch, Launch launch) {
  if (p.B <= per_launch) return launch(p, delta);
  for (int64_t b0 = 0; b0 < p.B; b0 += per_launch) {
    const int64_t n = p.B - b0 < per_launch ? p.B - b0 : per_launch;
    // A packed batch's delta is (Hq, Tq): whole, like its other tensors.
    const cudaError_t err = launch(batch_slice<T>(p, b0, n), delta && !p.cu_seqlens_q ? delta + b0 * p.Hq * p.L : delta);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// One forward launch of `kernel` (tiles of Traits), over batch slices as grid z allows.
template <typename T, typename Traits, typename Kernel>
cudaError_t launch_fwd(Kernel kernel, const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = allow_smem(kernel, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  if (p.L * p.Hq * p.B == 0) return cudaSuccess;  // nothing to compute (a launch would fail)
  return for_batch_slices<T>(p, nullptr, max_grid_yz(), [&](const AttentionParams& s, float*) {
    const dim3 grid(unsigned((s.L + Traits::kBlockM - 1) / Traits::kBlockM), unsigned(s.Hq), unsigned(s.B));
    ATTNKERN_LAUNCH(kernel, grid, Traits::kThreads, Traits::kSmemBytes, stream)(s);
    return cudaGetLastError();
  });
}

// Problems with score modifications: one general kernel (mods.h) with any mask and band.
template <typename T, int HD>
cudaError_t run_attention_fwd_mods(const AttentionParams& p, cudaStream_t stream) {
  using Mods = typename FwdConfig<T, HD>::Mods;
  return launch_fwd<T, Mods>(attention_fwd_kernel<Mods, true, true, true>, p, stream);
}

template <typename T, int HD>
cudaError_t run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  // A packed batch (p.cu_seqlens_q) with a sliding window runs on the general kernel too: the window
  // kernel has no registers left for a sequence's bounds (at head dim 128 they spilled 28 bytes).
  if (p.has_mods() || (p.cu_seqlens_q && p.has_left)) return run_attention_fwd_mods<T, HD>(p, stream);
  using Traits = typename FwdConfig<T, HD>::Traits;
  using MaskedWindow = typename FwdConfig<T, HD>::MaskedWindow;
  // Four kernels: with and without the user-mask reads, with and without a window's left bound (each
  // costs registers the others keep).
  const bool has_mask = p.mask_kind != MaskKind::kNone;
  if (has_mask && p.has_left) return launch_fwd<T, MaskedWindow>(attention_fwd_kernel<MaskedWindow, true, true>, p, stream);
  if (has_mask) return launch_fwd<T, MaskedWindow>(attention_fwd_kernel<MaskedWindow, true, false>, p, stream);
  if (p.has_left) return launch_fwd<T, Traits>(attention_fwd_kernel<Traits, false, true>, p, stream);
  return launch_fwd<T, Traits>(attention_fwd_kernel<Traits, false, false>, p, stream);
}

// The dK/dV pass: kv_parts CTAs per (key block, kv head) on grid y, then, with a split group, the sum of
// the parts into dK and dV.
template <typename Traits, bool kHasMask, bool kLeft, bool kMods = false>
cudaError_t launch_dkdv(const AttentionParams& p, const float* delta, cudaStream_t stream) {
  static_assert(Traits::kBlockN == kDkDvBlockKeys, "the op layer's group split counts CTAs of kDkDvBlockKeys");
  auto kernel = attention_bwd_dkdv_kernel<Traits, kHasMask, kLeft, kMods>;
  cudaError_t err = allow_smem(kernel, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((p.S + Traits::kBlockN - 1) / Traits::kBlockN * Traits::kSplit),
                  unsigned(p.Hkv * p.kv_parts), unsigned(p.B));
  ATTNKERN_LAUNCH(kernel, grid, Traits::kThreads, Traits::kSmemBytes, stream)(p, delta);
  if ((err = cudaGetLastError()) != cudaSuccess || p.kv_parts == 1) return err;
  using T = typename Traits::T;
  const dim3 grid_sum(unsigned((p.S + kSumKeys - 1) / kSumKeys), unsigned(p.Hkv), unsigned(p.B));
  ATTNKERN_LAUNCH(attention_bwd_sum_kv_parts_kernel<T>, grid_sum, 128, 0, stream)(p);
  return cudaGetLastError();
}

// The backward's passes: preprocess, dK/dV (dkdv(slice, delta)), dQ (kernel dq, tiles of Dq) and, for a
// float mask that requires grad, dMask (kernel dm, tiles of Dm).
template <typename T, typename Dq, typename Dm, typename DkDvLaunch, typename DqKernel, typename DmKernel>
cudaError_t launch_bwd(const AttentionParams& p, float* delta, cudaStream_t stream, DkDvLaunch dkdv, DqKernel dq,
                       DmKernel dm) {
  if (p.B * p.Hq == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  constexpr int kRowsPerBlock = 8;  // preprocess: one warp per row
  // Preprocess, dK/dV and dQ: heads (or kv heads) on grid y, batches on z, sliced as z allows.
  err = for_batch_slices<T>(p, delta, max_grid_yz(), [&](const AttentionParams& s, float* d) {
    cudaError_t e = cudaSuccess;
    if (s.L > 0) {
      const dim3 grid_pre(unsigned((s.L + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(s.Hq), unsigned(s.B));
      ATTNKERN_LAUNCH(attention_bwd_preprocess_kernel<T>, grid_pre, kRowsPerBlock * 32, 0, stream)(s, d);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    if (s.S > 0) {  // with no query rows it writes zeros
      if ((e = dkdv(s, d)) != cudaSuccess) return e;
    }
    if (s.L > 0) {  // with no keys it writes zeros
      if ((e = allow_smem(dq, Dq::kSmemBytes)) != cudaSuccess) return e;
      const dim3 grid_q(unsigned((s.L + Dq::kBlockM - 1) / Dq::kBlockM), unsigned(s.Hq), unsigned(s.B));
      ATTNKERN_LAUNCH(dq, grid_q, Dq::kThreads, Dq::kSmemBytes, stream)(s, d);
      e = cudaGetLastError();
    }
    return e;
  });
  if (err != cudaSuccess) return err;
  if (p.dmask && p.L > 0 && p.S > 0) {
    // dMask: Bm * Hm mask slices on grid z. A mask shared by the batch (Bm == 1) is summed over it inside
    // the kernel: one launch over the whole batch; a per-batch mask (Bm == B) is sliced with the batch.
    if ((err = allow_smem(dm, Dm::kSmemBytes)) != cudaSuccess) return err;
    const int64_t per_launch = p.Bm > 1 ? max_grid_yz() / p.Hm : p.B;
    if (per_launch < 1) return cudaErrorInvalidConfiguration;  // more mask heads than grid z holds (declined)
    err = for_batch_slices<T>(p, delta, per_launch, [&](const AttentionParams& s, float* d) {
      const bool sum_l = s.Lm == 1 && s.L > 1, sum_s = s.Sm == 1 && s.S > 1;
      const dim3 grid_m(sum_l ? 1u : unsigned((s.L + Dm::kBlockM - 1) / Dm::kBlockM),
                        sum_s ? 1u : unsigned((s.S + Dm::kBlockN - 1) / Dm::kBlockN), unsigned(s.Bm * s.Hm));
      ATTNKERN_LAUNCH(dm, grid_m, Dm::kThreads, Dm::kSmemBytes, stream)(s, d, static_cast<float*>(s.dmask));
      return cudaGetLastError();
    });
  }
  return err;
}

// Problems with score modifications: the general kernels (mods.h) with any mask and band.
template <typename T, int HD>
cudaError_t run_attention_bwd_mods(const AttentionParams& p, float* delta, cudaStream_t stream) {
  using DkDv = typename BwdConfig<T, HD>::DkDvMods;
  using Dq = typename BwdConfig<T, HD>::DqMods;
  auto dkdv = [&](const AttentionParams& s, const float* d) { return launch_dkdv<DkDv, true, true, true>(s, d, stream); };
  return launch_bwd<T, Dq, Dq>(p, delta, stream, dkdv, attention_bwd_dq_kernel<Dq, true, true>,
                               attention_bwd_dmask_kernel<Dq, true>);
}

template <typename T, int HD>
cudaError_t run_attention_bwd(const AttentionParams& p, float* delta, cudaStream_t stream) {
  if (p.has_mods()) return run_attention_bwd_mods<T, HD>(p, delta, stream);  // in the mods_hdim* units
  using DkDv = typename BwdConfig<T, HD>::DkDv;
  using DkDvMasked = typename BwdConfig<T, HD>::DkDvMasked;
  using Dq = typename BwdConfig<T, HD>::Dq;
  using DqMasked = typename BwdConfig<T, HD>::DqMasked;
  const bool has_mask = p.mask_kind != MaskKind::kNone;
  // A user mask or a window's left bound costs the per-element reads/compares registers: those launches
  // take the masked tiling (the column split above head dim 128).
  auto dkdv = [&](const AttentionParams& s, const float* d) {
    return has_mask ? launch_dkdv<DkDvMasked, true, true>(s, d, stream)
           : s.has_left ? launch_dkdv<DkDvMasked, false, true>(s, d, stream)
                        : launch_dkdv<DkDv, false, false>(s, d, stream);
  };
  using Dm = typename BwdConfig<T, HD>::Dm;
  if (has_mask) return launch_bwd<T, DqMasked, Dm>(p, delta, stream, dkdv, attention_bwd_dq_kernel<DqMasked, true>,
                                                   attention_bwd_dmask_kernel<Dm>);
  return launch_bwd<T, Dq, Dm>(p, delta, stream, dkdv, attention_bwd_dq_kernel<Dq, false>,
                               attention_bwd_dmask_kernel<Dm>);
}

}  // namespace cuda
}  // namespace attnkern
