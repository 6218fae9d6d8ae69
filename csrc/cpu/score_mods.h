// Soft-capping, ALiBi and dropout (attnkern/score_mods.py) on rows of a score tile, for the CPU kernels.
//
// The kernels take a compile-time MODS flag: without it none of the per-score code is compiled in, so
// the plain kernels stay as they were; with it, each mod is one branch per row, hoisted out of the
// column loops.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox_avx2.h"
#include "philox_avx512.h"
#include "tile_math.h"

namespace attnkern {
namespace cpu {
namespace {

// tanh over a vector. float on AVX2: Cephes' tanhf scheme (an odd polynomial for |x| <= 0.625, else
// (1 - e) / (1 + e) with e = exp(-2|x|) from exp2_vec; relative error a few 1e-7), several times faster
// than ATen's; NaN stays NaN, +-inf gives +-1. Elsewhere ATen's tanh.
template <typename T>
inline Vec<T> tanh_vec(const Vec<T>& x) {
#ifdef ATTNKERN_AVX2_MICROKERNEL
  if constexpr (std::is_same_v<T, float>) {
    const __m256 v = x;
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 a = _mm256_andnot_ps(sign_bit, v);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 e = exp2_vec<float>(Vec<float>(_mm256_mul_ps(a, _mm256_set1_ps(static_cast<float>(-2.0 * kLog2e)))));
    const __m256 big = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)),
                                    _mm256_and_ps(v, sign_bit));
    const __m256 z = _mm256_mul_ps(v, v);
    __m256 poly = _mm256_set1_ps(-5.70498872745e-3f);
    poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(2.06390887954e-2f));
    poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(-5.37397155531e-2f));
    poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(1.33314422036e-1f));
    poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(-3.33332819422e-1f));
    const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(poly, z), v, v);
    return _mm256_blendv_ps(small, big, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_GT_OQ));
  }
#endif
  return x.tanh();
}

// The mods of one (batch, query head) slice, applied row by row (row qi, keys n0 .. n0 + n).
template <typename acc_t>
struct RowMods {
  bool softcap_on = false, alibi_on = false, dropout_on = false;
  acc_t softcap = 0, inv_softcap = 0;
  acc_t neg_slope = 0;       // -slope of this (batch, head)
  int64_t key_shift = 0;     // S - L: the query's aligned key is qi + S - L
  DropoutKey key;
#ifdef ATTNKERN_AVX2_PHILOX
  PhiloxKeys keys;  // key's round keys, for the vectorized generator
#endif
  bool avx512 = false;       // float multipliers by the AVX-512 generator (philox_avx512.h)
  int64_t bh = 0;            // b * Hq + h: the third counter word
  uint32_t threshold = 0;    // a draw below it drops its score
  acc_t keep_scale = 1;      // 1 / (1 - p), 0 for p = 1

  RowMods(const AttentionParams& p, int64_t b, int64_t h) {
    softcap_on = p.softcap > 0.0;
    alibi_on = p.alibi != nullptr;
    dropout_on = p.dropout_p > 0.0;
    if (softcap_on) softcap = static_cast<acc_t>(p.softcap), inv_softcap = static_cast<acc_t>(1.0 / p.softcap);
    if (alibi_on) neg_slope = -static_cast<acc_t>(p.alibi[b * p.alibi_st_b + h]);
    key_shift = p.S - p.L;
    if (dropout_on) {
      key = dropout_key(p.rng[0], p.rng[1]);  // the rng tensor lives on the CPU here
#ifdef ATTNKERN_AVX2_PHILOX
      keys = PhiloxKeys(key);
#endif
#ifdef ATTNKERN_AVX512_PHILOX
      avx512 = std::is_same_v<acc_t, float> && use_avx512_philox();
#endif
      bh = b * p.Hq + h;
      threshold = p.dropout_threshold;
      // In acc_t from p itself (float64 kernels get 1 / (1 - p) to double precision, as the reference).
      keep_scale = p.dropout_p >= 1.0 ? acc_t(0) : static_cast<acc_t>(1.0 / (1.0 - p.dropout_p));
    }
  }

  // row[0, n) of scaled scores -> capped and biased. With softcap, t[0, n) receives tanh(s / c) (the
  // backward's 1 - t^2) when t is not null. n a multiple of the vector width.
  inline void scores(acc_t* row, acc_t* t, int64_t qi, int64_t n0, int64_t n) const {
    constexpr int64_t V = Vec<acc_t>::size();
    if (softcap_on) {
      const Vec<acc_t> c(softcap), inv(inv_softcap);
      for (int64_t j = 0; j < n; j += V) {
        const Vec<acc_t> th = tanh_vec<acc_t>(Vec<acc_t>::loadu(row + j) * inv);
        if (t) th.store(t + j);
        (th * c).store(row + j);
      }
    }
    if (alibi_on) {
      // dist = |qi + S - L - (n0 + j)| exactly (integers below 2^24 in float).
      const Vec<acc_t> slope(neg_slope), step(static_cast<acc_t>(V));
      Vec<acc_t> dist_j = Vec<acc_t>(static_cast<acc_t>(qi + key_shift - n0)) - Vec<acc_t>::arange(acc_t(0), acc_t(1));
      for (int64_t j = 0; j < n; j += V) {
        at::vec::fmadd(slope, dist_j.abs(), Vec<acc_t>::loadu(row + j)).store(row + j);
        dist_j = dist_j - step;
      }
    }
  }

