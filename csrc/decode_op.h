// The attnkern_ext::decode op's schema and argument checks (decode_op.cpp), shared by its device
// implementations (cpu/decode.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "decode_params.h"

namespace attnkern {

// band: [1, left, right] as attnkern/band.py's Band.as_op (always bottom-right, per batch element).
inline constexpr const char* kDecodeSchema =
    "decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor? block_table, float scale, "
    "int[] band, float softcap, Tensor? alibi, int num_splits, Tensor(a!) out, Tensor(b!) lse) -> ()";

DecodeParams decode_params(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table, double scale,
                           at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                           int64_t num_splits, const at::Tensor& out, const at::Tensor& lse);

}  // namespace attnkern
