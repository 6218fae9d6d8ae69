// The description of a KV-cache decoding problem (attnkern/kvcache.py) that the decode kernels read.
//
// Kept apart from AttentionParams (params.h): the cache is addressed per batch element through its own
// length and, when paged, a block table, and the layout is FlashAttention's (B, L, H, E), not the
// canonical (B, H, L, E). Plain data only, filled by decode_op.cpp after its argument checks.
//   q (B, Lq, Hq, E)   out (B, Lq, Hq, Ev)   lse (B, Hq, Lq) contiguous, float32 (float64 for float64)
//   k_cache (P, page_size, Hkv, E), v_cache (P, page_size, Hkv, Ev): paged, P pages of page_size slots, key j of
//     batch element b in page block_table[b][j / page_size], slot j % page_size; contiguous caches
//     (B, S_max, Hkv, E) are the case of one page per batch element (page b, page_size S_max).
// Batch element b attends to its first seqlens[b] keys. Query row i sees key j iff it lies in the band
// of attnkern/band.py with the bottom-right offset of its own length, off_b = seqlens[b] - Lq:
// off_b - left + i <= j (has_left) and j <= i + off_b + right (has_right).
#pragma once

#include <cstdint>

namespace attnkern {

struct Strides4D {
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // element strides of the four dims, in order
};

struct DecodeParams {
  int64_t B = 0, Lq = 0, Hq = 0, Hkv = 0, E = 0, Ev = 0;
  int64_t group = 1;  // Hq / Hkv: query head h reads kv head h / group

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides4D q_st, k_st, v_st, out_st;  // q/out: (b, l, h, e); k/v: (page, slot, h, e)
  int64_t page_size = 0;
  int64_t num_pages = 0;
  const int32_t* block_table = nullptr;  // null: contiguous cache (page = b)
  int64_t bt_st_b = 0, bt_st_p = 0;
  const int32_t* seqlens = nullptr;  // (B,): keys of each batch element, after the append
  int64_t seqlens_st = 1;

  double scale = 1.0;
  bool has_left = false, has_right = false;
  int64_t left = 0, right = 0;  // window bounds (right = 0: causal), each only where present
  double softcap = 0.0;         // > 0: s = softcap * tanh(s / softcap), before ALiBi
  const float* alibi = nullptr;  // (1 or B, Hq) float32: s -= slope * |i + off_b - j|
  int64_t alibi_st_b = 0;
  int64_t num_splits = 0;  // 0: chosen from the problem

  void* out = nullptr;
  void* lse = nullptr;

  int64_t page_of(int64_t b, int64_t j) const {
    return block_table ? block_table[b * bt_st_b + (j / page_size) * bt_st_p] : b;
  }
  int64_t seqlen(int64_t b) const { return seqlens[b * seqlens_st]; }
};

}  // namespace attnkern
