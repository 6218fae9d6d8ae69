// KV-cache decoding on tensor cores (sm80+): the split-KV kernel and the combine kernel behind
// attnkern_ext::decode (the problem: ../decode_params.h; the entry points: decode_dispatch.h).
//
// Grid (num_splits * row blocks, Hkv, B). A CTA takes one kv head of one batch element and the query
// rows of its GQA group as the MMA's M rows: R = group * Lq rows, row r being query head
// hk * group + r / Lq at query position r % Lq, kBlockM of them per CTA (warps past R skip the math),
// so each K/V tile is loaded once for every query head that reads it. The keys some row of the batch
// element sees ([kb, ke): band and length) are cut into tiles of kBlockN keys and the tiles into
// num_splits consecutive shares; a CTA walks its share with the forward kernel's two-stage cp.async
// pipeline, looking up the page of every key row in the block table (so any page size works, and a
// tile may straddle pages), and runs the same online softmax in fp32. Per score: scale, softcap,
// ALiBi, then the row's band and the share's bounds.
// With one split the CTA writes out and lse itself; otherwise its normalized partial output and its lse
// go to the workspace, and the combine kernel merges the splits of each row by their lse:
//     M = max_s lse_s,  lse = M + ln sum_s e^(lse_s - M),  out = sum_s e^(lse_s - lse) out_s
// (a row that saw no key: out 0, lse -inf; a NaN lse of any split makes the row NaN).
#pragma once

#include <math.h>

#include "decode_dispatch.h"
#include "launch.h"  // allow_smem
#include "mask.h"    // kLog2e, kLn2, kNegInf, clamp64
#include "tile.h"

