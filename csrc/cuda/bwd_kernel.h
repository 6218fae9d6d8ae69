// Attention backward on tensor cores (sm80+). Deterministic: no atomics anywhere.
//
//   preprocess   delta = rowsum(dO * O) - dlse, one warp per query row (O = out + out_lo when the forward
//                saved the rounding residual out_lo: delta to float32 accuracy)
//   dK/dV pass   one CTA per (block of kBlockN keys, kv head, batch); warp w owns 16 keys. It loops
//                over its kv head's query-head group and the query tiles that see its keys (GQA/MQA
//                with too few key blocks to fill the GPU: kv_parts CTAs per block, each over a part of
//                the group, their float32 sums added after by the sum kernel, in part order):
//                  S^T = K Q^T, P^T = 2^((S^T - m) log2 e - log2 l)   (m, l: the forward's row stats)
//                  dP^T = V dO^T, dS^T = P^T (dP^T - delta)
//                  dV += P^T dO, dK += dS^T Q       (accumulated in registers, written once)
//                Head dims over 128 split the dK/dV columns across two CTAs (kSplit = 2), each
//                recomputing S^T and dP^T, to stay within the register file.
//   dQ pass      one CTA per (block of query rows, head, batch), looping over key tiles:
//                  S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K
//   dMask pass   only for a float mask that requires grad: one CTA per tile of the (Bm, Hm, Lm, Sm)
//                gradient, summing dS over the dims the mask broadcasts over in a fixed order.
// The kMods variants (mods.h) recompute the capped, biased scores and the dropout mask Z:
//   dV += (P Z)^T dO, dS = P (dP Z - delta) (= the mask's gradient), dR = dS (1 - T^2), T = tanh(raw / softcap),
//   and dQ, dK come from dR (delta = rowsum(dO O) - dlse holds as is: O is the dropped output).
#pragma once

#include "mask.h"
#include "mods.h"
#include "tile.h"
#include "varlen.h"

namespace attnkern {
namespace cuda {

template <int kHeadDim_, int kBlockM_, int kNWarps_, int kSplit_, typename T_>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kBlockN = 16 * kNWarps;  // keys per dK/dV CTA
  static constexpr int kBlockM = kBlockM_;      // query rows per tile of the dK/dV loop
  static constexpr int kSplit = kSplit_;        // CTAs sharing one key block's dK/dV columns
  static constexpr int kWidth = smem_width(kHeadDim);
  using KVTile = SmemTile<kBlockN, kWidth>;
  using QTile = SmemTile<kBlockM, kWidth>;
  static constexpr int kSmemBytes =
      (2 * KVTile::kElems + 2 * 2 * QTile::kElems) * int(sizeof(T)) + 2 * 3 * kBlockM * int(sizeof(float));
  static_assert(kHeadDim % (16 * kSplit) == 0, "split head dims in whole k16 tiles");
};

template <int kHeadDim_, int kBlockN_, int kNWarps_, typename T_, int kMTiles_ = 1>
struct DqTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMTiles = kMTiles_;  // 16-row tiles per warp (2: each K/V fragment serves 32 rows)
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;  // query rows per CTA
  static constexpr int kBlockN = kBlockN_;      // keys per tile
  static constexpr int kWidth = smem_width(kHeadDim);
  using QTile = SmemTile<kBlockM, kWidth>;
  using KVTile = SmemTile<kBlockN, kWidth>;
  static constexpr int kSmemBytes = (2 * QTile::kElems + 2 * 2 * KVTile::kElems) * int(sizeof(T));
};

// The forward's per-row statistics, ready for P = 2^((s - m) log2 e - log2l): rows past L and fully
// masked rows get m = +inf, log2l = 0, so their P is exactly 0 (not 2^(-inf + inf) = NaN).
__device__ __forceinline__ void row_stats(const AttentionParams& p, int64_t bh, int64_t i, float& m, float& log2l) {
  if (i >= p.L) {
    m = INFINITY, log2l = 0.f;
    return;
  }
  const float* st = static_cast<const float*>(p.stats) + (bh * p.stat_len() + i) * 2;
  m = st[0] == kNegInf ? INFINITY : st[0];
  log2l = st[0] == kNegInf ? 0.f : st[1];
}

