// Grid shapes. CUDA allows 2^31 - 1 blocks on grid x but only 65535 on y and z, and the (batch, head)
// and mask-slice counts can pass 65535. So the backward's preprocess, dQ and dMask launches put all
// their blocks on x: `tiles` blocks for each of `slices` (head, batch) pairs, the tile index fastest, which is
// the order the former (tiles, heads, batch) grids ran them in. A kernel decodes its block with two
// unsigned divides.
#pragma once

#include <stdint.h>

#include "ptx.h"  // dim3 and blockIdx (or their emulation)

namespace attnkern {
namespace cuda {

constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;

// 32-bit: every index is below 2^31, and a 64-bit divide costs registers. The forward and dK/dV keep
// (tiles, heads, batch) grids: the decoded indices, live to their end, spilled them (blockIdx reads
// cost no register).
struct FoldedBlock {
  int tile;        // in [0, tiles)
  unsigned slice;  // in [0, slices): head + heads * batch, or the mask slice
};

__device__ __forceinline__ FoldedBlock folded_block(int tiles) {
  const unsigned x = blockIdx.x, n = unsigned(tiles);
  return {int(x % n), x / n};
}

// (head, batch) of a slice head + heads * batch.
__device__ __forceinline__ void split_slice(unsigned slice, int64_t heads, int& head, int& batch) {
  head = int(slice % unsigned(heads));
  batch = int(slice / unsigned(heads));
}

// The grid of `tiles` blocks for each of `slices`; false when it would pass grid x's limit.
inline bool folded_grid(int64_t tiles, int64_t slices, dim3& grid) {
  if (tiles > 0 && slices > kMaxGridX / tiles) return false;
  grid = dim3(unsigned(tiles * slices), 1u, 1u);
  return true;
}

}  // namespace cuda
}  // namespace attnkern
