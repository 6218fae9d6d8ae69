// KV-cache decoding on the CPU (attnkern_ext::decode; the problem is described in decode_params.h).
//
// Split-KV ("flash-decoding"): the keys a batch element attends to are cut into splits, and each task
// (batch element, split) computes, for every kv head and all R = group * Lq query rows of that head at
// once, the partial softmax state (row max m, denominator l, unnormalized output acc) over its keys. A
// tile of keys is gathered through the block table (pages read in place, any order) for all kv heads
// together (a key's heads are adjacent in the cache, so it streams in order), converted to acc_t once,
// and each kv head's K/V tile serves every query head of its group: the cache is read once, not once
// per query head. The splits of each row are then merged by their log-sum-exp, in split order:
//     M = max_s m_s,  l = sum_s l_s e^(m_s - M),  out = sum_s acc_s e^(m_s - M) / l,  lse = M + ln l.
// The split count comes from the problem alone (keys per batch element, batch size), never from the
// thread count, so results are bitwise equal whatever the number of threads; the threads take tasks
// from an atomic counter, and the one that finishes a batch element's last split merges it. With one
// split the tasks write the output directly.
// Per tile and kv head: S = Q K^T (the GEMM micro-kernel of tile_math.h), scale, softcap, ALiBi, band
// and length bounds, online softmax (as forward.cpp), O += P V.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "../decode_op.h"
#include "decode_avx512.h"
#include "isa.h"
#include "tile_math.h"

