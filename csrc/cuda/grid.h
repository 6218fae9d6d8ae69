// Grid shapes. CUDA allows 2^31 - 1 blocks on grid x but only 65535 on y and z, and the (batch, head)
// and mask-slice counts can pass 65535. So every launch puts all its blocks on x: `tiles` blocks for
// each of `slices` (head, batch) pairs, the tile index fastest, which is the order the former
// (tiles, heads, batch) grids ran them in. A kernel decodes its block with one unsigned divide.
#pragma once

#include <stdint.h>

#include "ptx.h"  // dim3 and blockIdx (or their emulation)

namespace attnkern {
namespace cuda {

constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1

struct FoldedBlock {
  int tile;       // in [0, tiles)
  int64_t slice;  // in [0, slices): head + heads * batch, or the mask slice
};

__device__ __forceinline__ FoldedBlock folded_block(int tiles) {
  const unsigned x = blockIdx.x, n = unsigned(tiles);
  return {int(x % n), int64_t(x / n)};
}

// The grid of `tiles` blocks for each of `slices`; false when it would pass grid x's limit.
inline bool folded_grid(int64_t tiles, int64_t slices, dim3& grid) {
  if (tiles > 0 && slices > kMaxGridX / tiles) return false;
  grid = dim3(unsigned(tiles * slices), 1u, 1u);
  return true;
}

}  // namespace cuda
}  // namespace attnkern
