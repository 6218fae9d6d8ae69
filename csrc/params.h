// The one description of an attention problem that every C++ kernel (CPU here, CUDA later) reads.
//
// Plain data only: pointers, int64 sizes and element strides, and flags, filled once by the op
// layer (attention_ops.cpp) after its argument checks. Layout is the canonical one of
// attnkern/problem.py:
//   q (B, Hq, L, E)   k (B, Hkv, S, E)   v (B, Hkv, S, Ev)   out (B, Hq, L, Ev)   lse (B, Hq, L)
//   mask (Bm, Hm, Lm, Sm), each dim 1 or full; a broadcast dim has stride 0 here.
// Query head h reads kv head h / (Hq / Hkv). Row i sees key j iff it lies in the band (attnkern/band.py):
// i + band_lo <= j (when has_left) and j <= i + band_hi (when has_right); causal is has_right, band_hi = offset.
#pragma once

#include <algorithm>
#include <cstdint>

#include "philox.h"  // ATTNKERN_HOST_DEVICE

namespace attnkern {

enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat = 2 };
// Element type of a float mask (kernels see no c10 types: CUDA kernel units include no torch headers).
enum class MaskElem : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
// Block-map flags (attnkern/block_map.py: SEES, MASKS) and its sub-tile edge (TILE).
constexpr int kMapSees = 1, kMapMasks = 2, kMapTile = 16;

struct Strides4 {
  int64_t b = 0, h = 0, l = 0, e = 0;  // batch, head, row (query or key), column (head dim or key)
};

struct AttentionParams {
  // Sizes.
  int64_t B = 0, Hq = 0, Hkv = 0, L = 0, S = 0, E = 0, Ev = 0;
  int64_t group = 1;  // Hq / Hkv

  // Inputs of the forward.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* mask = nullptr;  // bool (1 byte, nonzero = attend) or float of mask_elem
  Strides4 q_st, k_st, v_st, mask_st;  // mask_st: (b, h, l, s), 0 on broadcast dims
  int64_t Bm = 1, Hm = 1, Lm = 1, Sm = 1;  // the mask's own (canonical) sizes
  MaskKind mask_kind = MaskKind::kNone;
  MaskElem mask_elem = MaskElem::kFloat32;  // a float mask's element type (float32 or q's dtype)
  // The mask's block map (attnkern/block_map.py), read by the CUDA forward, dQ and dK/dV: int8 flags kMapSees |
  // kMapMasks per 16 x 16 sub-tile of the scores, (Bm, Hm, ceil(L / 16), ceil(S / 16)) with any dim 1
  // (broadcast, stride 0 in map_st: (b, h, row, column)). A tile no sub-tile of which sees a key is
  // skipped (bool masks), one none of which the mask changes skips the mask reads. null: no map.
  const int8_t* mask_map = nullptr;
  Strides4 map_st;

  double scale = 1.0;
  // The band: offsets from the row index of the first and last key a row sees (offset - left and
  // offset + right, offset = S - L bottom-right or 0 top-left), each bound only where present; clamped to
  // [-L, S], an absent bound being -L (band_lo) or S (band_hi), which bound nothing.
  bool has_left = false, has_right = false;
  int64_t band_lo = 0, band_hi = 0;
  int64_t band_spec[3] = {0, -1, -1};  // the band as the op took it (band.py: [bottom_right, left, right])

  // Score modifications (attnkern/score_mods.py), in this order. softcap > 0: s = softcap * tanh(s /
  // softcap) on the scaled scores; alibi (float32 (Ba, Hq), Ba 1 or B): s -= alibi[b * alibi_st_b + h] *
  // |i + S - L - j|; then masks, band, softmax; dropout_p > 0: P *= dropout_scale where the draw of
  // (b, h, i, j) (philox.h, keyed by rng = [seed, offset] on the kernels' device) is >= dropout_threshold,
  // else 0. The lse and stats are those of the capped, biased, masked scores.
  double softcap = 0.0;
  const float* alibi = nullptr;
  int64_t alibi_st_b = 0;  // 0 when the slopes broadcast over the batch
  double dropout_p = 0.0;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;
  const int64_t* rng = nullptr;
  // The batch index of this problem's batch 0 in the whole call: a CUDA launch over a slice of the batch
  // (csrc/cuda/launch.h) draws the dropout mask of the batches it holds, b * Hq + h counting from here.
  int64_t batch_base = 0;

  // Outputs of the forward (inputs of the backward).
  void* out = nullptr;
  void* lse = nullptr;  // (B, Hq, L) contiguous, float32 (float64 for float64 inputs); natural log
  // (B, Hq, L, 2) contiguous, lse's dtype: per row the max m of the scaled, masked scores and log2 of
  // the softmax denominator, so the backward recomputes P = 2^((s - m) log2 e - log2 l) exactly even
  // when scores are huge (a lse there cannot hold log2 l beside m). -inf, -inf on fully masked rows.
  void* stats = nullptr;
  Strides4 out_st;
  // Optional (null: none), out's shape and dtype: the rounding residual of a float16/bfloat16 output,
  // out_lo = round(O32 - float(out)), written by the forward when a backward will follow, so that the
  // backward's delta = rowsum(dO (out + out_lo)) has float32 accuracy (from out alone a gradient that is
  // exactly 0, a per-query bias's, comes out as rounding noise).
  void* out_lo = nullptr;
  Strides4 out_lo_st;