// ---------------------------------------------------------------------------------------------------
// delta[b, h, i] = sum_e dO * O - dlse, one warp per row (lanes stride the head dim).
template <typename T>
__global__ void attention_bwd_preprocess_kernel(const AttentionParams params, float* delta) {
  AttentionParams p = params;
  int64_t tok0;
  const int64_t b = enter_batch<T>(p, tok0);
  delta += tok0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x / 32) + warp;
  const int64_t h = blockIdx.y;
  if (i >= p.L) return;
  const T* o = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.l;
  const T* d = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + i * p.dout_st.l;
  float acc = 0.f;
  if (p.out_lo) {
    const T* lo = static_cast<const T*>(p.out_lo) + b * p.out_lo_st.b + h * p.out_lo_st.h + i * p.out_lo_st.l;
    for (int64_t e = lane; e < p.Ev; e += 32) {
      acc += (to_float(o[e * p.out_st.e]) + to_float(lo[e * p.out_lo_st.e])) * to_float(d[e * p.dout_st.e]);
    }
  } else {
    for (int64_t e = lane; e < p.Ev; e += 32) acc += to_float(o[e * p.out_st.e]) * to_float(d[e * p.dout_st.e]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    // A fully masked row (row max -inf) has P = 0 and a constant lse: its dlse, maybe inf or NaN (a
    // log-sum-exp merge), must not enter delta, or dS = 0 * (dP - delta) would be NaN on every key.
    const bool empty = static_cast<const float*>(p.stats)[((b * p.Hq + h) * p.stat_len() + i) * 2] == kNegInf;
    if (p.dlse && !empty) {
      acc -= static_cast<const float*>(p.dlse)[b * p.dlse_st.b + h * p.dlse_st.h + i * p.dlse_st.l];
    }
    delta[(b * p.Hq + h) * p.stat_len() + i] = acc;
  }
}

