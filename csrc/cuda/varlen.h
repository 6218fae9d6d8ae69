// Packed variable-length batches in the CUDA kernels (params.h: cu_seqlens_q/k), FlashAttention's varlen
// scheme: one launch over (tiles of the longest sequence, heads, sequences); each block reads its
// sequence's offsets and narrows its copy of the params to that sequence's own (1, Hq, L_b, S_b) problem
// on the sequence's rows of the packed tensors, so the kernels' tiling, band and score modifications
// apply unchanged and no tile reads another sequence's keys. A block past its sequence's length returns
// at once. For a padded batch (cu_seqlens_q null) nothing changes.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "../params.h"

namespace attnkern {
namespace cuda {

template <typename P>
__device__ __forceinline__ P* skip(P* ptr, int64_t elems, int64_t elem_bytes) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return ptr ? reinterpret_cast<P*>(reinterpret_cast<Byte*>(ptr) + elems * elem_bytes) : ptr;
}

// Narrows p to the block's batch entry and returns its batch index: blockIdx.z for a padded batch (p
// unchanged); for a packed one, sequence blockIdx.z becomes batch 0 of p (its tensors start at its first
// tokens, lse and stats at its first row) and `tok0` is set to its first query token, by which the caller
// advances its (Hq, Tq) scratch (the backward's delta). T: the element type of q, k, v and their kin.
// kPacked false: the caller's variant never runs a packed batch (one with a user mask: varlen has none),
// and carries none of this (registers).
template <typename T, bool kPacked = true>
__device__ __forceinline__ int64_t enter_batch(AttentionParams& p, int64_t& tok0) {
  tok0 = 0;
  if (!kPacked || !p.cu_seqlens_q) return blockIdx.z;
  const int64_t seq = blockIdx.z;
  const int64_t q0 = p.cu_seqlens_q[seq], k0 = p.cu_seqlens_k[seq];
  p.L = p.cu_seqlens_q[seq + 1] - q0;
  p.S = p.cu_seqlens_k[seq + 1] - k0;
  p.B = 1;
  constexpr int64_t kT = sizeof(T), kF = sizeof(float);
  p.q = skip(p.q, q0 * p.q_st.l, kT);
  p.out = skip(p.out, q0 * p.out_st.l, kT);
  p.out_lo = skip(p.out_lo, q0 * p.out_lo_st.l, kT);
  p.dout = skip(p.dout, q0 * p.dout_st.l, kT);
  p.dq = skip(p.dq, q0 * p.dq_st.l, kT);
  p.k = skip(p.k, k0 * p.k_st.l, kT);
  p.v = skip(p.v, k0 * p.v_st.l, kT);
  p.dk = skip(p.dk, k0 * p.dk_st.l, kT);
  p.dv = skip(p.dv, k0 * p.dv_st.l, kT);
  p.dkv_parts = skip(p.dkv_parts, k0 * (p.E + p.Ev), kF);  // rows of the packed key tokens
  p.lse = skip(p.lse, q0, kF);
  p.stats = skip(p.stats, 2 * q0, kF);
  p.dlse = skip(p.dlse, q0 * p.dlse_st.l, kF);
  p.alibi = p.alibi ? p.alibi + seq * p.alibi_st_b : p.alibi;
  // The sequence's dropout stream: rng offset + its index in the whole call (a launch over a slice of the
  // sequences starts at batch_base), its own problem's batch 0.
  p.rng_offset_add = p.batch_base + seq;
  p.batch_base = 0;
  p.set_band_offsets();
  tok0 = q0;
  return 0;
}

}  // namespace cuda
}  // namespace attnkern
