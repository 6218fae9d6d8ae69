// Shared-memory tiles and the traits that size the CUDA kernels.
//
// A tile is kRows x kWidth b16 elements, row-major, with its 16-byte chunks XOR-swizzled inside each
// group of 8 chunks (chunk c of row r lives at c ^ (r % 8)), so that the eight rows an ldmatrix reads
// fall in eight different bank groups. The width is the head dim rounded up to a whole group (64
// elements; 32 for head dim 32, swizzled by (r / 2) % 4), which is why head dims 96 and 160 pad their
// shared-memory rows to 128 and 192.
#pragma once

#include <stdint.h>

#include "ptx.h"

namespace attnkern {
namespace cuda {

__host__ __device__ constexpr int smem_width(int head_dim) { return head_dim <= 32 ? 32 : (head_dim + 63) / 64 * 64; }

template <int kRows_, int kWidth_>
struct SmemTile {
  static constexpr int kRows = kRows_;
  static constexpr int kWidth = kWidth_;
  static constexpr int kChunks = kWidth / 8;  // 16-byte chunks per row
  static constexpr int kElems = kRows * kWidth;

  // Element offset of (row, col); col's chunk is swizzled, its offset within the chunk kept.
  __device__ __forceinline__ static int offset(int row, int col) {
    const int chunk = col >> 3;
    const int swz = kChunks >= 8 ? ((chunk & ~7) | ((chunk ^ row) & 7)) : (chunk ^ ((row >> 1) & 3));
    return row * kWidth + swz * 8 + (col & 7);
  }

  // Rows at least 64 elements wide swizzle by an XOR on bits 3-5 of the offset, so from a fragment's
  // base = offset(row, col) with col < 16, offset(row + dr, col + dc) for dr a multiple of 8 and dc of 16
  // is base + dr kWidth + (dc & ~63), its chunk bits XOR-ed with dc's: one LOP3 per address, where
  // offset() gives ptxas a distinct swizzled offset per fragment to keep in a register.
  static constexpr bool kXorSteps = kChunks >= 8;
  __device__ __forceinline__ static int step(int base, int dr, int dc) {
    return (base + dr * kWidth + (dc & ~63)) ^ (dc & 63);
  }
};

// cp.async a (rows x head_dim) block of a global tensor (row stride `row_stride` elements, unit stride
// along the head dim) into a tile: rows >= `valid_rows` and head-dim chunks >= `head_dim` read as zero.
template <typename Tile, int kThreads, int kHeadDim, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows,
                                                int head_dim, int tid) {
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
      // An invalid chunk copies nothing (zero-fill) from an address kept inside the tensor: the first row's.
      const T* src = gmem + (row < valid_rows ? row * row_stride : 0) + (chunk * 8 < head_dim ? chunk * 8 : 0);
      cp_async_16(smem + Tile::offset(row, chunk * 8), src, valid);
    }
  }
}

// acc[mt][j] += A[a_row0 + 16mt + 0..15, :] . B[8j + 0..7, :]^T for mt < kMT, j < kNT, over kK columns:
// one warp's 16kMT x 8kNT block of A B^T, both operands row-major in swizzled shared-memory tiles (S = Q K^T,
// dP = dO V^T, and their transposes). Each B fragment serves the kMT row tiles (a warp of 32 rows loads
// half the B fragments per product that two of 16 rows load). The k loop only addresses shared memory, so
// it is unrolled by 2 (not at all with two row tiles), not fully: full unrolling lets ptxas hoist every
// fragment load and spill at head dim 128.
template <typename T, typename ATile, typename BTile, int kK, int kMT, int kNT>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[kMT][kNT][4], const T* sA, int a_row0, const T* sB,
                                             int lane) {
#pragma unroll(kMT > 1 ? 1 : 2)
  for (int kk = 0; kk < kK; kk += 16) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if constexpr (ATile::kXorSteps) {
        const int base = ATile::offset(a_row0 + (lane & 15), (lane >> 4) * 8);
        ldmatrix_x4(a[mt], sA + ATile::step(base, 16 * mt, kk));
      } else {
        ldmatrix_x4(a[mt], sA + ATile::offset(a_row0 + 16 * mt + (lane & 15), kk + (lane >> 4) * 8));
      }
    }