// ---------------------------------------------------------------------------------------------------
// kLeft: whether the band may have a left bound (a sliding window); without one, the launch takes the
// variant that does not test for it. kMods: the general variant with the score modifications (fwd_kernel.h).
template <typename Traits, bool kHasMask, bool kLeft, bool kMods = false>
__global__ void __launch_bounds__(Traits::kThreads) attention_bwd_dkdv_kernel(const AttentionParams params,
                                                                              const float* delta) {
  using T = typename Traits::T;
  using KVTile = typename Traits::KVTile;
  using QTile = typename Traits::QTile;
  constexpr int kHD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kMT = kBM / 8;                    // n8 tiles of S^T (queries)
  constexpr int kOT = kHD / 8 / Traits::kSplit;   // n8 tiles of this CTA's dK/dV columns

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + KVTile::kElems;
  T* sQ = sV + KVTile::kElems;             // [2][QTile]
  T* sdO = sQ + 2 * QTile::kElems;         // [2][QTile]
  float* sStat = reinterpret_cast<float*>(sdO + 2 * QTile::kElems);  // [2][3][kBM]: m, log2l, delta

  AttentionParams p = params;
  int64_t tok0;
  const int64_t b = enter_batch<T, !kHasMask || kMods>(p, tok0);  // packed batches have no mask
  delta += tok0;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int n_block = blockIdx.x / Traits::kSplit, split = blockIdx.x % Traits::kSplit;
  // Grid y: (kv head, part of its query-head group); heads [h0, h0 + heads) are this CTA's.
  const int64_t hk = blockIdx.y / p.kv_parts, part = blockIdx.y % p.kv_parts;
  const int64_t heads = p.group / p.kv_parts, h0 = hk * p.group + part * heads;
  const int n0 = n_block * kBN;
  if (n0 >= p.S) return;  // past the keys of its sequence (a packed batch's shorter ones)
  const int col0 = split * kOT * 8;  // first dK/dV column of this CTA

  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
  load_kv_async<KVTile, kThreads, kHD>(sK, sV, k, v, p, n0, p.S, tid);
  cp_async_commit();

  // Query rows that see some key of this block (the band): [m_lo, m_hi), m_lo a multiple of kBM.
  int m_lo = 0, m_hi = int(p.L);
  if (p.has_right) m_lo = int(clamp64(int64_t(n0) - p.band_hi, 0, p.L)) / kBM * kBM;
  if (kLeft && p.has_left) m_hi = int(clamp64(int64_t(n0) + kBN - p.band_lo, 0, p.L));
  const int m_tiles = m_lo < m_hi ? (m_hi - m_lo + kBM - 1) / kBM : 0;
  const int n_iters = int(heads) * m_tiles;  // (query head of the part, query tile) pairs

  float dk[kOT][4], dv[kOT][4];
  zero(dk), zero(dv);
  const int wrow = warp * 16;

  auto tile_of = [&](int it, int64_t& h, int& m0) {
    h = h0 + it / m_tiles;
    m0 = m_lo + (it % m_tiles) * kBM;
  };
  auto prefetch = [&](int it, int stage) {
    int64_t h;
    int m0;
    tile_of(it, h, m0);
    const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + int64_t(m0) * p.q_st.l;
    const T* d = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + int64_t(m0) * p.dout_st.l;
    load_tile_async<QTile, kThreads, kHD>(sQ + stage * QTile::kElems, q, p.q_st.l, int(p.L - m0), int(p.E), tid);
    load_tile_async<QTile, kThreads, kHD>(sdO + stage * QTile::kElems, d, p.dout_st.l, int(p.L - m0), int(p.Ev), tid);
    // The tile's row statistics ride in the same copy group, raw (m, log2 l, delta; rows past L
    // zero-filled): the thread that copies a row fixes it up once its copies land (below).
    if (tid < kBM) {
      static_assert(kBM <= kThreads, "one thread per row of a query tile's statistics");
      const bool in = m0 + tid < p.L;
      const int64_t row = (b * p.Hq + h) * p.stat_len() + (in ? m0 + tid : 0);
      const float* src = static_cast<const float*>(p.stats) + row * 2;
      float* st = sStat + stage * 3 * kBM + tid;
      cp_async_4(st, src, in);
      cp_async_4(st + kBM, src + 1, in);
      cp_async_4(st + 2 * kBM, delta + row, in);
    }
  };
  // The mask's block map, as in the forward: query tiles that see none of this CTA's keys are neither
  // loaded nor computed (their P and dS are 0), unchanged ones are computed without reading the mask.
  constexpr bool kMap = kHasMask && !kMods;
  auto flags_of = [&](int it) {
    int64_t h;
    int m0;
    tile_of(it, h, m0);
    return tile_map_flags<kBM, kBN>(p, b, h, m0, n0, lane);
  };
  int next_flags = kMap && n_iters > 0 ? flags_of(0) : kMapSees | kMapMasks;
  if (n_iters > 0 && (next_flags & kMapSees)) prefetch(0, 0);
  cp_async_commit();

  for (int it = 0; it < n_iters; ++it) {
    const int stage = it & 1;
    int64_t h;
    int m0;
    tile_of(it, h, m0);
    const int flags = next_flags;
    if (it + 1 < n_iters) {
      if constexpr (kMap) next_flags = flags_of(it + 1);
      if (next_flags & kMapSees) prefetch(it + 1, stage ^ 1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    // Hidden by the mask: nothing to add. No barrier: this stage was not loaded and nobody reads it, and
    // the last reads of the other stage (the next prefetch's) ended in the previous iteration's barrier.
    if (kMap && !(flags & kMapSees)) continue;
    // This thread's copies of the tile's row statistics have landed; row_stats' conventions before the
    // barrier shares them: rows past L and fully masked rows get m = +inf, log2 l = 0 (P = 0, not NaN).
    float* st = sStat + stage * 3 * kBM;
    if (tid < kBM && (m0 + tid >= p.L || st[tid] == kNegInf)) st[tid] = INFINITY, st[kBM + tid] = 0.f;
    __syncthreads();
    const T* sQs = sQ + stage * QTile::kElems;
    const T* sdOs = sdO + stage * QTile::kElems;
    const MaskReader mask(p, b, h);
    const ScoreModsOf<kMods> mods(p, b, h);

    // S^T = K Q^T and dP^T = V dO^T: rows = this warp's 16 keys, columns = the tile's queries.
    float s[kMT][4], dp[kMT][4];
    zero(s), zero(dp);
    warp_mma_abt<T, KVTile, QTile, kHD, kMT>(s, sK, wrow, sQs, lane);
    warp_mma_abt<T, KVTile, QTile, kHD, kMT>(dp, sV, wrow, sdOs, lane);

    // P^T and dS^T in place (element (key, query)).
    const bool check = true;  // bounds, the band and masks vary over queries: always mask here
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t key = n0 + wrow + g + 8 * r;
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int qi = j * 8 + 2 * t + c;
          if constexpr (kMods) {
            float th;
            const float x = mods_mask_score<true>(s[j][2 * r + c], m0 + qi, key, p, mask, mods, th);
            const float pv = fast_exp2((x - st[qi]) * kLog2e - st[kBM + qi]);
            const float z = mods.dropout ? mods.dropout_one(m0 + qi, key) : 1.f;
            s[j][2 * r + c] = pv * z;
            dp[j][2 * r + c] = pv * (dp[j][2 * r + c] * z - st[2 * kBM + qi]) * (1.f - th * th);
          } else {
            const float x = mask_score<kHasMask, kLeft, kHasMask || kLeft>(s[j][2 * r + c], m0 + qi, key, p, mask, check,
                                                                      flags & kMapMasks);
            const float pv = fast_exp2((x - st[qi]) * kLog2e - st[kBM + qi]);
            s[j][2 * r + c] = pv;
            dp[j][2 * r + c] = pv * (dp[j][2 * r + c] - st[2 * kBM + qi]);
          }
        }
      }
    }

    // dV += P^T dO, then dK += dS^T Q, over this CTA's columns: P is dead before dS's operands load.
    warp_mma_pb<T, QTile, kMT, kOT>(dv, s, sdOs, col0, lane);
    warp_mma_pb<T, QTile, kMT, kOT>(dk, dp, sQs, col0, lane);
    __syncthreads();
  }
  cp_async_wait<0>();

  // Write dK (times scale) and dV: this warp's 16 keys, this CTA's columns; with the group split, this
  // part's float32 sums into its rows of the workspace (attention_bwd_sum_kv_parts_kernel adds the parts).
  T* dkb = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h;
  T* dvb = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h;
  const float scale = static_cast<float>(p.scale);
  // Two separate store loops: one loop with the branch inside spilled (hdim 128 on sm_90a: 8 B).
  if (p.kv_parts > 1) {
    const int64_t width = p.E + p.Ev;  // a workspace row: dK's columns, then dV's
    float* ws = p.dkv_parts + ((part * p.Hkv + hk) * p.dkv_rows + b * p.S) * width;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t key = n0 + wrow + g + 8 * r;
      if (key >= p.S) continue;
#pragma unroll
      for (int ot = 0; ot < kOT; ++ot) {
        const int col = col0 + ot * 8 + 2 * t;
        if (col < p.E) {
          *reinterpret_cast<float2*>(ws + key * width + col) = make_float2(dk[ot][2 * r] * scale, dk[ot][2 * r + 1] * scale);
        }
        if (col < p.Ev) {
          *reinterpret_cast<float2*>(ws + key * width + p.E + col) = make_float2(dv[ot][2 * r], dv[ot][2 * r + 1]);
        }
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = n0 + wrow + g + 8 * r;
    if (key >= p.S) continue;
#pragma unroll
    for (int ot = 0; ot < kOT; ++ot) {
      const int col = col0 + ot * 8 + 2 * t;
      if (col < p.E) {
        *reinterpret_cast<uint32_t*>(dkb + key * p.dk_st.l + col) =
            pack2<T>(dk[ot][2 * r] * scale, dk[ot][2 * r + 1] * scale);
      }
      if (col < p.Ev) {
        *reinterpret_cast<uint32_t*>(dvb + key * p.dv_st.l + col) = pack2<T>(dv[ot][2 * r], dv[ot][2 * r + 1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// dK and dV from the dK/dV pass's float32 parts (p.kv_parts > 1): each element the sum of its parts in
// part order, rounded once. One CTA per (kSumKeys keys, kv head, batch); a thread takes column pairs
// (E and Ev are even, so a pair never straddles dK and dV).
constexpr int kSumKeys = 8;

template <typename T>
__global__ void attention_bwd_sum_kv_parts_kernel(const AttentionParams params) {
  AttentionParams p = params;
  int64_t tok0;
  const int64_t b = enter_batch<T>(p, tok0);
  const int64_t hk = blockIdx.y, key0 = int64_t(blockIdx.x) * kSumKeys;
  const int64_t width = p.E + p.Ev, plane = p.Hkv * p.dkv_rows * width;  // plane: between parts
  const float* ws = p.dkv_parts + (hk * p.dkv_rows + b * p.S + key0) * width;
  T* dk = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h + key0 * p.dk_st.l;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h + key0 * p.dv_st.l;
  const int64_t keys = p.S - key0 < kSumKeys ? p.S - key0 : kSumKeys;
  for (int64_t pair = threadIdx.x; pair < keys * width / 2; pair += blockDim.x) {
    const int64_t key = 2 * pair / width, col = 2 * pair % width;
    float2 acc = make_float2(0.f, 0.f);
    for (int64_t part = 0; part < p.kv_parts; ++part) {
      const float2 x = *reinterpret_cast<const float2*>(ws + part * plane + key * width + col);
      acc.x += x.x, acc.y += x.y;
    }
    T* dst = col < p.E ? dk + key * p.dk_st.l + col : dv + key * p.dv_st.l + (col - p.E);
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc.x, acc.y);
  }
}

// ---------------------------------------------------------------------------------------------------
// Shared by the dQ and dMask passes: for one tile of query rows (in sQ/sdO, stats in registers) and one
// tile of keys (in sKs/sVs), compute dS (in s) for this warp's 16 kMT rows (kMT row tiles of 16). p_sum,
// when given, gets this thread's P of each of its rows added (2 mt + r: the dMask pass's sums over
// keys). kMods: with the score modifications, dS = P (dP Z - delta), times the cap's derivative when
// kCapGrad (dQ: dR; the mask's gradient is dS itself).
template <typename Traits, bool kHasMask, bool kMods = false, bool kCapGrad = false, int kMT = Traits::kMTiles,
          int kNT = Traits::kBlockN / 8>
__device__ __forceinline__ void compute_ds(float (&s)[kMT][kNT][4], const typename Traits::T* sQ,
                                           const typename Traits::T* sdO, const typename Traits::T* sKs,
                                           const typename Traits::T* sVs, int wrow, int lane, int64_t m0,
                                           int64_t n0, const float (&m)[kMT][2], const float (&log2l)[kMT][2],
                                           const float (&dl)[kMT][2], bool check, const AttentionParams& p,
                                           const MaskReader& mask, const ScoreModsOf<kMods>& mods,
                                           float* p_sum = nullptr, bool read_mask = true) {
  using T = typename Traits::T;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int kHD = Traits::kHeadDim;
  const int g = lane >> 2, t = lane & 3;
  float dp[kMT][kNT][4];
  zero(s), zero(dp);
  warp_mma_abt<T, QTile, KVTile, kHD, kMT, kNT>(s, sQ, wrow, sKs, lane);
  warp_mma_abt<T, QTile, KVTile, kHD, kMT, kNT>(dp, sdO, wrow, sVs, lane);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = m0 + wrow + 16 * mt + g + 8 * r;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        if constexpr (kMods) {
          float z[2] = {1.f, 1.f};
          if (mods.dropout) mods.dropout_pair(i, n0 + j * 8 + 2 * t, z[0], z[1]);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float th;
            const float x = mods_mask_score(s[mt][j][2 * r + c], i, n0 + j * 8 + 2 * t + c, p, mask, mods, th);
            const float pv = fast_exp2((x - m[mt][r]) * kLog2e - log2l[mt][r]);
            const float ds = pv * (dp[mt][j][2 * r + c] * z[c] - dl[mt][r]);
            s[mt][j][2 * r + c] = kCapGrad ? ds * (1.f - th * th) : ds;
            if (p_sum) p_sum[2 * mt + r] += pv;
          }
        } else {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float x =
                mask_score<kHasMask>(s[mt][j][2 * r + c], i, n0 + j * 8 + 2 * t + c, p, mask, check, read_mask);
            const float pv = fast_exp2((x - m[mt][r]) * kLog2e - log2l[mt][r]);
            s[mt][j][2 * r + c] = pv * (dp[mt][j][2 * r + c] - dl[mt][r]);
            if (p_sum) p_sum[2 * mt + r] += pv;
          }
        }
      }
    }
  }
}

