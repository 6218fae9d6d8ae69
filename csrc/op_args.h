// Argument checks and AttentionParams filling for the attnkern_ext ops, shared by every device's
// implementation. The checks repeat the Python-side validation on purpose: the ops can be called
// directly (torch.ops.attnkern_ext.*), and a bad call must raise, never read out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "params.h"

namespace attnkern {

// A shape as Python prints it: "(2, 3)", "(4,)".
std::string shape_str(at::IntArrayRef s);

// The score modifications as the ops take them (score_mods.py; params.h says what they mean).
struct ModArgs {
  double softcap = 0.0;
  const std::optional<at::Tensor>& alibi;
  double dropout_p = 0.0;
  const std::optional<at::Tensor>& rng;
};

// Checks q, k, v, mask, scale, band ([bottom_right, left, right], attnkern/band.py), the score
// modifications and the outputs out (B, Hq, L, Ev), lse (B, Hq, L) (optional: the backward has none),
// stats (B, Hq, L, 2) and out_lo (optional: like out); returns the filled params (outputs included).
// The schemas of the forward and backward ops, shared by attnkern_ext (ops.cpp) and the emulated
// CUDA kernels' attnkern_emu (cuda/emu/ops_emu.cpp), so the two cannot drift apart.
inline constexpr const char* kForwardSchema =
    "forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, int[] band, "
    "float softcap, Tensor? alibi, float dropout_p, Tensor? rng, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) stats, Tensor(d!)? out_lo=None, Tensor? mask_map=None) -> ()";
inline constexpr const char* kBackwardSchema =
    "backward(Tensor grad_out, Tensor? grad_lse, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
    "Tensor out, Tensor? out_lo, Tensor stats, float scale, int[] band, float softcap, Tensor? alibi, "
    "float dropout_p, Tensor? rng, Tensor(a!) grad_query, "
    "Tensor(b!) grad_key, Tensor(c!) grad_value, Tensor(d!)? grad_mask, Tensor? mask_map=None) -> ()";

// The varlen ops' schemas (attnkern/varlen.py's packed layouts: q (Tq, Hq, E), k/v (Tk, Hkv, E/Ev), out
// (Tq, Hq, Ev), lse (Hq, Tq), stats (Hq, Tq, 2), cu_seqlens int32 (B + 1,)), shared by attnkern_ext
// (cpu/varlen_cpu.cpp, cuda/ops_cuda.cpp) and attnkern_emu. With dropout_p > 0 sequence b's mask is its own
// problem's with rng offset + b (varlen.sequence_rng).
inline constexpr const char* kVarlenForwardSchema =
    "varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "float scale, int[] band, float softcap, Tensor? alibi, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) stats, "
    "Tensor(d!)? out_lo=None, float dropout_p=0.0, Tensor? rng=None) -> ()";
inline constexpr const char* kVarlenBackwardSchema =
    "varlen_backward(Tensor grad_out, Tensor? grad_lse, Tensor query, Tensor key, Tensor value, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor out, Tensor? out_lo, Tensor stats, float scale, "
    "int[] band, float softcap, Tensor? alibi, Tensor(a!) grad_query, Tensor(b!) grad_key, "
    "Tensor(c!) grad_value, float dropout_p=0.0, Tensor? rng=None) -> ()";

AttentionParams forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale, at::IntArrayRef band,
                               const ModArgs& mods, const at::Tensor& out, const at::Tensor* lse,
                               const at::Tensor& stats,
                               const std::optional<at::Tensor>& out_lo);

// Checks the optional mask_map of the forward and backward (the mask's block map: int8 (Bm, Hm,
// ceil(L / 16), ceil(S / 16)), any dim 1) against p's mask and sets p.mask_map (kernels that read it:
// the CUDA forward, dQ and dK/dV).
void set_mask_map(AttentionParams& p, const std::optional<at::Tensor>& map, const at::Tensor& q);

// The forward's checks plus dout, dlse, and the gradient buffers dq, dk, dv, dmask.
AttentionParams backward_params(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, const at::Tensor& out,
                                const std::optional<at::Tensor>& out_lo, const at::Tensor& stats, double scale,
                                at::IntArrayRef band, const ModArgs& mods, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                const std::optional<at::Tensor>& dmask);

// Raises unless the kernels of `where` compute p's score modifications (until they all do).
void check_no_mods(const AttentionParams& p, const char* where);

}  // namespace attnkern
