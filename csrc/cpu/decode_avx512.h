// The decode kernel's tile math on AVX-512, reading K and V in place from the cache.
//
// Why: a decode step has few query rows per kv head (R = group * Lq, often 4..8), so packing each K/V
// tile into the GEMM micro-kernel's panels (gather_tile in decode.cpp) costs more than the products:
// every cache element is read, converted, written and read again, and the micro-kernel's 6-row blocks
// run mostly empty. Here the scores are dot products of the query rows with key rows as they lie in the
// cache (16 products at a time in 16 accumulators, summed by one reduction tree), and P·V adds each
// value row, scaled by its probabilities, to the output rows. Both passes walk a tile in small blocks of
// keys (16 for the scores, 4 for P·V) and, within a block, kv head by kv head, so each block's rows are
// read together (in a page, a key's heads are adjacent). bfloat16 and float16 widen to float on load;
// all arithmetic is float.
//
// Used for float accumulation, unit-stride head dims that are multiples of 16, on processors with
// AVX-512F (decode.cpp checks; ATTNKERN_CPU_DECODE=gemm selects the packed path instead, for tests).
#pragma once

#include "isa.h"

#ifdef ATTNKERN_AVX512_TARGET
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

// GCC 12 warns that some intrinsics' "undefined" source operands are (or may be) used uninitialized: a
// false alarm inside its own headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace attnkern {
namespace cpu {
namespace {

// 16 consecutive elements as floats (bfloat16 and float16 widened exactly).
ATTNKERN_TARGET_AVX512 inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
ATTNKERN_TARGET_AVX512 inline __m512 load16(const c10::BFloat16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
ATTNKERN_TARGET_AVX512 inline __m512 load16(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// Lane i of the result = the sum of v[i]'s sixteen lanes (15 adds instead of 16 separate reductions):
// pairs of vectors fold within 128-bit blocks (unpack, then 64-bit shuffles), then across blocks.
ATTNKERN_TARGET_AVX512 inline __m512 lane_sums16(const __m512* v) {
  __m512 x[8], y[4], u[2];
  for (int i = 0; i < 8; ++i) {  // block-local [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2i], b = v[2i+1]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // block-local partial sums of v[4i .. 4i+3]
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 2; ++i) {  // blocks 0+1 and 2+3 of y[2i], y[2i+1]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// s[r * ld_s + t] = q_r · k_t for ROWS query rows (packed float, row stride E) and KEYS = 16 / ROWS key
// rows (pointers into the cache), E a multiple of 16.
template <int ROWS, typename scalar_t>
ATTNKERN_TARGET_AVX512 inline void dot_block(const float* q, int64_t E, const scalar_t* const* k, float* s,
                                             int64_t ld_s) {
  constexpr int KEYS = 16 / ROWS;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    __m512 qv[ROWS];
    for (int r = 0; r < ROWS; ++r) qv[r] = _mm512_loadu_ps(q + r * E + e);
    for (int t = 0; t < KEYS; ++t) {
      const __m512 kv = load16(k[t] + e);
      for (int r = 0; r < ROWS; ++r) acc[r * KEYS + t] = _mm512_fmadd_ps(qv[r], kv, acc[r * KEYS + t]);
    }
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, lane_sums16(acc));
  for (int r = 0; r < ROWS; ++r) std::memcpy(s + r * ld_s, lanes + r * KEYS, KEYS * sizeof(float));
}

// Asks for the cache lines of n elements at `row` to be brought into L2.
template <typename scalar_t>
ATTNKERN_TARGET_AVX512 inline void prefetch_l2(const scalar_t* row, int64_t n) {
  const auto first = reinterpret_cast<std::uintptr_t>(row) & ~std::uintptr_t(63);
  const auto last = reinterpret_cast<std::uintptr_t>(row + n) - 1;
  for (std::uintptr_t line = first; line <= last; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
  }
}

// Scores of a tile: s[(hk * R + r) * ld_s + j] = q_(hk, r) · k_(j, hk) for every kv head hk, its R rows
// (q: Hkv * R packed rows of E floats) and the keys j < nb (key_rows[j]: key j's row, head 0; a kv head
// is head_stride further). Columns up to the next multiple of 16 past nb get throwaway values (the last
// key again), which the caller overwrites with -inf.
// Prefetching: with a dot product's few operations per byte, the loads wait on memory unless asked for
// ahead (the hardware prefetchers stop at each 4 KiB page, and a key's row of all heads is one page at
// E = 128 in float). While a block of 16 keys is scored, the next block's key rows (key_rows holds
// n_rows >= nb entries: the next tile's first ones too) are requested into L2, head by head. Measured
// (1 thread, B=1 Hq=32 Hkv=8 E=128, 4k keys): without it 3.6-4.5 ms (fp32) and 2.9-4.1 ms (bf16) per
// call, with it 2.7-3.0 and 1.8-2.0; also prefetching the value rows (for tile_pv) or two blocks ahead
// measured no better or worse.
template <typename scalar_t>
ATTNKERN_TARGET_AVX512 void tile_scores_avx512(const float* q, int64_t Hkv, int64_t R, int64_t E,
                                               const scalar_t* const* key_rows, int64_t head_stride, int64_t nb,
                                               int64_t n_rows, float* s, int64_t ld_s) {
  for (int64_t j0 = 0; j0 < nb; j0 += 16) {
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      for (int64_t j = j0 + 16; j < std::min(j0 + 32, n_rows); ++j) prefetch_l2(key_rows[j] + hk * head_stride, E);
      const scalar_t* k[16];
      for (int t = 0; t < 16; ++t) k[t] = key_rows[std::min(j0 + t, nb - 1)] + hk * head_stride;
      const float* qh = q + hk * R * E;
      float* sh = s + hk * R * ld_s + j0;
      int64_t r = 0;
      // 4 rows x 4 keys (four times), then 2 x 8, then 1 x 16: always 16 accumulators.
      for (; r + 4 <= R; r += 4) {
        for (int t = 0; t < 16; t += 4) dot_block<4>(qh + r * E, E, k + t, sh + r * ld_s + t, ld_s);
      }
      for (; r + 2 <= R; r += 2) {
        for (int t = 0; t < 16; t += 8) dot_block<2>(qh + r * E, E, k + t, sh + r * ld_s + t, ld_s);
      }
      if (r < R) dot_block<1>(qh + r * E, E, k, sh + r * ld_s, ld_s);
    }
  }
}

// o[(hk * R + r) * ld_o + e] += sum_j p[(hk * R + r) * ld_p + j] * v_(j, hk)[e] over the keys j < nb of a
// tile (value_rows[j]: key j's value row, head 0), Ev a multiple of 16. Four keys at a time: each chunk of
// 16 value columns is loaded (and widened) once for all R rows, and each output chunk is loaded and
// stored once per four products; the probabilities past nb are never read.
template <typename scalar_t>
ATTNKERN_TARGET_AVX512 void tile_pv_avx512(const float* p, int64_t ld_p, int64_t Hkv, int64_t R, int64_t Ev,
                                           const scalar_t* const* value_rows, int64_t head_stride, int64_t nb,
                                           float* o, int64_t ld_o) {
  int64_t j = 0;
  for (; j + 4 <= nb; j += 4) {
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const scalar_t* v0 = value_rows[j] + hk * head_stride;
      const scalar_t* v1 = value_rows[j + 1] + hk * head_stride;
      const scalar_t* v2 = value_rows[j + 2] + hk * head_stride;
      const scalar_t* v3 = value_rows[j + 3] + hk * head_stride;
      const float* ph = p + hk * R * ld_p + j;
      float* oh = o + hk * R * ld_o;
      for (int64_t e = 0; e < Ev; e += 16) {
        const __m512 x0 = load16(v0 + e), x1 = load16(v1 + e), x2 = load16(v2 + e), x3 = load16(v3 + e);
        for (int64_t r = 0; r < R; ++r) {
          const float* pr = ph + r * ld_p;
          float* orow = oh + r * ld_o + e;
          __m512 acc = _mm512_loadu_ps(orow);
          acc = _mm512_fmadd_ps(_mm512_set1_ps(pr[0]), x0, acc);
          acc = _mm512_fmadd_ps(_mm512_set1_ps(pr[1]), x1, acc);
          acc = _mm512_fmadd_ps(_mm512_set1_ps(pr[2]), x2, acc);
          acc = _mm512_fmadd_ps(_mm512_set1_ps(pr[3]), x3, acc);
          _mm512_storeu_ps(orow, acc);
        }
      }
    }
  }
  for (; j < nb; ++j) {
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const scalar_t* v0 = value_rows[j] + hk * head_stride;
      for (int64_t e = 0; e < Ev; e += 16) {
        const __m512 x0 = load16(v0 + e);
        for (int64_t r = 0; r < R; ++r) {
          float* orow = o + (hk * R + r) * ld_o + e;
          const __m512 pj = _mm512_set1_ps(p[(hk * R + r) * ld_p + j]);
          _mm512_storeu_ps(orow, _mm512_fmadd_ps(pj, x0, _mm512_loadu_ps(orow)));
        }
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern

#pragma GCC diagnostic pop
#endif  // ATTNKERN_AVX512_TARGET