namespace attnkern {
namespace cuda {

// The tiles of one head dim: FwdTraits with 4 warps (kDecodeBlockM rows) and decode_tile_keys keys (the
// capping and ALiBi are always compiled in here, as in the score modifications' forward).
template <typename T, int HD>
struct DecodeConfig {
  using Traits = FwdTraits<HD, decode_tile_keys(HD), kDecodeBlockM / 16, T>;
  static_assert(Traits::kBlockM == kDecodeBlockM, "decode_row_blocks assumes kDecodeBlockM rows per CTA");
};

// cp.async Tile::kRows rows into a tile, row `row` read from row_ptr(row) (unit stride along the head dim):
// rows >= valid_rows and head-dim chunks >= head_dim read as zero, and row_ptr is called for valid rows
// only (a key row past the share has no page to look up). `any`: a readable address for the zero fills.
template <typename Tile, int kThreads, int kHeadDim, typename T, typename RowPtr>
__device__ __forceinline__ void load_rows_async(T* smem, const RowPtr& row_ptr, int valid_rows, int head_dim,
                                                const T* any, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kTotal = Tile::kRows * kChunksPerRow;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = it * kThreads + tid;
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int row = i / kChunksPerRow;
      const int chunk = i % kChunksPerRow;
      const bool valid = row < valid_rows && chunk * 8 < head_dim;
      cp_async_16(smem + Tile::offset(row, chunk * 8), valid ? row_ptr(row) + chunk * 8 : any, valid);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) decode_splitkv_kernel(const DecodeParams p, const DecodeWorkspace ws) {
  using T = typename Traits::T;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int kHD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNT = kBN / 8;  // n8 tiles of a warp's score rows
  constexpr int kOT = kHD / 8;  // n8 tiles of a warp's output rows

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + QTile::kElems;
  T* sV = sK + Traits::kStages * KVTile::kElems;

  // Key, row and tile indices are 32-bit (seqlens are int32): a 64-bit division is a subroutine call,
  // and the registers live across it spill.
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int Lq = int(p.Lq), rows = int(p.group) * Lq, row_blocks = (rows + kBM - 1) / kBM;
  const int split = int(blockIdx.x) / row_blocks, m0 = int(blockIdx.x) % row_blocks * kBM;
  const int64_t hk = blockIdx.y, b = blockIdx.z;

  // The keys some query row of b sees, [kb, ke), and this split's share of their tiles, [n_begin, n_end).
  const int n = p.seqlens[b * p.seqlens_st], off = n - Lq;
  const int kb = p.has_left ? int(clamp64(int64_t(off) - p.left, 0, n)) : 0;
  const int ke = max(kb, p.has_right ? int(clamp64(int64_t(n) + p.right, 0, n)) : n);
  const int tiles = (ke - kb + kBN - 1) / kBN, per_split = (tiles + int(ws.num_splits) - 1) / int(ws.num_splits);
  const int t0 = min(tiles, split * per_split), t1 = min(tiles, t0 + per_split);
  const int n_begin = kb + t0 * kBN, n_end = min(ke, kb + t1 * kBN);
  const int n_blocks = t1 - t0;
  const int page_size = int(p.page_size);

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  auto q_row = [&](int row) {
    const int r = m0 + row;
    return q + b * p.q_st.s0 + (r % Lq) * p.q_st.s1 + (hk * p.group + r / Lq) * p.q_st.s2;
  };
  // Key j of b in kv head hk: page j / page_size of b's block table (page b of a contiguous cache).
  auto key_offset = [&](const Strides4D& st, int j) {
    const int64_t page = p.block_table ? p.block_table[b * p.bt_st_b + (j / page_size) * p.bt_st_p] : b;
    return page * st.s0 + (j % page_size) * st.s1 + hk * st.s2;
  };
  auto load_kv = [&](T* dK, T* dV, int n0) {
    const int valid = min(n_end - n0, kBN);
    load_rows_async<KVTile, kThreads, kHD>(dK, [&](int row) { return k + key_offset(p.k_st, n0 + row); }, valid,
                                           int(p.E), k, tid);
    load_rows_async<KVTile, kThreads, kHD>(dV, [&](int row) { return v + key_offset(p.v_st, n0 + row); }, valid,
                                           int(p.Ev), v, tid);
  };

  load_rows_async<QTile, kThreads, kHD>(sQ, q_row, min(rows - m0, kBM), int(p.E), q, tid);
  cp_async_commit();
  if (n_blocks > 0) load_kv(sK, sV, n_begin);
  cp_async_commit();

  // This thread's rows g and g + 8 of its warp: query position, query head, the keys [lo, hi) it sees
  // within the share, the ALiBi slope and the position its distances are measured from.
  const int wrow = warp * 16;
  const bool active = m0 + wrow < rows;  // warp-uniform: warps wholly past the group's rows skip the math
  int pos[2], lo[2], hi[2];
  int64_t head[2];
  float slope[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = min(m0 + wrow + g + 8 * r, rows - 1);
    pos[r] = row % Lq, head[r] = hk * p.group + row / Lq;
    const int64_t diag = pos[r] + off;  // the key aligned with this query (bottom-right)
    lo[r] = p.has_left ? int(clamp64(diag - p.left, n_begin, n_end)) : n_begin;
    hi[r] = p.has_right ? int(clamp64(diag + p.right + 1, n_begin, n_end)) : n_end;
    slope[r] = p.alibi ? p.alibi[b * p.alibi_st_b + head[r]] : 0.f;
  }
  const float scale = float(p.scale), softcap = float(p.softcap);
  const float inv_softcap = p.softcap > 0.0 ? float(1.0 / p.softcap) : 0.f;

  float o[kOT][4];
  zero(o);
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    const int n0 = n_begin + nb * kBN;
    if (nb + 1 < n_blocks) {  // prefetch the next tile into the other stage
      load_kv(sK + (stage ^ 1) * KVTile::kElems, sV + (stage ^ 1) * KVTile::kElems, n0 + kBN);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q and this tile have landed
    __syncthreads();
    if (active) {
      const T* sKs = sK + stage * KVTile::kElems;
      const T* sVs = sV + stage * KVTile::kElems;
      float s[kNT][4];
      zero(s);
      warp_mma_abt<T, QTile, KVTile, kHD, kNT>(s, sQ, wrow, sKs, lane);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int key = n0 + j * 8 + 2 * t + c;
            float x = s[j][2 * r + c] * scale;
            if (softcap > 0.f) x = softcap * tanhf(x * inv_softcap);
            if (slope[r] != 0.f) {
              const int d = pos[r] + off - key;
              x -= slope[r] * float(d < 0 ? -d : d);
            }
            x = key >= lo[r] && key < hi[r] ? x : kNegInf;
            s[j][2 * r + c] = x;
            mx = fmaxf(mx, x);
          }
        }
        const float m_new = fmaxf(row_max[r], quad_max(mx));
        const float m_safe = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: keep P at 0, not NaN
        const float alpha = fast_exp2((row_max[r] - m_safe) * kLog2e);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& x = s[j][2 * r + c];
            x = fast_exp2((x - m_safe) * kLog2e);
            sum += x;
          }
        }
        row_sum[r] = row_sum[r] * alpha + sum;  // this thread's part; the quad's parts add up at the end
        row_max[r] = m_new;
#pragma unroll
        for (int i2 = 0; i2 < kOT; ++i2) {
          o[i2][2 * r] *= alpha;
          o[i2][2 * r + 1] *= alpha;
        }
      }
      warp_mma_pb<T, KVTile, kNT, kOT>(o, s, sVs, 0, lane);  // O += P V
    }
    __syncthreads();  // everyone is done with this stage before the next prefetch overwrites it
  }
  cp_async_wait<0>();

  // Normalize; with one split store out and lse, else this split's partial output and lse.
  const bool direct = ws.num_splits == 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    if (m0 + wrow + g + 8 * r >= rows) continue;
    // l == 0: every key masked (or none in the share), output 0; l NaN (NaN or +inf scores): NaN row.
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    const int64_t lse_idx = (b * p.Hq + head[r]) * p.Lq + pos[r];
    const int64_t ws_idx = split * p.B * p.Hq * p.Lq + lse_idx;
    T* out = static_cast<T*>(p.out) + b * p.out_st.s0 + pos[r] * p.out_st.s1 + head[r] * p.out_st.s2;
    float* part = ws.out + ws_idx * p.Ev;