// kMods: the general variant with the score modifications (reads the user mask when there is one).
template <typename Traits, bool kHasMask, bool kMods = false>
__global__ void __launch_bounds__(Traits::kThreads) attention_bwd_dq_kernel(const AttentionParams params,
                                                                            const float* delta) {
  using T = typename Traits::T;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int kHD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNT = kBN / 8, kOT = kHD / 8, kMT = Traits::kMTiles;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + QTile::kElems;
  T* sK = sdO + QTile::kElems;  // [2][KVTile]
  T* sV = sK + 2 * KVTile::kElems;

  AttentionParams p = params;
  int64_t tok0;
  const int64_t b = enter_batch<T, !kHasMask || kMods>(p, tok0);  // packed batches have no mask
  delta += tok0;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int m_block = p.has_right && !p.has_left ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // longest first
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int m0 = m_block * kBM;
  if (m0 >= p.L) return;  // past the rows of its sequence (a packed batch's shorter ones)
  const int wrow = warp * 16 * kMT;

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + int64_t(m0) * p.q_st.l;
  const T* d = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + int64_t(m0) * p.dout_st.l;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
  const MaskReader mask(p, b, h);
  const ScoreModsOf<kMods> mods(p, b, h);

  const KeyRange<true> keys(p, m0, kBM, kBN);
  const int n_end = keys.end;
  const int n_blocks = keys.begin < n_end ? (n_end - keys.begin + kBN - 1) / kBN : 0;  // tiles from keys.begin

  // The mask's block map, as in the forward: hidden key tiles are neither loaded nor computed (their dS is
  // 0), unchanged ones are computed without reading the mask.
  constexpr bool kMap = kHasMask && !kMods;
  int next_flags = kMapSees | kMapMasks;
  if constexpr (kMap) {
    if (n_blocks > 0) next_flags = tile_map_flags<kBM, kBN>(p, b, h, m0, keys.begin, lane);
  }

  load_tile_async<QTile, kThreads, kHD>(sQ, q, p.q_st.l, int(p.L - m0), int(p.E), tid);
  load_tile_async<QTile, kThreads, kHD>(sdO, d, p.dout_st.l, int(p.L - m0), int(p.Ev), tid);
  cp_async_commit();
  if (n_blocks > 0 && (next_flags & kMapSees)) {
    load_kv_async<KVTile, kThreads, kHD>(sK, sV, k, v, p, keys.begin, n_end, tid);
  }
  cp_async_commit();

  float m[kMT][2], log2l[kMT][2], dl[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = m0 + wrow + 16 * mt + g + 8 * r;
      row_stats(p, b * p.Hq + h, i, m[mt][r], log2l[mt][r]);
      dl[mt][r] = i < p.L ? delta[(b * p.Hq + h) * p.stat_len() + i] : 0.f;
    }
  }
  float dq[kMT][kOT][4];
  zero(dq);

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    const int n0 = keys.begin + nb * kBN;
    const int flags = next_flags;
    if (nb + 1 < n_blocks) {
      if constexpr (kMap) next_flags = tile_map_flags<kBM, kBN>(p, b, h, m0, n0 + kBN, lane);
      if (next_flags & kMapSees) {
        load_kv_async<KVTile, kThreads, kHD>(sK + (stage ^ 1) * KVTile::kElems, sV + (stage ^ 1) * KVTile::kElems,
                                             k, v, p, n0 + kBN, n_end, tid);
      }
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (!kMap || (flags & kMapSees)) {  // else hidden by the mask: dS = 0
      const T* sKs = sK + stage * KVTile::kElems;
      const T* sVs = sV + stage * KVTile::kElems;

      float ds[kMT][kNT][4];
      const bool check = n0 + kBN > p.S || keys.check(p, n0, kBN) || kHasMask;
      compute_ds<Traits, kHasMask, kMods, true>(ds, sQ, sdO, sKs, sVs, wrow, lane, m0, n0, m, log2l, dl, check, p,
                                                mask, mods, nullptr, flags & kMapMasks);

      // dQ += dS K
      warp_mma_pb<T, KVTile, kMT, kNT, kOT>(dq, ds, sKs, 0, lane);
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dqb = static_cast<T*>(p.dq) + b * p.dq_st.b + h * p.dq_st.h;
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = m0 + wrow + 16 * mt + g + 8 * r;
      if (i >= p.L) continue;
#pragma unroll
      for (int ot = 0; ot < kOT; ++ot) {
        const int col = ot * 8 + 2 * t;
        if (col < p.E) {
          *reinterpret_cast<uint32_t*>(dqb + i * p.dq_st.l + col) =
              pack2<T>(dq[mt][ot][2 * r] * scale, dq[mt][ot][2 * r + 1] * scale);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// dMask (Bm, Hm, Lm, Sm), float32: one CTA per (kBlockM x kBlockN) tile of it (or per row strip /
// column strip / single value when the mask broadcasts over L and/or S), looping over every (b, h,
// query tile, key tile) that reads those entries; sums in registers, then in shared memory, in a
// fixed order. Summed over keys (sum_s), a row's sum of dS = P (dP - delta) is formed as
// A (1 - B) + dlse B with A = sum P dP, B = sum P: the same value without the cancellation of delta
// (rounded from O) against A; each row's value goes to its column 0 of the tile. A row that sees no key
// has B = 0 and gives 0 (with dropout A = sum P dP Z, B = sum P: the same identity). kMods: the variant
// with the score modifications.
template <typename Traits, bool kMods = false>
__global__ void __launch_bounds__(Traits::kThreads, 1) attention_bwd_dmask_kernel(const AttentionParams p,
                                                                               const float* delta, float* dmask) {
  using T = typename Traits::T;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int kHD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNT = kBN / 8;
  static_assert(Traits::kMTiles == 1, "dMask: one 16-row tile per warp");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + QTile::kElems;
  T* sK = sdO + QTile::kElems;
  T* sV = sK + KVTile::kElems;
  float* sAcc = reinterpret_cast<float*>(smem_raw);  // reused for the final reduction (kBM x kBN)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const bool sum_b = p.Bm == 1 && p.B > 1, sum_h = p.Hm == 1 && p.Hq > 1;
  const bool sum_l = p.Lm == 1 && p.L > 1, sum_s = p.Sm == 1 && p.S > 1;
  const int64_t bh = blockIdx.z, bm = bh / p.Hm, hm = bh % p.Hm;
  const int64_t r0 = sum_l ? 0 : int64_t(blockIdx.x) * kBM, r1 = sum_l ? p.L : min(r0 + kBM, p.L);
  const int64_t c0 = sum_s ? 0 : int64_t(blockIdx.y) * kBN, c1 = sum_s ? p.S : min(c0 + kBN, p.S);
  const int wrow = warp * 16;

  float acc[kNT][4];
  zero(acc);

  for (int64_t b = sum_b ? 0 : bm; b < (sum_b ? p.B : bm + 1); ++b) {
    for (int64_t h = sum_h ? 0 : hm; h < (sum_h ? p.Hq : hm + 1); ++h) {
      const int64_t hk = h / p.group;
      const MaskReader mask(p, b, h);
      const ScoreModsOf<kMods> mods(p, b, h);
      const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
      const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
      for (int64_t m0 = r0; m0 < r1; m0 += kBM) {
        const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + m0 * p.q_st.l;
        const T* d = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + m0 * p.dout_st.l;
        __syncthreads();
        load_tile_async<QTile, kThreads, kHD>(sQ, q, p.q_st.l, int(p.L - m0), int(p.E), tid);
        load_tile_async<QTile, kThreads, kHD>(sdO, d, p.dout_st.l, int(p.L - m0), int(p.Ev), tid);
        float m[1][2], log2l[1][2], dl[1][2];  // one row tile per warp (Traits::kMTiles == 1)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t i = m0 + wrow + g + 8 * r;
          row_stats(p, b * p.Hq + h, i, m[0][r], log2l[0][r]);
          dl[0][r] = i < p.L ? delta[(b * p.Hq + h) * p.L + i] : 0.f;
          if (sum_s) dl[0][r] = 0.f;  // compute_ds then leaves P dP
        }
        float row_pdp[2] = {0.f, 0.f}, row_p[2] = {0.f, 0.f};  // sum_s: this thread's part of A and B
        for (int64_t n0 = c0; n0 < c1; n0 += kBN) {
          if (n0 != c0) __syncthreads();
          load_kv_async<KVTile, kThreads, kHD>(sK, sV, k, v, p, n0, p.S, tid);
          cp_async_commit();
          cp_async_wait<0>();
          __syncthreads();
          float ds[1][kNT][4];
          compute_ds<Traits, true, kMods, false>(ds, sQ, sdO, sK, sV, wrow, lane, m0, n0, m, log2l, dl, true, p,
                                                 mask, mods, sum_s ? row_p : nullptr);
          if (sum_s) {
#pragma unroll
            for (int j = 0; j < kNT; ++j) {
              row_pdp[0] += ds[0][j][0] + ds[0][j][1];
              row_pdp[1] += ds[0][j][2] + ds[0][j][3];
            }
          } else {
#pragma unroll
            for (int j = 0; j < kNT; ++j) {
              acc[j][0] += ds[0][j][0], acc[j][1] += ds[0][j][1], acc[j][2] += ds[0][j][2], acc[j][3] += ds[0][j][3];
            }
          }
        }
        if (sum_s) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float a = quad_sum(row_pdp[r]), bs = quad_sum(row_p[r]);
            const int64_t i = m0 + wrow + g + 8 * r;
            float v = a * (1.f - bs);
            if (p.dlse && bs != 0.f && i < p.L) {
              v += static_cast<const float*>(p.dlse)[b * p.dlse_st.b + h * p.dlse_st.h + i * p.dlse_st.l] * bs;
            }
            if (t == 0) acc[0][2 * r] += v;
          }
        }
      }
    }
  }

  // Tile -> shared memory -> sums over broadcast rows/columns, in a fixed order -> dmask.
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sAcc[(wrow + g + 8 * (e >> 1)) * kBN + j * 8 + 2 * t + (e & 1)] = acc[j][e];
  }
  __syncthreads();
  float* dm = dmask + (bm * p.Hm + hm) * p.Lm * p.Sm;
  const int rows = sum_l ? 1 : int(r1 - r0), cols = sum_s ? 1 : int(c1 - c0);
  for (int idx = tid; idx < rows * cols; idx += kThreads) {
    const int rr = idx / cols, cc = idx % cols;
    float total = 0.f;
    for (int i = (sum_l ? 0 : rr); i < (sum_l ? kBM : rr + 1); ++i) {
      for (int j = (sum_s ? 0 : cc); j < (sum_s ? kBN : cc + 1); ++j) total += sAcc[i * kBN + j];
    }
    dm[(r0 + rr) * p.Sm + (c0 + cc)] = total;
  }
}

}  // namespace cuda
}  // namespace attnkern
