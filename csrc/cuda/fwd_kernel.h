// Attention forward on tensor cores (sm80+), FlashAttention-2 style.
//
// One CTA per (block of kBlockM query rows, query head, batch); warp w owns rows [16 kMT w, 16 kMT (w + 1)):
// kMT = 2 (32 rows per warp) where the registers allow, so that each K and V fragment a warp loads from
// shared memory serves two row tiles.
// Q is loaded once into shared memory; K/V tiles of kBlockN keys stream through a two-stage cp.async
// pipeline (the next tile loads while this one computes). Per tile, in registers:
//     S = Q K^T (mma m16n8k16, fp32 accumulators); scale; user mask, band (causal, window), key bound
//     online softmax: row max m (natural units), P = 2^((S - m) log2 e), rescale O by 2^((m_old - m) log2 e)
//     O += P V   (P reused from the S accumulators as the A operand, converted to T)
// Banded problems (causal, window) visit only the key tiles the block sees; only tiles that cross an
// edge of the band (or the key bound, or any tile when there is a user mask) pay for per-element masking.
// A user mask's block map (attnkern/block_map.py) skips the key tiles it hides from the whole block and
// the mask reads of tiles it leaves unchanged.
// Writes O, the lse and the per-row statistics (row max, log2 denominator) the backward recomputes P
// from, and, when p.out_lo is set, the output's rounding residual (for the backward's delta).
// The kMods variant (soft-capping, ALiBi, dropout: mods.h) caps and biases the scaled scores before the
// masks and drops probabilities after the softmax statistics (P V uses the dropped P; l and the lse do not).
#pragma once

#include "mask.h"
#include "mods.h"
#include "tile.h"
#include "varlen.h"

namespace attnkern {
namespace cuda {

// kLeft: whether the band may have a left bound (a sliding window); the launch takes the variant without
// it otherwise (registers: see mask_score). kMods: the general variant with the score modifications, for
// problems that have some (it reads the user mask when there is one, kHasMask and kLeft being true).
template <typename Traits, bool kHasMask, bool kLeft, bool kMods = false>
__global__ void __launch_bounds__(Traits::kThreads) attention_fwd_kernel(const AttentionParams params) {
  using T = typename Traits::T;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int kHD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNT = kBN / 8;  // n8 tiles of a warp's score rows
  constexpr int kOT = kHD / 8;  // n8 tiles of a warp's output rows
  constexpr int kMT = Traits::kMTiles;  // m16 tiles of a warp's rows

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + QTile::kElems;
  T* sV = sK + Traits::kStages * KVTile::kElems;

  AttentionParams p = params;
  int64_t tok0;
  const int64_t b = enter_batch<T, (!kHasMask && !kLeft) || kMods>(p, tok0);  // see run_attention_fwd
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  // Causal-like bands: the longest rows (most key tiles) first, for a better tail across SMs.
  const int m_block = p.has_right && !p.has_left ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int m0 = m_block * kBM;
  if (m0 >= p.L) return;  // past the rows of its sequence (a packed batch's shorter ones)

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + int64_t(m0) * p.q_st.l;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
  const MaskReader mask(p, b, h);
  const ScoreModsOf<kMods> mods(p, b, h);

  const KeyRange<kLeft> keys(p, m0, kBM, kBN);
  const int n_end = keys.end;
  const int n_blocks = keys.begin < n_end ? (n_end - keys.begin + kBN - 1) / kBN : 0;  // tiles from keys.begin

  // The mask's block map (p.mask_map): key tiles in which no row of the block sees a key are neither
  // loaded nor computed (their scores are all -inf: P = 0, the row statistics unchanged), and tiles the
  // mask does not change are computed without reading it. A tile's flags are read when it is prefetched.
  constexpr bool kMap = kHasMask && !kMods;
  int next_flags = kMapSees | kMapMasks;
  if constexpr (kMap) {
    if (n_blocks > 0) next_flags = tile_map_flags<kBM, kBN>(p, b, h, m0, keys.begin, lane);
  }

  load_tile_async<QTile, kThreads, kHD>(sQ, q, p.q_st.l, int(p.L - m0), int(p.E), tid);
  cp_async_commit();
  if (n_blocks > 0 && (next_flags & kMapSees)) {
    load_kv_async<KVTile, kThreads, kHD>(sK, sV, k, v, p, keys.begin, n_end, tid);
  }
  cp_async_commit();

  float o[kMT][kOT][4];
  zero(o);
  float row_max[kMT][2], row_sum[kMT][2];  // rows g and g + 8 of each of the warp's row tiles
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) row_max[mt][0] = row_max[mt][1] = kNegInf, row_sum[mt][0] = row_sum[mt][1] = 0.f;
  const int wrow = warp * 16 * kMT;

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    const int n0 = keys.begin + nb * kBN;
    const int flags = next_flags;
    if (nb + 1 < n_blocks) {  // prefetch the next tile into the other stage
      if constexpr (kMap) next_flags = tile_map_flags<kBM, kBN>(p, b, h, m0, n0 + kBN, lane);
      if (next_flags & kMapSees) {
        load_kv_async<KVTile, kThreads, kHD>(sK + (stage ^ 1) * KVTile::kElems, sV + (stage ^ 1) * KVTile::kElems,
                                             k, v, p, n0 + kBN, n_end, tid);
      }
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q and this tile have landed
    __syncthreads();
    if (!kMap || (flags & kMapSees)) {  // else hidden by the mask: nothing to compute
      const T* sKs = sK + stage * KVTile::kElems;
      const T* sVs = sV + stage * KVTile::kElems;

      // S = Q K^T
      float s[kMT][kNT][4];
      zero(s);
      warp_mma_abt<T, QTile, KVTile, kHD, kMT, kNT>(s, sQ, wrow, sKs, lane);

      // Scale and mask, then the online softmax update of rows g and g + 8.
      // A window's tiles are mostly edge tiles: its variant masks every tile (one code path, fewer registers).
      const bool check = kLeft || kHasMask || n0 + kBN > p.S || keys.check(p, n0, kBN);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t i = m0 + wrow + 16 * mt + g + 8 * r;
          float mx = kNegInf;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[mt][j][2 * r + c];
              if constexpr (kMods) {
                float tanh_unused;
                x = mods_mask_score(x, i, n0 + j * 8 + 2 * t + c, p, mask, mods, tanh_unused);
              } else {
                x = mask_score<kHasMask, kLeft>(x, i, n0 + j * 8 + 2 * t + c, p, mask, check, flags & kMapMasks);
              }
              mx = fmaxf(mx, x);
            }
          }
          const float m_new = fmaxf(row_max[mt][r], quad_max(mx));
          const float m_safe = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: keep P at 0, not NaN
          const float alpha = fast_exp2((row_max[mt][r] - m_safe) * kLog2e);
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[mt][j][2 * r + c];
              x = fast_exp2((x - m_safe) * kLog2e);
              sum += x;
            }
          }
          row_sum[mt][r] = row_sum[mt][r] * alpha + sum;  // this thread's part; the quad's parts add up at the end
          row_max[mt][r] = m_new;
          if constexpr (kMods) {
            if (mods.dropout) {  // after the sum: the statistics are those of the undropped P
#pragma unroll
              for (int j = 0; j < kNT; ++j) {
                float z0, z1;
                mods.dropout_pair(i, n0 + j * 8 + 2 * t, z0, z1);
                s[mt][j][2 * r] *= z0;
                s[mt][j][2 * r + 1] *= z1;
              }
            }
          }