  // Backward.
  const void* dout = nullptr;
  const void* dlse = nullptr;  // may be null: no gradient flows into the lse
  Strides4 dout_st;
  Strides4 dlse_st;  // (b, h, l) in b, h, l; e unused
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dmask = nullptr;  // (Bm, Hm, Lm, Sm) contiguous, float32 (float64 for float64); null: no grad
  Strides4 dq_st, dk_st, dv_st;

  // Packed variable-length batches (attnkern/varlen.py); null for a padded batch. int32 (B + 1,) offsets of
  // each sequence's first query and key token: q, out, out_lo, dout, dq are (Tq, H, D) and k, v, dk, dv
  // (Tk, H, D), held as (1, H, T, D) (their *_st.b unused), lse and stats (and the CUDA backward's delta)
  // (Hq, Tq[, 2]) with Tq = total_q, dlse (Hq, Tq) through dlse_st.h/.l. B counts the sequences; L and S
  // are the longest sequences' lengths (they size the CUDA grids). A CUDA block narrows p to its sequence
  // (cuda/varlen.h): sequence b is its own (1, Hq, L_b, S_b) problem on its rows of the packed tensors,
  // with the band offset S_b - L_b, ALiBi row b and the dropout mask of rng offset + b (varlen.sequence_rng),
  // which rng_offset_add carries. No user mask.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0;
  int64_t rng_offset_add = 0;

  // The CUDA dK/dV pass's split of each kv head's query-head group (GQA/MQA with too few key blocks to
  // fill the GPU, cuda/bwd_host.h): kv_parts CTAs per (key block, kv head, batch), each over group /
  // kv_parts of the group's query heads, write their float32 dK (times scale) and dV into dkv_parts,
  // laid out [kv_parts][Hkv][dkv_rows][E + Ev] (dK in the first E columns, dV after; dkv_rows = B * S
  // rows, batch b's key j on row b * S + j, or the packed key tokens of a varlen batch), and a second
  // kernel sums the parts in a fixed order (deterministic). kv_parts 1: no split, dkv_parts null.
  int64_t kv_parts = 1;
  float* dkv_parts = nullptr;
  int64_t dkv_rows = 0;

  // has_left/has_right and band_lo/band_hi from the op's band for a problem of L rows and S keys.
  ATTNKERN_HOST_DEVICE void set_band(const int64_t (&spec)[3]) {
    for (int d = 0; d < 3; ++d) band_spec[d] = spec[d];
    has_left = spec[1] >= 0, has_right = spec[2] >= 0;
    set_band_offsets();
  }
  // band_lo/band_hi from band_spec for the present L and S (has_left/has_right stay: they do not depend
  // on the lengths). Clamped to [-L, S], which changes no visibility (rows are in [0, L), keys in [0, S)),
  // so that the offsets stay small whatever window was asked for; an absent bound is the one that lets
  // every key through (-L, S).
  ATTNKERN_HOST_DEVICE void set_band_offsets() {
    const int64_t offset = band_spec[0] == 1 ? S - L : 0;
    const int64_t lo = offset - band_spec[1], hi = offset + band_spec[2];
    band_lo = has_left && lo > -L ? lo : -L;
    band_hi = has_right ? (hi < -L ? -L : (hi > S ? S : hi)) : S;
  }
  // Elements between the rows of consecutive (batch, head) pairs in lse, delta (stats: twice that): L,
  // or the packed token count of a varlen batch (whose pairs are heads of its one (Hq, Tq) matrix).
  ATTNKERN_HOST_DEVICE int64_t stat_len() const { return cu_seqlens_q ? total_q : L; }
  bool banded() const { return has_left || has_right; }
  bool has_mods() const { return softcap > 0.0 || alibi != nullptr || dropout_p > 0.0; }
  // The keys [key_begin, key_end) some row of rows [r0, r1) sees, and [full_key_begin, full_key_end)
  // the keys every one of them sees (empty when begin >= end).
  int64_t key_begin(int64_t r0) const { return has_left ? std::clamp<int64_t>(r0 + band_lo, 0, S) : 0; }
  int64_t key_end(int64_t r1) const { return has_right ? std::clamp<int64_t>(r1 + band_hi, 0, S) : S; }
  int64_t full_key_begin(int64_t r1) const { return has_left ? std::clamp<int64_t>(r1 - 1 + band_lo, 0, S) : 0; }
  int64_t full_key_end(int64_t r0) const { return has_right ? std::clamp<int64_t>(r0 + 1 + band_hi, 0, S) : S; }
};

}  // namespace attnkern
