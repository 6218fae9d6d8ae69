// The dropout draws of a row, 32 columns at a time: Philox4x32-10 (csrc/philox.h, attnkern/philox.py)
// evaluated for eight consecutive column groups at once in the eight 32-bit lanes of AVX2 registers.
//
// Lane t of the four state vectors runs the counter (c + t, i, bh, offset); lane (j & 3) of call j >> 2
// is column j's draw, so one batch gives columns 4c .. 4c + 31, which a 4 x 8 transpose puts in column
// order. Bit for bit the scalar philox4x32 (without AVX2 dropout_draws32_scalar runs instead);
// tests/test_cpu_score_mods.py checks the kernels' mask against attnkern/philox.py.
#pragma once

#if defined(CPU_CAPABILITY_AVX2) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define ATTNKERN_AVX2_PHILOX 1
#endif

#include <cstdint>

#include "../philox.h"

namespace attnkern {
namespace cpu {
namespace {

// Draws of columns 4c .. 4c + 31 of row i in slice bh, in column order, by the scalar generator.
inline void dropout_draws32_scalar(uint32_t* out, const DropoutKey& key, int64_t bh, int64_t i, int64_t c) {
  for (int t = 0; t < 8; ++t) {
    const Philox4 r = dropout_draws4(key, bh, i, c + t);
    for (int w = 0; w < 4; ++w) out[4 * t + w] = r.x[w];
  }
}

#ifdef ATTNKERN_AVX2_PHILOX
// (hi, lo) 32-bit halves of m * x in every lane: mul_epu32 multiplies the even lanes, so the odd lanes
// are shifted down for a second product and the halves blended back into place.
inline void mulhilo8(__m256i m, __m256i x, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                          // 64-bit products of lanes 0, 2, ...
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);   // of lanes 1, 3, ...
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __m256i splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int32_t>(x)); }

// One call's key schedule (the ten round keys, scalar and broadcast), built once per (batch, head) slice.
struct PhiloxKeys {
  uint32_t k0[10], k1[10], offset;
  __m256i v0[10], v1[10];
  PhiloxKeys() : PhiloxKeys(DropoutKey{}) {}
  explicit PhiloxKeys(const DropoutKey& key) : offset(key.offset) {
    for (int r = 0; r < 10; ++r) {
      k0[r] = key.k0 + static_cast<uint32_t>(r) * 0x9E3779B9u;
      k1[r] = key.k1 + static_cast<uint32_t>(r) * 0xBB67AE85u;
      v0[r] = splat(k0[r]), v1[r] = splat(k1[r]);
    }
  }
};

// Lane t of word w (c0 .. c3) is column 4t + w: into four vectors of eight consecutive columns.
inline void transpose_draws(__m256i out[4], __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i a = _mm256_unpacklo_epi32(c0, c1);  // cols 0,1,4,5 | 16,17,20,21 (as (t, w) pairs)
  const __m256i b = _mm256_unpacklo_epi32(c2, c3);
  const __m256i d = _mm256_unpackhi_epi32(c0, c1);
  const __m256i e = _mm256_unpackhi_epi32(c2, c3);
  const __m256i r0 = _mm256_unpacklo_epi64(a, b);  // columns 0-3 | 16-19
  const __m256i r1 = _mm256_unpackhi_epi64(a, b);  // 4-7 | 20-23
  const __m256i r2 = _mm256_unpacklo_epi64(d, e);  // 8-11 | 24-27
  const __m256i r3 = _mm256_unpackhi_epi64(d, e);  // 12-15 | 28-31
  out[0] = _mm256_permute2x128_si256(r0, r1, 0x20);
  out[1] = _mm256_permute2x128_si256(r2, r3, 0x20);
  out[2] = _mm256_permute2x128_si256(r0, r1, 0x31);
  out[3] = _mm256_permute2x128_si256(r2, r3, 0x31);
}

// Columns 4c .. 4c + 32 NB - 1 of row i in slice bh (NB batches of 32, run interleaved: one batch's
// ten rounds are a chain of dependent multiplies, and two hide each other's latency): out[4 b + v]
// holds columns 32 b + 8 v .. + 7. Only the first counter word differs between the lanes, so round 0's
// product of c2 and round 1's of c0 are the same in every lane: computed once, as scalars.
template <int NB>
inline void dropout_draws_avx2(__m256i* out, const PhiloxKeys& keys, int64_t bh, int64_t i, int64_t c) {
  const __m256i m0 = splat(0xD2511F53u), m1 = splat(0xCD9E8D57u);
  __m256i c0[NB], c1[NB], c2[NB], c3[NB];
  // Rounds 0 and 1, with counter (c + lane, i, bh, offset).
  uint32_t shi1, shi0;
  const uint32_t slo1 = philox_mulhilo(0xCD9E8D57u, static_cast<uint32_t>(bh), &shi1);
  const uint32_t s0 = shi1 ^ static_cast<uint32_t>(i) ^ keys.k0[0];  // round 0's c0, the same in every lane
  const uint32_t slo0 = philox_mulhilo(0xD2511F53u, s0, &shi0);
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, _mm256_add_epi32(splat(static_cast<uint32_t>(c + 8 * b)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
             &hi0, &lo0);
    const __m256i n2 = _mm256_xor_si256(hi0, splat(keys.offset ^ keys.k1[0]));  // round 0's c2; its c3 = lo0
    mulhilo8(m1, n2, &hi1, &lo1);
    c0[b] = _mm256_xor_si256(hi1, splat(slo1 ^ keys.k0[1]));
    c2[b] = _mm256_xor_si256(lo0, splat(shi0 ^ keys.k1[1]));
    c1[b] = lo1, c3[b] = splat(slo0);
  }
#pragma GCC unroll 8
  for (int r = 2; r < 10; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0[b], &hi0, &lo0);
      mulhilo8(m1, c2[b], &hi1, &lo1);
      c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[b]), keys.v0[r]);
      c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[b]), keys.v1[r]);
      c1[b] = lo1, c3[b] = lo0;
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) transpose_draws(out + 4 * b, c0[b], c1[b], c2[b], c3[b]);
}

#endif

}  // namespace
}  // namespace cpu
}  // namespace attnkern