  // z[0, n) = the dropout multipliers of row qi, keys n0 .. n0 + n (n0 a multiple of 4): keep_scale
  // where kept, 0 where dropped, drawn only for the 32-column batches that meet [lo, hi) (the band's
  // keys of the row) and 0 elsewhere, where the probabilities are 0 already. z holds dropout_width(n).
  inline void multipliers(acc_t* z, int64_t qi, int64_t n0, int64_t n, int64_t lo, int64_t hi) const {
    const int64_t j_lo = std::min(lo / 32 * 32, n), j_hi = std::min(round_up(hi, 32), n);
    if (j_lo > 0) fill(z, j_lo, acc_t(0));
    if (j_hi < n) fill(z + j_hi, n - j_hi, acc_t(0));
    int64_t j = j_lo;
#ifdef ATTNKERN_AVX512_PHILOX
    if constexpr (std::is_same_v<acc_t, float>) {
      if (avx512) {
        if (j_hi > j_lo)
          dropout_row_avx512<false>(z + j_lo, j_hi - j_lo, keys, bh, qi, n0 + j_lo, threshold, keep_scale);
        return;
      }
    }
#endif
#ifdef ATTNKERN_AVX2_PHILOX
    for (; j + 64 <= j_hi; j += 64) store_multipliers<2>(z + j, qi, n0 + j);  // two batches interleaved
    for (; j < j_hi; j += 32) store_multipliers<1>(z + j, qi, n0 + j);
#else
    for (; j < j_hi; j += 32) {
      uint32_t draws[32];
      dropout_draws32_scalar(draws, key, bh, qi, (n0 + j) >> 2);
      for (int w = 0; w < 32; ++w) z[j + w] = draws[w] >= threshold ? keep_scale : acc_t(0);
    }
#endif
  }

  // row[0, n) *= the dropout multipliers of row qi (keys n0 .. n0 + n, as multipliers()), z scratch of
  // dropout_width(n). With the AVX-512 generator in one pass, and only over the 32-column batches that meet
  // [lo, hi): elsewhere the probabilities are 0 already (or a NaN row's NaN), which a multiplier of 0 leaves.
  inline void apply_dropout(acc_t* row, acc_t* z, int64_t qi, int64_t n0, int64_t n, int64_t lo, int64_t hi) const {
#ifdef ATTNKERN_AVX512_PHILOX
    if constexpr (std::is_same_v<acc_t, float>) {
      if (avx512) {
        const int64_t j_lo = std::min(lo / 32 * 32, n), j_hi = std::min(round_up(hi, 32), n);
        if (j_hi > j_lo)
          dropout_row_avx512<true>(row + j_lo, j_hi - j_lo, keys, bh, qi, n0 + j_lo, threshold, keep_scale);
        return;
      }
    }
#endif
    multipliers(z, qi, n0, n, lo, hi);
    at::vec::map2([](Vec<acc_t> x, Vec<acc_t> y) { return x * y; }, row, row, z, n);
  }

#ifdef ATTNKERN_AVX2_PHILOX
  // z[0, 32 NB) = the multipliers of keys k0 .. k0 + 32 NB of row qi.
  template <int NB>
  inline void store_multipliers(acc_t* z, int64_t qi, int64_t k0) const {
    __m256i r[4 * NB];
    dropout_draws_avx2<NB>(r, keys, bh, qi, k0 >> 2);
    if constexpr (std::is_same_v<acc_t, float>) {
      // kept iff draw >= threshold (unsigned): max(draw, threshold) == draw.
      const __m256i thr = _mm256_set1_epi32(static_cast<int32_t>(threshold));
      const __m256 keep = _mm256_set1_ps(keep_scale);
      for (int v = 0; v < 4 * NB; ++v) {
        const __m256i kept = _mm256_cmpeq_epi32(_mm256_max_epu32(r[v], thr), r[v]);
        _mm256_storeu_ps(z + 8 * v, _mm256_and_ps(_mm256_castsi256_ps(kept), keep));
      }
    } else {
      uint32_t draws[32 * NB];
      for (int v = 0; v < 4 * NB; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(draws + 8 * v), r[v]);
      for (int w = 0; w < 32 * NB; ++w) z[w] = draws[w] >= threshold ? keep_scale : acc_t(0);
    }
  }
#endif
};

// Round n up to the dropout batch (32 columns): the size of a multipliers buffer.
inline int64_t dropout_width(int64_t n) { return round_up(n, 32); }

}  // namespace
}  // namespace cpu
}  // namespace attnkern
