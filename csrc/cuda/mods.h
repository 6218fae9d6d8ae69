// Score modifications in the CUDA kernels (attnkern/score_mods.py): soft-capping and ALiBi on the scaled
// scores, before the masks; dropout on the probabilities, after the softmax statistics.
//
// Only the kMods variants of the kernels (template flag; launched when p.has_mods()) include this code,
// so the plain kernels keep their registers. Inside a kMods kernel each modification is switched on at
// run time by its parameter.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "../params.h"
#include "../philox.h"
#include "mask.h"

namespace attnkern {
namespace cuda {

// The modifications of one (batch, query head).
struct ScoreModsState {
  float softcap, inv_softcap;  // softcap 0: no capping
  float slope;                 // ALiBi slope of this head, 0 without ALiBi
  int64_t alibi_offset;        // S - L: the ALiBi distance is |i + S - L - j|
  bool dropout;
  uint32_t threshold;  // a score is kept iff its draw >= threshold
  float drop_scale;    // what a kept probability is multiplied by
  DropoutKey key;
  int64_t bh;  // b * Hq + h of the whole problem (a launch over a batch slice starts at p.batch_base)

  __device__ __forceinline__ ScoreModsState(const AttentionParams& p, int64_t b, int64_t h)
      : softcap(float(p.softcap)),
        inv_softcap(p.softcap > 0.0 ? float(1.0 / p.softcap) : 0.f),
        slope(p.alibi ? p.alibi[b * p.alibi_st_b + h] : 0.f),
        alibi_offset(p.S - p.L),
        dropout(p.dropout_p > 0.0),
        threshold(p.dropout_threshold),
        drop_scale(p.dropout_scale),
        key(p.dropout_p > 0.0 ? dropout_key(p.rng[0], p.rng[1] + p.rng_offset_add) : DropoutKey{}),
        bh((p.batch_base + b) * p.Hq + h) {}

  // The capped score of scaled score x, and T = tanh(x / softcap) (1 - T^2 is the cap's derivative;
  // T = 0 without capping).
  __device__ __forceinline__ float cap(float x, float& tanh_out) const {
    if (softcap > 0.f) {
      tanh_out = tanhf(x * inv_softcap);
      return softcap * tanh_out;
    }
    tanh_out = 0.f;
    return x;
  }

  // The scaled score x of query row i, key j (absolute) after capping and the ALiBi bias.
  __device__ __forceinline__ float apply(float x, int64_t i, int64_t j, float& tanh_out) const {
    x = cap(x, tanh_out);
    if (slope != 0.f) {
      const int64_t d = i + alibi_offset - j;
      x -= slope * float(d < 0 ? -d : d);
    }
    return x;
  }

  // The dropout multipliers of row i, keys j and j + 1 (j even: one Philox call serves both).
  __device__ __forceinline__ void dropout_pair(int64_t i, int64_t j, float& z0, float& z1) const {
    const Philox4 d = dropout_draws4(key, bh, i, j >> 2);
    const bool hi = (j & 2) != 0;
    z0 = (hi ? d.x[2] : d.x[0]) >= threshold ? drop_scale : 0.f;
    z1 = (hi ? d.x[3] : d.x[1]) >= threshold ? drop_scale : 0.f;
  }

  // The dropout multiplier of row i, key j.
  __device__ __forceinline__ float dropout_one(int64_t i, int64_t j) const {
    const Philox4 d = dropout_draws4(key, bh, i, j >> 2);
    const uint32_t lane = uint32_t(j & 3);
    const uint32_t r = lane == 0 ? d.x[0] : (lane == 1 ? d.x[1] : (lane == 2 ? d.x[2] : d.x[3]));
    return r >= threshold ? drop_scale : 0.f;
  }
};

// What the plain kernels hold instead: nothing.
struct NoScoreMods {
  __device__ __forceinline__ NoScoreMods(const AttentionParams&, int64_t, int64_t) {}
};

template <bool kMods>
using ScoreModsOf = std::conditional_t<kMods, ScoreModsState, NoScoreMods>;

// One score element of a kMods kernel: scale, cap, ALiBi, then the user mask (present or not: read at
// run time here), the band (left bound included) and the key bound as mask_scaled (kRowBound: see there).
// tanh_out: see cap().
template <bool kRowBound = false>
__device__ __forceinline__ float mods_mask_score(float s, int64_t i, int64_t j, const AttentionParams& p,
                                                 const MaskReader& mask, const ScoreModsState& mods,
                                                 float& tanh_out) {
  const float x = mods.apply(s * static_cast<float>(p.scale), i, j, tanh_out);
  return mask.base ? mask_scaled<true, true, kRowBound>(x, i, j, p, mask, true)
                   : mask_scaled<false, true, kRowBound>(x, i, j, p, mask, true);
}

}  // namespace cuda
}  // namespace attnkern
