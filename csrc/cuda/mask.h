// Scaling and masking of score fragments: the user mask, the band (causal, window) and the key bound.
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
// strides (broadcast dims have stride 0). apply() gives the masked score; at() what is added to it:
// 0 or -inf for a bool mask, the value for a float mask.
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

  // The score x with the mask applied at (i, j): a bool mask replaces a hidden score by -inf (so a NaN
  // score there is hidden too, as torch's masked_fill), a float mask is added.
  __device__ __forceinline__ float apply(float x, int64_t i, int64_t j) const {
    const float a = at(i, j);
    return kind == MaskKind::kBool && a != 0.f ? kNegInf : x + a;
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

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return min(max(x, lo), hi); }

// The key tiles a block of query rows [m0, m0 + rows) visits: `tile` keys each from `begin` (a multiple of
// `tile`) to `end`. Tiles inside [full_begin, full_end), keys every row sees, need no per-element band
// compare (check()). kLeft: whether the band may have a left bound (a window); without one, begin and
// full_begin are the constant 0 and cost no register.
template <bool kLeft>
struct KeyRange {
  int begin, end, full_begin, full_end;
  __device__ __forceinline__ KeyRange(const AttentionParams& p, int64_t m0, int rows, int tile)
      : begin(0), end(int(p.S)), full_begin(0), full_end(int(p.S)) {
    const int64_t last = m0 + rows - 1;
    if (p.has_right) {
      end = int(clamp64(last + p.band_hi + 1, 0, p.S));
      full_end = int(clamp64(m0 + p.band_hi + 1, 0, p.S));
    }
    if (kLeft && p.has_left) {
      begin = int(clamp64(m0 + p.band_lo, 0, p.S)) / tile * tile;
      full_begin = int(clamp64(last + p.band_lo, 0, p.S));
    }
  }
  __device__ __forceinline__ bool check(const AttentionParams& p, int n0, int n) const {
    return p.has_right && n0 + n > full_end || kLeft && p.has_left && n0 < full_begin;
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
// outside the band. (i, j): query row and key column, absolute. kHasMask is a template argument so that
// kernels without a user mask carry none of the mask-reading code (registers); kLeft likewise drops the
// band's left bound for the one launch that cannot have it (the dK/dV pass without a window, whose
// registers at head dim 128 are exactly used up).
// mask_scaled does the same to a score already scaled (and modified: mods.h).
// read_mask false: a tile the mask's block map shows unchanged by the mask (no element read).
// kRowBound: rows past L (a tile's padding rows, whose P the dK/dV pass sums over) see no key, so that
// a NaN key a mask or window hides cannot reach its dK/dV through them; the forward and dQ never use
// those rows, and the plain dK/dV pass (no mask, no window) keeps its registers (4 B of spill at head
// dim 128 with the compare).
template <bool kHasMask, bool kLeft = true, bool kRowBound = false>
__device__ __forceinline__ float mask_scaled(float x, int64_t i, int64_t j, const AttentionParams& p,
                                            const MaskReader& mask, bool check, bool read_mask = true) {
  if (!check) return x;
  if (j >= p.S || (kRowBound && i >= p.L) || (p.has_right && j > i + p.band_hi)) return kNegInf;
  if (kLeft && p.has_left && j < i + p.band_lo) return kNegInf;
  if (kHasMask && read_mask && (kRowBound || i < p.L)) x = mask.apply(x, i, j);  // no row past the mask
  return x;
}

template <bool kHasMask, bool kLeft = true, bool kRowBound = false>
__device__ __forceinline__ float mask_score(float s, int64_t i, int64_t j, const AttentionParams& p,
                                           const MaskReader& mask, bool check, bool read_mask = true) {
  return mask_scaled<kHasMask, kLeft, kRowBound>(s * static_cast<float>(p.scale), i, j, p, mask, check, read_mask);
}

// The block-map flags (kMapSees | kMapMasks, params.h) of the scores [m0, m0 + kRows) x [n0, n0 + kCols)
// of batch b, query head h: the OR over their 16 x 16 sub-tiles, one lane of each warp reading one
// sub-tile's byte, OR-ed across the warp by shuffles (every warp computes the same, so the CTA takes one
// branch). Without a map: both flags (every tile partial).
template <int kRows, int kCols>
__device__ __forceinline__ int tile_map_flags(const AttentionParams& p, int64_t b, int64_t h, int64_t m0, int64_t n0,
                                              int lane) {
  constexpr int kC = kCols / kMapTile;
  static_assert(kRows % kMapTile == 0 && kCols % kMapTile == 0 && kRows / kMapTile * kC <= 32,
                "one sub-tile per lane");
  if (!p.mask_map) return kMapSees | kMapMasks;
  const int64_t row = m0 / kMapTile + lane / kC, col = n0 / kMapTile + lane % kC;
  int f = 0;
  if (lane < kRows / kMapTile * kC && row * kMapTile < p.L && col * kMapTile < p.S) {
    f = p.mask_map[b * p.map_st.b + h * p.map_st.h + row * p.map_st.l + col * p.map_st.e];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) f |= __shfl_xor_sync(0xffffffffu, f, o);
  return f;
}

}  // namespace cuda
}  // namespace attnkern
