// Philox4x32-10, the counter-based generator of the dropout mask (attnkern/philox.py defines the scheme;
// every backend draws the same numbers). Usable from host and device code: no torch headers.
//
// The score of row i, key j, batch b, query head h draws lane (j & 3) of
//   philox4x32(counter = {j >> 2, i, b * Hq + h, offset}, key = {seed lo, seed hi})
// and is kept iff that draw >= dropout_threshold (then scaled by dropout_scale).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ATTNKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ATTNKERN_HOST_DEVICE inline
#endif

namespace attnkern {

struct Philox4 {
  uint32_t x[4];
};

ATTNKERN_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// Ten rounds of Philox4x32 (multipliers and Weyl increments of Salmon et al., SC 2011).
ATTNKERN_HOST_DEVICE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                        uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The key and the fourth counter word of one call's dropout mask, from its rng = [seed, offset].
struct DropoutKey {
  uint32_t k0 = 0, k1 = 0, offset = 0;
};

ATTNKERN_HOST_DEVICE DropoutKey dropout_key(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return DropoutKey{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(offset)};
}

// The four draws of columns 4c .. 4c + 3 of row i in (batch, head) slice bh.
ATTNKERN_HOST_DEVICE Philox4 dropout_draws4(const DropoutKey& key, int64_t bh, int64_t i, int64_t c) {
  return philox4x32(static_cast<uint32_t>(c), static_cast<uint32_t>(i), static_cast<uint32_t>(bh), key.offset,
                    key.k0, key.k1);
}

}  // namespace attnkern