#pragma unroll
    for (int j = 0; j < kNT; j += 2) {
      uint32_t bf[4];
      if constexpr (BTile::kXorSteps) {
        const int base = BTile::offset((lane & 7) + ((lane >> 4) << 3), ((lane >> 3) & 1) * 8);
        ldmatrix_x4(bf, sB + BTile::step(base, j * 8, kk));
      } else {
        ldmatrix_x4(bf, sB + BTile::offset(j * 8 + (lane & 7) + ((lane >> 4) << 3), kk + ((lane >> 3) & 1) * 8));
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(acc[mt][j], a[mt], bf[0], bf[1]);
        mma_16816<T>(acc[mt][j + 1], a[mt], bf[2], bf[3]);
      }
    }
  }
}

// The same for one 16-row tile: acc[j] += A[a_row0 + 0..15, :] . B[8j + 0..7, :]^T.
template <typename T, typename ATile, typename BTile, int kK, int kNT>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[kNT][4], const T* sA, int a_row0, const T* sB, int lane) {
  warp_mma_abt<T, ATile, BTile, kK, 1, kNT>(reinterpret_cast<float (&)[1][kNT][4]>(acc), sA, a_row0, sB, lane);
}

// acc[mt][ot] += P[mt] . B[:, col0 + 8ot + 0..7] for mt < kMT, ot < kOT: P[mt] is a warp's 16 x 8kPT block
// of scores in mma C fragments (rounded to T here, two n8 fragments making one k16 A operand), B a
// row-major tile read transposed by ldmatrix (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q); each B
// fragment serves the kMT row tiles.
template <typename T, typename BTile, int kMT, int kPT, int kOT>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[kMT][kOT][4], const float (&pf)[kMT][kPT][4], const T* sB,
                                            int col0, int lane) {
#pragma unroll
  for (int kk = 0; kk < kPT; kk += 2) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      a[mt][0] = pack2<T>(pf[mt][kk][0], pf[mt][kk][1]), a[mt][1] = pack2<T>(pf[mt][kk][2], pf[mt][kk][3]);
      a[mt][2] = pack2<T>(pf[mt][kk + 1][0], pf[mt][kk + 1][1]);
      a[mt][3] = pack2<T>(pf[mt][kk + 1][2], pf[mt][kk + 1][3]);
    }
#pragma unroll
    for (int ot = 0; ot < kOT; ot += 2) {
      uint32_t bf[4];
      if constexpr (BTile::kXorSteps) {
        const int base = BTile::offset(lane & 15, (lane >> 4) * 8);
        ldmatrix_x4_trans(bf, sB + BTile::step(base, kk * 8, col0 + ot * 8));
      } else {
        ldmatrix_x4_trans(bf, sB + BTile::offset(kk * 8 + (lane & 15), col0 + ot * 8 + (lane >> 4) * 8));
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(acc[mt][ot], a[mt], bf[0], bf[1]);
        mma_16816<T>(acc[mt][ot + 1], a[mt], bf[2], bf[3]);
      }
    }
  }
}

// The same for one 16-row tile of P.
template <typename T, typename BTile, int kPT, int kOT>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[kOT][4], const float (&pf)[kPT][4], const T* sB, int col0,
                                            int lane) {
  warp_mma_pb<T, BTile, 1, kPT, kOT>(reinterpret_cast<float (&)[1][kOT][4]>(acc),
                                     reinterpret_cast<const float (&)[1][kPT][4]>(pf), sB, col0, lane);
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}
template <int kM, int kN>
__device__ __forceinline__ void zero(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int m = 0; m < kM; ++m) zero(acc[m]);
}

// Row max / row sum across the four threads (t = lane % 4) that hold one row of an mma C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Sizes of the forward kernel for one head dim (template parameters are compile-time constants).
//   kBlockM query rows per CTA = 16 kMTiles per warp; kBlockN keys per K/V tile; kStages K/V buffers.
template <int kHeadDim_, int kBlockN_, int kNWarps_, typename T_, int kMTiles_ = 1>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMTiles = kMTiles_;  // 16-row tiles per warp (2: each K/V fragment serves 32 rows)
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = 2;
  static constexpr int kWidth = smem_width(kHeadDim);
  using QTile = SmemTile<kBlockM, kWidth>;
  using KVTile = SmemTile<kBlockN, kWidth>;
  static constexpr int kSmemBytes = (QTile::kElems + 2 * kStages * KVTile::kElems) * int(sizeof(T));
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "mma tiles are 16 wide");
};

}  // namespace cuda
}  // namespace attnkern