namespace attnkern {
namespace cpu {
namespace {

constexpr int64_t kTileKeys = 128;          // most keys per tile
constexpr int64_t kAutoSplitKeys = 512;     // keys per split when the problem chooses
constexpr int64_t kTasksWithoutSplit = 64;  // batch size at which splitting the keys stops paying
constexpr int64_t kPrefetchKeys = 16;       // key rows the in-place path requests ahead (decode_avx512.h)

// The keys [begin, end) some query row of batch element b sees (band and length).
struct KeyRange {
  int64_t begin, end, offset;
};

KeyRange key_range(const DecodeParams& p, int64_t b) {
  const int64_t n = p.seqlen(b), off = n - p.Lq;
  const int64_t begin = p.has_left ? std::clamp<int64_t>(off - p.left, 0, n) : 0;
  const int64_t end = p.has_right ? std::clamp<int64_t>(p.Lq - 1 + off + p.right + 1, 0, n) : n;
  return {begin, std::max(begin, end), off};
}

int64_t splits_for(const DecodeParams& p, int64_t keys) {
  if (keys <= 0) return 1;
  if (p.num_splits > 0) return std::min(p.num_splits, keys);
  if (p.B >= kTasksWithoutSplit) return 1;
  return (keys + kAutoSplitKeys - 1) / kAutoSplitKeys;
}

// Key j's row of batch element b in a cache (k or v), at kv head 0.
template <typename scalar_t>
inline const scalar_t* cache_row(const DecodeParams& p, const void* cache, const Strides4D& st, int64_t b, int64_t j) {
  return static_cast<const scalar_t*>(cache) + p.page_of(b, j) * st.s0 + (j % p.page_size) * st.s1;
}

// Whether the tiles take the in-place AVX-512 path (decode_avx512.h) rather than packed GEMM panels:
// float accumulation, unit-stride head dims that are multiples of 16, AVX-512F here, and
// ATTNKERN_CPU_DECODE not "gemm" (read per call, so tests can compare the two paths).
template <typename acc_t>
bool direct_tiles(const DecodeParams& p) {
#ifdef ATTNKERN_AVX512_TARGET
  if constexpr (std::is_same_v<acc_t, float>) {
    const char* env = std::getenv("ATTNKERN_CPU_DECODE");
    if (env && std::strcmp(env, "gemm") == 0) return false;
    return has_avx512f() && p.k_st.s3 == 1 && p.v_st.s3 == 1 && p.E % 16 == 0 && p.Ev % 16 == 0;
  }
#endif
  return false;
}

#ifdef ATTNKERN_AVX2_MICROKERNEL
// 8 consecutive elements as floats (float16/bfloat16 widened exactly).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const c10::BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

// r[c] <- column c of the 8 x 8 block whose rows are r[0..7].
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// Gather keys [n0, n0 + nb) of batch element b, every kv head, converting to acc_t: kv head hk's K^T
// into panels of NR keys (K-dim E) at kt + hk * kt_head, its V into panels of NR columns of Ev (K-dim
// keys, panel stride v_panel) at vp + hk * v_head; padding keys of K and columns of V are zero. Each
// key's heads are read together: in the (slot, Hkv, E) layout of a page they are adjacent, so the cache
// streams in order (one kv head at a time would stride over the others, a page apart per key). With
// AVX2, float accumulation and unit-stride rows, K is transposed 8 keys x 8 columns at a time.
template <typename scalar_t, typename acc_t>
void gather_tile(const DecodeParams& p, int64_t b, int64_t n0, int64_t nb, acc_t* kt, int64_t kt_head, acc_t* vp,
                 int64_t v_panel, int64_t v_head) {
  constexpr int64_t NR = kNR<acc_t>;
  const int64_t nbp = round_up(nb, NR), Evp = round_up(p.Ev, NR);
  auto key_row = [&](const void* cache, const Strides4D& st, int64_t j) {
    return cache_row<scalar_t>(p, cache, st, b, j);
  };
  int64_t jj = 0;
#ifdef ATTNKERN_AVX2_MICROKERNEL
  if constexpr (std::is_same_v<acc_t, float>) {
    if (p.k_st.s3 == 1) {
      const int64_t E8 = p.E / 8 * 8;
      for (; jj + 8 <= nb; jj += 8) {
        const scalar_t* rows[8];
        for (int t = 0; t < 8; ++t) rows[t] = key_row(p.k, p.k_st, n0 + jj + t);
        for (int64_t hk = 0; hk < p.Hkv; ++hk) {
          acc_t* kd = kt + hk * kt_head + (jj / NR) * p.E * NR + jj % NR;
          const int64_t off = hk * p.k_st.s2;
          for (int64_t e = 0; e < E8; e += 8) {
            __m256 r[8];
            for (int t = 0; t < 8; ++t) r[t] = load8(rows[t] + off + e);
            transpose8(r);
            for (int c = 0; c < 8; ++c) _mm256_storeu_ps(kd + (e + c) * NR, r[c]);
          }
          for (int64_t e = E8; e < p.E; ++e) {
            for (int t = 0; t < 8; ++t) kd[e * NR + t] = static_cast<acc_t>(rows[t][off + e]);
          }
        }
      }
    }
  }
#endif
  for (; jj < nbp; ++jj) {  // the remaining keys of K (and its padding), one at a time
    const scalar_t* row = jj < nb ? key_row(p.k, p.k_st, n0 + jj) : nullptr;
    for (int64_t hk = 0; hk < p.Hkv; ++hk) {
      acc_t* kd = kt + hk * kt_head + (jj / NR) * p.E * NR + jj % NR;
      if (!row) {
        for (int64_t e = 0; e < p.E; ++e) kd[e * NR] = acc_t(0);
        continue;
      }
      const scalar_t* ks = row + hk * p.k_st.s2;
      for (int64_t e = 0; e < p.E; ++e) kd[e * NR] = static_cast<acc_t>(ks[e * p.k_st.s3]);
    }
  }
  for (jj = 0; jj < nb; ++jj) {
    const scalar_t* row = key_row(p.v, p.v_st, n0 + jj);
    for (int64_t hk = 0; hk < p.Hkv; ++hk) {
      const scalar_t* vs = row + hk * p.v_st.s2;
      for (int64_t e0 = 0; e0 < Evp; e0 += NR) {
        acc_t* vd = vp + hk * v_head + (e0 / NR) * v_panel + jj * NR;
        const int64_t ne = std::min(NR, p.Ev - e0);
        if (p.v_st.s3 == 1) {
          for (int64_t e = 0; e < ne; ++e) vd[e] = static_cast<acc_t>(vs[e0 + e]);
        } else {
          for (int64_t e = 0; e < ne; ++e) vd[e] = static_cast<acc_t>(vs[(e0 + e) * p.v_st.s3]);
        }
        for (int64_t e = ne; e < NR; ++e) vd[e] = acc_t(0);
      }
    }
  }
}

// The score modifications and bounds of row `i` (query index) of head h over keys [n0, n0 + nb) of a
// tile padded to nbp: softcap, ALiBi, then the band's and padding's -inf.
template <typename acc_t>
void mod_row(const DecodeParams& p, acc_t* row, int64_t b, int64_t h, int64_t i, int64_t off, int64_t n0,
             int64_t nb, int64_t nbp) {
  if (p.softcap > 0) {
    const acc_t c = static_cast<acc_t>(p.softcap), inv = acc_t(1) / c;
    for (int64_t j = 0; j < nb; ++j) row[j] = c * std::tanh(row[j] * inv);
  }
  if (p.alibi) {
    const acc_t slope = static_cast<acc_t>(p.alibi[b * p.alibi_st_b + h]);
    const int64_t diag = i + off;  // the key at distance 0
    for (int64_t j = 0; j < nb; ++j) row[j] -= slope * static_cast<acc_t>(std::abs(diag - (n0 + j)));
  }
  int64_t first = 0, valid = nb;  // visible keys of the tile: [first, valid)
  if (p.has_right) valid = std::clamp<int64_t>(i + off + p.right - n0 + 1, 0, nb);
  if (p.has_left) first = std::clamp<int64_t>(i + off - p.left - n0, 0, valid);
  fill(row, first, neg_inf<acc_t>());
  fill(row + valid, nbp - valid, neg_inf<acc_t>());
}

// Write one finished row: out = acc / l, lse = m + ln l; a row that saw no key gives 0 and -inf.
template <typename scalar_t, typename acc_t>
void store_result(const DecodeParams& p, int64_t b, int64_t h, int64_t i, const acc_t* acc, acc_t m, acc_t l) {
  const bool empty = l == acc_t(0);
  scalar_t* o = static_cast<scalar_t*>(p.out) + b * p.out_st.s0 + i * p.out_st.s1 + h * p.out_st.s2;
  store_row(o, p.out_st.s3, acc, p.Ev, empty ? acc_t(0) : acc_t(1) / l);
  static_cast<acc_t*>(p.lse)[(b * p.Hq + h) * p.Lq + i] = empty ? neg_inf<acc_t>() : m + std::log(l);
}

// Merge the n_splits partial states of batch element b (every kv head, all R rows of each) into its
// output and lse, in split order (bitwise reproducible whichever thread runs it). `acc`: Ev scratch.
template <typename scalar_t, typename acc_t>
void merge_splits(const DecodeParams& p, int64_t b, int64_t R, int64_t n_splits, const acc_t* pacc, const acc_t* pml,
                  acc_t* acc) {
  for (int64_t hk = 0; hk < p.Hkv; ++hk) {
    const int64_t t = b * p.Hkv + hk;
    for (int64_t r = 0; r < R; ++r) {
      const acc_t* ml = pml + (t * n_splits * R + r) * 2;  // split s at ml + s * R * 2
      const acc_t* pa = pacc + (t * n_splits * R + r) * p.Ev;
      bool nan = false;
      acc_t M = neg_inf<acc_t>();
      for (int64_t s = 0; s < n_splits; ++s) {
        const acc_t m = ml[s * R * 2], l = ml[s * R * 2 + 1];
        if (std::isnan(m) || std::isnan(l)) nan = true;
        else if (l > acc_t(0)) M = std::max(M, m);
      }
      acc_t l_total = 0;
      std::fill(acc, acc + p.Ev, acc_t(0));
      if (nan) {
        l_total = std::numeric_limits<acc_t>::quiet_NaN();
        std::fill(acc, acc + p.Ev, l_total);
      } else if (M != neg_inf<acc_t>()) {
        for (int64_t s = 0; s < n_splits; ++s) {
          const acc_t m = ml[s * R * 2], l = ml[s * R * 2 + 1];
          if (!(l > acc_t(0))) continue;  // a split that saw no key of this row
          const acc_t w = std::exp(m - M);
          l_total += l * w;
          const acc_t* src = pa + s * R * p.Ev;
          for (int64_t e = 0; e < p.Ev; ++e) acc[e] += src[e] * w;
        }
      }
      store_result<scalar_t, acc_t>(p, b, hk * p.group + r / p.Lq, r % p.Lq, acc, M, l_total);
    }
  }
}

// The in-place path's two passes (decode_avx512.h); only float accumulation reaches them.
template <typename scalar_t, typename acc_t>
void tile_scores(const acc_t* q, const DecodeParams& p, int64_t R, const scalar_t* const* key_rows, int64_t nb,
                 int64_t n_rows, acc_t* s, int64_t ld_s) {
#ifdef ATTNKERN_AVX512_TARGET
  if constexpr (std::is_same_v<acc_t, float>) {
    tile_scores_avx512(q, p.Hkv, R, p.E, key_rows, p.k_st.s2, nb, n_rows, s, ld_s);
    return;
  }
#endif
  TORCH_CHECK(false, "attnkern decode: the in-place tile path takes float accumulation only");
}

template <typename scalar_t, typename acc_t>
void tile_pv(const acc_t* probs, int64_t ld_p, const DecodeParams& p, int64_t R, const scalar_t* const* value_rows,
             int64_t nb, acc_t* o, int64_t ld_o) {
#ifdef ATTNKERN_AVX512_TARGET
  if constexpr (std::is_same_v<acc_t, float>) {
    tile_pv_avx512(probs, ld_p, p.Hkv, R, p.Ev, value_rows, p.v_st.s2, nb, o, ld_o);
    return;
  }
#endif
  TORCH_CHECK(false, "attnkern decode: the in-place tile path takes float accumulation only");
}

// Keys per tile: the K/V tiles of every kv head together stay within about 256 KiB (L2).
int64_t tile_keys(const DecodeParams& p, int64_t elem_bytes, int64_t nr) {
  const int64_t fit = (int64_t(256) << 10) / std::max<int64_t>(1, p.Hkv * (p.E + p.Ev) * elem_bytes);
  return std::clamp<int64_t>(fit / nr * nr, nr, kTileKeys);
}

template <typename scalar_t>
void decode_kernel(const DecodeParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t NR = kNR<acc_t>;
  const int64_t R = p.group * p.Lq;  // the rows of one kv head: row r is query r % Lq of head g = r / Lq
  // The in-place path keeps no K/V copy, so its tiles are only bounded by the score rows of every kv head.
  const bool direct = direct_tiles<acc_t>(p);
  const int64_t BN = direct ? kTileKeys : tile_keys(p, sizeof(acc_t), NR);
  const int64_t BNp = round_up(BN, NR), Evp = round_up(p.Ev, NR);
  const acc_t scale = static_cast<acc_t>(p.scale);

  int64_t n_splits = 1;
  for (int64_t b = 0; b < p.B; ++b) {
    const KeyRange kr = key_range(p, b);
    n_splits = std::max(n_splits, splits_for(p, kr.end - kr.begin));
  }
  // With several splits, the partial states (acc (R, Ev), m and l per row) of every (b, kv head, split),
  // merged below.
  at::Tensor part_acc, part_ml;
  acc_t *pacc = nullptr, *pml = nullptr;
  if (n_splits > 1) {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    part_acc = at::empty({p.B, p.Hkv, n_splits, R, p.Ev}, opts);
    part_ml = at::empty({p.B, p.Hkv, n_splits, R, 2}, opts);
    pacc = part_acc.data_ptr<acc_t>();
    pml = part_ml.data_ptr<acc_t>();
  }
  const int64_t n_tasks = p.B * n_splits;  // a task: one split of one batch element, every kv head
  const auto* q = static_cast<const scalar_t*>(p.q);
  const int64_t kt_head = p.E * BNp, v_head = Evp * BNp;
  // Splits finished per batch element: the task that finishes the last one merges them (no second
  // parallel region, whose fork/join costs more than the merge on a busy machine).
  std::unique_ptr<std::atomic<int64_t>[]> finished(new std::atomic<int64_t>[p.B]);
  for (int64_t b = 0; b < p.B; ++b) finished[b].store(0, std::memory_order_relaxed);

  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch<acc_t> q_buf, kt_buf, v_buf, s_buf, o_buf, stat_buf;
    acc_t* q_all = q_buf.get(p.Hkv * R * p.E);
    acc_t* kt = direct ? nullptr : kt_buf.get(p.Hkv * kt_head);  // packed K/V panels (GEMM path)
    acc_t* vp = direct ? nullptr : v_buf.get(p.Hkv * v_head);
    // In-place path: the tile's key and value rows, and the next tile's first kPrefetchKeys key rows.
    std::vector<const scalar_t*> key_rows(direct ? BN + kPrefetchKeys : 0), value_rows(direct ? BN : 0);
    acc_t* sb = s_buf.get((direct ? p.Hkv : 1) * R * BNp);  // scores: every kv head's (in place) or one's
    acc_t* o_all = o_buf.get(p.Hkv * R * Evp);
    acc_t* m_all = stat_buf.get(2 * p.Hkv * R + p.Ev);
    acc_t* l_all = m_all + p.Hkv * R;
    acc_t* merge_buf = l_all + p.Hkv * R;
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const int64_t split = task % n_splits, b = task / n_splits;
      const KeyRange kr = key_range(p, b);
      const int64_t keys = kr.end - kr.begin, ns = splits_for(p, keys);
      const int64_t per_split = (keys + ns - 1) / ns;
      const int64_t k0 = kr.begin + std::min(keys, split * per_split);
      const int64_t k1 = kr.begin + std::min(keys, (split + 1) * per_split);

      fill(m_all, p.Hkv * R, neg_inf<acc_t>());
      fill(l_all, p.Hkv * R, acc_t(0));
      fill(o_all, p.Hkv * R * Evp, acc_t(0));
      if (k0 < k1) {
        for (int64_t r = 0; r < p.Hkv * R; ++r) {  // r = hk * R + (row of that kv head); h = r / Lq
          const int64_t h = r / p.Lq, i = r % p.Lq;
          pack_rows(q_all + r * p.E, p.E, q + b * p.q_st.s0 + i * p.q_st.s1 + h * p.q_st.s2, 0, p.q_st.s3, 1, p.E,
                    acc_t(1));
        }
      }
      for (int64_t n0 = k0; n0 < k1; n0 += BN) {
        const int64_t nb = std::min(BN, k1 - n0), nbp = round_up(nb, NR);
        if (direct) {
          const int64_t n_rows = std::min(nb + kPrefetchKeys, k1 - n0);
          for (int64_t j = 0; j < n_rows; ++j) key_rows[j] = cache_row<scalar_t>(p, p.k, p.k_st, b, n0 + j);
          for (int64_t j = 0; j < nb; ++j) value_rows[j] = cache_row<scalar_t>(p, p.v, p.v_st, b, n0 + j);
          tile_scores(q_all, p, R, key_rows.data(), nb, n_rows, sb, BNp);
        } else {
          gather_tile<scalar_t, acc_t>(p, b, n0, nb, kt, kt_head, vp, BNp * NR, v_head);
        }
        for (int64_t hk = 0; hk < p.Hkv; ++hk) {
          acc_t *m_i = m_all + hk * R, *l_i = l_all + hk * R, *ob = o_all + hk * R * Evp;
          acc_t* sh = direct ? sb + hk * R * BNp : sb;  // this kv head's R score rows
          if (!direct) {
            gemm<acc_t, false, false>(R, nbp, p.E, q_all + hk * R * p.E, p.E, kt + hk * kt_head, p.E * NR, sh, BNp);
          }
          for (int64_t r = 0; r < R; ++r) {
            const int64_t h = hk * p.group + r / p.Lq, i = r % p.Lq;
            acc_t* row = sh + r * BNp;
            scale_row(row, nbp, scale);
            mod_row(p, row, b, h, i, kr.offset, n0, nb, nbp);
            // As forward.cpp: std::max keeps a NaN m_i; a row of NaN and -inf only becomes NaN.
            acc_t m_new = std::max(m_i[r], row_max(row, nbp));
            if (m_new == neg_inf<acc_t>()) {
              if (!row_has_nan(row, nbp)) {  // nothing visible yet in this row
                fill(row, nbp, acc_t(0));
                continue;
              }
              m_new = std::numeric_limits<acc_t>::quiet_NaN();
            }
            const acc_t alpha = std::exp(m_i[r] - m_new);  // 0 when m_i was -inf
            l_i[r] = l_i[r] * alpha + exp_shift_sum(row, nbp, m_new);
            m_i[r] = m_new;
            if (alpha != acc_t(1)) {
              acc_t* orow = ob + r * Evp;
              at::vec::map([alpha](Vec<acc_t> x) { return x * Vec<acc_t>(alpha); }, orow, orow, Evp);
            }
          }
          if (!direct) gemm<acc_t, false, true>(R, Evp, nb, sh, BNp, vp + hk * v_head, BNp * NR, ob, Evp);
        }
        if (direct) tile_pv(sb, BNp, p, R, value_rows.data(), nb, o_all, Evp);
      }

      for (int64_t hk = 0; hk < p.Hkv; ++hk) {
        const acc_t *m_i = m_all + hk * R, *l_i = l_all + hk * R, *ob = o_all + hk * R * Evp;
        const int64_t base = (b * p.Hkv + hk) * n_splits + split;
        for (int64_t r = 0; r < R; ++r) {
          if (n_splits == 1) {
            store_result<scalar_t, acc_t>(p, b, hk * p.group + r / p.Lq, r % p.Lq, ob + r * Evp, m_i[r], l_i[r]);
            continue;
          }
          std::copy(ob + r * Evp, ob + r * Evp + p.Ev, pacc + (base * R + r) * p.Ev);
          pml[(base * R + r) * 2] = m_i[r];
          pml[(base * R + r) * 2 + 1] = l_i[r];
        }
      }
      // Release our partials, acquire the other splits': the last one in merges this batch element.
      if (n_splits > 1 && finished[b].fetch_add(1, std::memory_order_acq_rel) + 1 == n_splits) {
        merge_splits<scalar_t, acc_t>(p, b, R, n_splits, pacc, pml, merge_buf);
      }
    }
  });
}

void decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                const std::optional<at::Tensor>& block_table, double scale, at::IntArrayRef band, double softcap,
                const std::optional<at::Tensor>& alibi, int64_t num_splits, const at::Tensor& out,
                const at::Tensor& lse) {
  cpu::check_isa();
  const DecodeParams p =
      decode_params(q, k_cache, v_cache, seqlens, block_table, scale, band, softcap, alibi, num_splits, out, lse);
  if (p.B * p.Hq * p.Lq == 0) return;
  switch (q.scalar_type()) {
    case at::kFloat: decode_kernel<float>(p); break;
    case at::kDouble: decode_kernel<double>(p); break;
    case at::kBFloat16: decode_kernel<c10::BFloat16>(p); break;
    case at::kHalf: decode_kernel<c10::Half>(p); break;
    default: TORCH_CHECK(false, "attnkern decode: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern_ext, CPU, m) { m.impl("decode", &attnkern::cpu::decode_cpu); }