#pragma unroll
          for (int i2 = 0; i2 < kOT; ++i2) {
            o[mt][i2][2 * r] *= alpha;
            o[mt][i2][2 * r + 1] *= alpha;
          }
        }
      }

      // O += P V
      warp_mma_pb<T, KVTile, kMT, kNT, kOT>(o, s, sVs, 0, lane);
    }
    __syncthreads();  // everyone is done with this stage before the next prefetch overwrites it
  }
  cp_async_wait<0>();

  // Normalize and store O; the lse and the statistics come from the quad's first thread.
  T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h;
  float* lse = static_cast<float*>(p.lse) + (b * p.Hq + h) * p.stat_len();
  float* stats = static_cast<float*>(p.stats) + (b * p.Hq + h) * p.stat_len() * 2;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = m0 + wrow + 16 * mt + g + 8 * r;
      const float l = quad_sum(row_sum[mt][r]);
      if (i >= p.L) continue;
      // l == 0: every key masked, output 0. l is NaN when the row's scores hold NaN or +inf: its output,
      // lse and statistics are then NaN (the row max may have dropped the NaN: fmaxf ignores it), as in
      // torch's math path, and the backward recomputes NaN probabilities for the row.
      const bool empty = l == 0.f;
      const float inv = empty ? 0.f : 1.f / l;
#pragma unroll
      for (int ot = 0; ot < kOT; ++ot) {
        const int col = ot * 8 + 2 * t;
        if (col < p.Ev) {
          *reinterpret_cast<uint32_t*>(out + i * p.out_st.l + col) =
              pack2<T>(o[mt][ot][2 * r] * inv, o[mt][ot][2 * r + 1] * inv);
        }
      }
      if (p.out_lo) {  // the rounding residual, for the backward's delta (a loop of its own: registers)
        T* lo = static_cast<T*>(p.out_lo) + b * p.out_lo_st.b + h * p.out_lo_st.h + i * p.out_lo_st.l;
#pragma unroll
        for (int ot = 0; ot < kOT; ++ot) {
          const int col = ot * 8 + 2 * t;
          if (col < p.Ev) {
            *reinterpret_cast<uint32_t*>(lo + col) =
                pack2_residual<T>(o[mt][ot][2 * r] * inv, o[mt][ot][2 * r + 1] * inv);
          }
        }
      }
      if (t == 0) {
        const float log2l = empty ? kNegInf : log2f(l);
        lse[i] = empty ? kNegInf : row_max[mt][r] + log2l * kLn2;
        stats[2 * i] = empty ? kNegInf : (isnan(l) ? l : row_max[mt][r]);
        stats[2 * i + 1] = log2l;
      }
    }
  }
}

}  // namespace cuda
}  // namespace attnkern