#pragma unroll
    for (int ot = 0; ot < kOT; ++ot) {
      const int col = ot * 8 + 2 * t;
      if (col < p.Ev) {
        const float x0 = o[ot][2 * r] * inv, x1 = o[ot][2 * r + 1] * inv;
        if (direct) {
          *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(x0, x1);
        } else {
          part[col] = x0, part[col + 1] = x1;
        }
      }
    }
    if (t == 0) {
      const float lse = empty ? kNegInf : row_max[r] + log2f(l) * kLn2;
      (direct ? static_cast<float*>(p.lse)[lse_idx] : ws.lse[ws_idx]) = lse;
    }
  }
}

// One warp per output row (b, h, i), in lse order: merges the row's num_splits partial results.
constexpr int kCombineRowsPerBlock = 4;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineRowsPerBlock * 32) decode_combine_kernel(const DecodeParams p,
                                                                                  const DecodeWorkspace ws) {
  constexpr int kCols = (kHeadDim + 31) / 32;  // columns per lane
  const int64_t rows = p.B * p.Hq * p.Lq;
  const int64_t row = int64_t(blockIdx.x) * kCombineRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // warp-uniform
  const int64_t ns = ws.num_splits;

  float m = kNegInf;
  int nan = 0;
  for (int64_t s = lane; s < ns; s += 32) {
    const float x = ws.lse[s * rows + row];
    nan |= isnan(x) ? 1 : 0;
    m = fmaxf(m, x);
  }
  for (int d = 16; d > 0; d >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
    nan |= __shfl_xor_sync(0xffffffffu, nan, d);
  }
  float lse = nan ? NAN : kNegInf;
  if (!nan && m != kNegInf) {
    float sum = 0.f;
    for (int64_t s = lane; s < ns; s += 32) sum += expf(ws.lse[s * rows + row] - m);
    for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, d);
    lse = m + logf(sum);
  }
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = nan ? NAN : 0.f;
  if (!nan && lse != kNegInf) {
    for (int64_t s = 0; s < ns; ++s) {
      const float w = expf(ws.lse[s * rows + row] - lse);
      const float* part = ws.out + (s * rows + row) * p.Ev;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = lane + 32 * c;
        if (col < p.Ev) acc[c] += w * part[col];
      }
    }
  }
  const int64_t i = row % p.Lq, h = row / p.Lq % p.Hq, b = row / (p.Lq * p.Hq);
  T* out = static_cast<T*>(p.out) + b * p.out_st.s0 + i * p.out_st.s1 + h * p.out_st.s2;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int col = lane + 32 * c;
    if (col < p.Ev) out[col] = from_float<T>(acc[c]);
  }
  if (lane == 0) static_cast<float*>(p.lse)[row] = lse;
}

template <typename T, int HD>
cudaError_t run_decode(const DecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  using Traits = typename DecodeConfig<T, HD>::Traits;
  auto kernel = decode_splitkv_kernel<Traits>;
  cudaError_t err = allow_smem(kernel, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  if (p.B * p.Hq * p.Lq == 0) return cudaSuccess;  // nothing to compute (a launch would fail)
  const dim3 grid(unsigned(ws.num_splits * decode_row_blocks(p)), unsigned(p.Hkv), unsigned(p.B));
  ATTNKERN_LAUNCH(kernel, grid, Traits::kThreads, Traits::kSmemBytes, stream)(p, ws);
  if ((err = cudaGetLastError()) != cudaSuccess || ws.num_splits == 1) return err;
  const int64_t rows = p.B * p.Hq * p.Lq;
  const dim3 grid_c(unsigned((rows + kCombineRowsPerBlock - 1) / kCombineRowsPerBlock));
  auto combine = decode_combine_kernel<T, HD>;  // (a template argument list would split the macro's arguments)
  ATTNKERN_LAUNCH(combine, grid_c, kCombineRowsPerBlock * 32, 0, stream)(p, ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
