// The dropout multipliers of a row on AVX-512: the AVX2 generator's scheme (philox_avx2.h) with sixteen
// counters per register, so one batch gives 64 columns, the keep test in a mask register, and the product
// with the row's probabilities in the same pass (the forward needs no multiplier buffer).
//
// The extension is built for AVX2, so these functions carry their own target attribute and run only where
// the processor has AVX-512F (checked once at run time: use_avx512_philox). ATTNKERN_CPU_PHILOX=avx2 keeps
// the AVX2 generator (tests/test_cpu_score_mods.py checks both against attnkern/philox.py, bit for bit).
// Why: the draws are most of what dropout adds to the forward, and here a round is 12 ops per 16 counters
// instead of 36 on AVX2 (64-bit products in place, three-way XORs in one op).
#pragma once

#include "isa.h"
#include "philox_avx2.h"

#if defined(ATTNKERN_AVX2_PHILOX) && defined(ATTNKERN_AVX512_TARGET)
#define ATTNKERN_AVX512_PHILOX 1
#endif

#ifdef ATTNKERN_AVX512_PHILOX
#include <cstdlib>
#include <cstring>

// GCC 12 warns that the shift intrinsics' "undefined" source operand may be used uninitialized: a false
// alarm inside its own headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace attnkern {
namespace cpu {
namespace {

// Whether the AVX-512 generator runs here: the processor (and the OS) has AVX-512F and
// ATTNKERN_CPU_PHILOX is not "avx2".
inline bool use_avx512_philox() {
  static const bool on = [] {
    const char* env = std::getenv("ATTNKERN_CPU_PHILOX");
    return !(env && std::strcmp(env, "avx2") == 0) && has_avx512f();
  }();
  return on;
}

ATTNKERN_TARGET_AVX512 inline __m512i splat16(uint32_t x) { return _mm512_set1_epi32(static_cast<int32_t>(x)); }

// Lane t of word w (c0 .. c3) is column 4t + w: into four vectors of sixteen consecutive columns. Within
// each 128-bit block the AVX2 transpose's unpacks; then a 4 x 4 transpose of the blocks.
ATTNKERN_TARGET_AVX512 inline void transpose_draws16(__m512i out[4], __m512i c0, __m512i c1, __m512i c2,
                                                     __m512i c3) {
  const __m512i a = _mm512_unpacklo_epi32(c0, c1), b = _mm512_unpacklo_epi32(c2, c3);
  const __m512i d = _mm512_unpackhi_epi32(c0, c1), e = _mm512_unpackhi_epi32(c2, c3);
  // Block L of r_m holds columns 16 L + 4 m .. + 3.
  const __m512i r0 = _mm512_unpacklo_epi64(a, b), r1 = _mm512_unpackhi_epi64(a, b);
  const __m512i r2 = _mm512_unpacklo_epi64(d, e), r3 = _mm512_unpackhi_epi64(d, e);
  const __m512i x0 = _mm512_shuffle_i32x4(r0, r1, 0x44), x1 = _mm512_shuffle_i32x4(r2, r3, 0x44);  // blocks 0, 1
  const __m512i x2 = _mm512_shuffle_i32x4(r0, r1, 0xEE), x3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);  // blocks 2, 3
  out[0] = _mm512_shuffle_i32x4(x0, x1, 0x88);
  out[1] = _mm512_shuffle_i32x4(x0, x1, 0xDD);
  out[2] = _mm512_shuffle_i32x4(x2, x3, 0x88);
  out[3] = _mm512_shuffle_i32x4(x2, x3, 0xDD);
}

// Columns 4c .. 4c + 64 NB - 1 of row i in slice bh, NB batches interleaved (as dropout_draws_avx2):
// out[4 b + v] holds columns 64 b + 16 v .. + 15. The rounds run on eight counters per register, one in
// the low half of each 64-bit lane: mul_epu32 then gives each 64-bit product in place (lo its low half,
// hi one shift away) and ignores the garbage the high halves collect, so a round is 2 products, 2 shifts
// and 2 three-way XORs per eight counters; one permute per word at the end packs sixteen counters' words
// into 32-bit lanes.
template <int NB>
ATTNKERN_TARGET_AVX512 inline void dropout_draws_avx512(__m512i* out, const PhiloxKeys& keys, int64_t bh, int64_t i,
                                                        int64_t c) {
  constexpr int NH = 2 * NB;  // registers of eight counters
  const __m512i m0 = splat16(0xD2511F53u), m1 = splat16(0xCD9E8D57u);
  __m512i c0[NH], c1[NH], c2[NH], c3[NH];
  // Rounds 0 and 1, with counter (c + t, i, bh, offset); as dropout_draws_avx2.
  uint32_t shi1, shi0;
  const uint32_t slo1 = philox_mulhilo(0xCD9E8D57u, static_cast<uint32_t>(bh), &shi1);
  const uint32_t s0 = shi1 ^ static_cast<uint32_t>(i) ^ keys.k0[0];
  const uint32_t slo0 = philox_mulhilo(0xD2511F53u, s0, &shi0);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h) {
    const __m512i p0 = _mm512_mul_epu32(_mm512_add_epi64(_mm512_set1_epi64(c + 8 * h), lane), m0);
    const __m512i n2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), splat16(keys.offset ^ keys.k1[0]));
    const __m512i p1 = _mm512_mul_epu32(n2, m1);
    c0[h] = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), splat16(slo1 ^ keys.k0[1]));
    c2[h] = _mm512_xor_si512(p0, splat16(shi0 ^ keys.k1[1]));
    c1[h] = p1, c3[h] = splat16(slo0);
  }
