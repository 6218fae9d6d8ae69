// Scaling and masking of score fragments: the user mask, the causal diagonal and the key bound.
#pragma once

#include <math.h>
#include <stdint.h>

#include "../params.h"
#include "ptx.h"
#include "tile.h"

namespace attnkern {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

// The user mask of one (batch, head), read element by element from global memory through its
// strides (broadcast dims have stride 0). Returns what to add to a score: 0 or -inf for a bool mask,
// the value for a float mask.
struct MaskReader {
  const void* base;
  MaskKind kind;
  MaskElem elem;
  int64_t stride_l, stride_s;

  __device__ __forceinline__ MaskReader(const AttentionParams& p, int64_t b, int64_t h)
      : base(p.mask_kind == MaskKind::kNone
                 ? nullptr
                 : static_cast<const char*>(p.mask) +
                       (b * p.mask_st.b + h * p.mask_st.h) * (p.mask_kind == MaskKind::kBool ? 1 : elem_bytes(p.mask_elem))),
        kind(p.mask_kind),
        elem(p.mask_elem),
        stride_l(p.mask_st.l),
        stride_s(p.mask_st.e) {}

  __device__ __forceinline__ static int64_t elem_bytes(MaskElem e) {
    return e == MaskElem::kFloat64 ? 8 : (e == MaskElem::kFloat32 ? 4 : 2);
  }

  __device__ __forceinline__ float at(int64_t i, int64_t j) const {
    const int64_t off = i * stride_l + j * stride_s;
    if (kind == MaskKind::kBool) return static_cast<const uint8_t*>(base)[off] ? 0.f : kNegInf;
    switch (elem) {
      case MaskElem::kFloat32: return static_cast<const float*>(base)[off];
      case MaskElem::kFloat64: return static_cast<float>(static_cast<const double*>(base)[off]);
      case MaskElem::kFloat16: return __half2float(static_cast<const __half*>(base)[off]);
      default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
    }
  }
};

// The keys a block of query rows [m0, m0 + rows) sees: [0, end); the keys every one of its rows
// sees: [0, full) (tiles past `full` need per-element causal masking).
struct KeyRange {
  int end, full;
  __device__ __forceinline__ KeyRange(const AttentionParams& p, int64_t m0, int rows) : end(int(p.S)), full(int(p.S)) {
    if (p.causal != Causal::kNone) {
      end = int(min(max(m0 + rows + p.causal_offset, int64_t(0)), p.S));
      full = int(min(max(m0 + p.causal_offset + 1, int64_t(0)), p.S));
    }
  }
};

// Keys [n0, n0 + KVTile::kRows) of one kv head's K and V (k, v: its first rows) into a K and a V tile;
// keys >= n_end read as zero. cp.async: the caller commits and waits.
template <typename KVTile, int kThreads, int kHD, typename T>
__device__ __forceinline__ void load_kv_async(T* sK, T* sV, const T* k, const T* v, const AttentionParams& p,
                                              int64_t n0, int64_t n_end, int tid) {
  load_tile_async<KVTile, kThreads, kHD>(sK, k + n0 * p.k_st.l, p.k_st.l, int(n_end - n0), int(p.E), tid);
  load_tile_async<KVTile, kThreads, kHD>(sV, v + n0 * p.v_st.l, p.v_st.l, int(n_end - n0), int(p.Ev), tid);
}

// One score element: scale it, add the mask, and send it to -inf where the key is out of range or
// past the causal diagonal. (i, j): query row and key column, absolute. kHasMask is a template
// argument so that kernels without a user mask carry none of the mask-reading code (registers).
template <bool kHasMask>
__device__ __forceinline__ float mask_score(float s, int64_t i, int64_t j, const AttentionParams& p,
                                           const MaskReader& mask, bool check) {
  float x = s * static_cast<float>(p.scale);
  if (!check) return x;
  if (j >= p.S || (p.causal != Causal::kNone && j > i + p.causal_offset)) return kNegInf;
  if (kHasMask && i < p.L) x += mask.at(i, j);
  return x;
}

}  // namespace cuda
}  // namespace attnkern
