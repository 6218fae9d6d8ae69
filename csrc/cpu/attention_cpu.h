// CPU attention kernels (forward.cpp, backward.cpp): entry points and the blocking policy.
#pragma once

#include <c10/core/ScalarType.h>

#include "../params.h"

namespace attnkern {
namespace cpu {

// How a problem is cut up: BLOCK_M query rows by BLOCK_N keys per tile, and each (batch, kv head)'s
// query rows split into `query_chunks` tasks (more tasks than threads when B * Hkv alone is too few).
struct Blocking {
  int64_t block_m = 64;
  int64_t block_n = 128;
  int64_t query_chunks = 1;
};

Blocking choose_blocking(const AttentionParams& p, c10::ScalarType dtype, bool backward);

// The query chunk task number `task` works on. Tasks are handed out in index order by an atomic
// counter; causal chunks are numbered from the last (whose rows see the most keys), so the longest
// tasks start first and the short ones fill the tail.
inline int64_t task_chunk(const AttentionParams& p, int64_t task, int64_t n_chunks) {
  const int64_t c = task % n_chunks;
  return p.has_right && !p.has_left ? n_chunks - 1 - c : c;
}

// Fills p.out and p.lse.
void attention_forward(const AttentionParams& p, c10::ScalarType dtype);

// Fills p.dq, p.dk, p.dv, and p.dmask when it is not null.
void attention_backward(const AttentionParams& p, c10::ScalarType dtype);

}  // namespace cpu
}  // namespace attnkern
