// What the CUDA backward ops (ops_cuda.cpp) and their emulated twins (emu/ops_emu.cpp) share beyond the
// argument checks: the split of the dK/dV pass over a GQA/MQA group's query heads and its workspace.
// Host code with torch headers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../params.h"
#include "dispatch.h"  // kDkDvBlockKeys

namespace attnkern {
namespace cuda {

// Into how many parts the dK/dV pass splits each kv head's group of query heads. Its CTAs, one per
// (block of kDkDvBlockKeys keys, kv head, batch), each loop over the whole group: with B * Hkv key
// blocks below the SM count (MQA/GQA at small batch) most SMs would idle. The group is then split into
// the fewest parts (a divisor of the group) that give every SM a CTA, or the whole group, and no more
// than grid y holds (Hkv * parts <= max_grid_y). The same rule as the Triton backward's kv_group_parts.
inline int64_t kv_group_parts(int64_t B, int64_t Hkv, int64_t group, int64_t S, int64_t sms, int64_t max_grid_y) {
  const int64_t ctas = B * Hkv * ((S + kDkDvBlockKeys - 1) / kDkDvBlockKeys);
  if (group == 1 || S == 0 || ctas >= sms) return 1;
  int64_t parts = 1;
  for (int64_t d = 2; d <= group && Hkv * d <= max_grid_y; ++d) {
    if (group % d != 0) continue;
    parts = d;
    if (ctas * d >= sms) break;
  }
  return parts;
}

// Sets p's group split for a GPU of `sms` SMs and returns its float32 workspace (empty without a split;
// the caller keeps it alive until the kernels have run). key_rows: B * S, or a packed batch's key tokens.
inline at::Tensor plan_kv_parts(AttentionParams& p, const at::Tensor& q, int64_t key_rows, int64_t sms,
                                int64_t max_grid_y) {
  p.kv_parts = kv_group_parts(p.B, p.Hkv, p.group, p.S, sms, max_grid_y);
  const int64_t n = p.kv_parts > 1 ? p.kv_parts * p.Hkv * key_rows * (p.E + p.Ev) : 0;
  if (n == 0) p.kv_parts = 1;  // nothing to split (an empty batch)
  at::Tensor ws = at::empty({n}, q.options().dtype(at::kFloat));
  p.dkv_parts = n ? ws.data_ptr<float>() : nullptr;
  p.dkv_rows = key_rows;
  return ws;
}

}  // namespace cuda
}  // namespace attnkern