#pragma GCC unroll 8
  for (int r = 2; r < 10; ++r) {
    const __m512i k0 = splat16(keys.k0[r]), k1 = splat16(keys.k1[r]);
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
      c0[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[h], k0, 0x96);  // three-way XOR
      c2[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[h], k1, 0x96);
      c1[h] = p1, c3[h] = p0;
    }
  }
  // The low halves of registers 2b and 2b + 1: counters 16 b .. 16 b + 15 in 32-bit lanes.
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#pragma GCC unroll 2
  for (int b = 0; b < NB; ++b) {
    const int h = 2 * b;
    transpose_draws16(out + 4 * b, _mm512_permutex2var_epi32(c0[h], low_halves, c0[h + 1]),
                      _mm512_permutex2var_epi32(c1[h], low_halves, c1[h + 1]),
                      _mm512_permutex2var_epi32(c2[h], low_halves, c2[h + 1]),
                      _mm512_permutex2var_epi32(c3[h], low_halves, c3[h + 1]));
  }
}

// The multipliers of 16 columns (keep where the draw is >= threshold, else 0) at p[0, 16) where `lanes`
// says: stored (APPLY false) or multiplied into p (APPLY true; a NaN stays NaN, as the product with 0 keeps it).
template <bool APPLY>
ATTNKERN_TARGET_AVX512 inline void put_multipliers16(float* p, __m512i draws, __m512i threshold, __m512 keep,
                                                     __mmask16 lanes) {
  const __m512 z = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(draws, threshold), keep);
  _mm512_mask_storeu_ps(p, lanes, APPLY ? _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, p), z) : z);
}

// The multipliers of keys k0 .. k0 + n of row i (k0 a multiple of 4) at p[0, n): stored, or multiplied into p
// (APPLY). Two batches (128 columns) at a time, then one; the last vector masked to n.
template <bool APPLY>
ATTNKERN_TARGET_AVX512 __attribute__((noinline)) void dropout_row_avx512(
    float* p, int64_t n, const PhiloxKeys& keys, int64_t bh, int64_t i, int64_t k0, uint32_t threshold, float keep) {
  const __m512i thr = splat16(threshold);
  const __m512 kept_value = _mm512_set1_ps(keep);
  __m512i r[8];
  int64_t j = 0;
  for (; j + 128 <= n; j += 128) {
    dropout_draws_avx512<2>(r, keys, bh, i, (k0 + j) >> 2);
    for (int v = 0; v < 8; ++v) put_multipliers16<APPLY>(p + j + 16 * v, r[v], thr, kept_value, 0xFFFF);
  }
  for (; j < n; j += 64) {
    dropout_draws_avx512<1>(r, keys, bh, i, (k0 + j) >> 2);
    for (int v = 0; v < 4 && j + 16 * v < n; ++v) {
      const int64_t left = n - j - 16 * v;
      const __mmask16 lanes = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      put_multipliers16<APPLY>(p + j + 16 * v, r[v], thr, kept_value, lanes);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern

#pragma GCC diagnostic pop

#endif
