// Argument checks and params of the varlen ops (schemas: op_args.h) for the CUDA kernels, shared by
// their CUDA implementation (ops_cuda.cpp) and the emulated twins (emu/ops_emu.cpp). Host code only.
//
// The packed tensors are checked as their canonical (1, H, T, D) views by forward_params /
// backward_params, like any padded call; then the params become a packed batch (params.h:
// cu_seqlens_q/k, B sequences, L and S the longest lengths, the band per sequence).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "../op_args.h"

namespace attnkern {

// The canonical (1, H, T, D) view of a packed (T, H, D) tensor.
inline at::Tensor packed_view(const at::Tensor& t) { return t.permute({1, 0, 2}).unsqueeze(0); }

inline void check_packed(const at::Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK(t.defined() && t.dim() == 3, "attnkern: varlen ", name, " must be a 3-D tensor ", dims, ", got ",
              t.defined() ? shape_str(t.sizes()) : std::string("undefined"));
}

struct VarlenShape {
  int64_t B = 0, max_q = 0, max_k = 0;
};

// cu_seqlens_q/k: int32 (B + 1,) on the query's device, read to the host (on a GPU a copy that waits for
// the stream) and checked there, since a wrong offset would send blocks out of bounds: 0 first,
// non-decreasing, ending at the packed token counts Tq and Tk. Returns B and the longest lengths.
inline VarlenShape varlen_shape(const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& q, int64_t Tk) {
  const std::pair<const at::Tensor*, const char*> cus[] = {{&cu_q, "cu_seqlens_q"}, {&cu_k, "cu_seqlens_k"}};
  for (const auto& [cu, name] : cus) {
    TORCH_CHECK(cu->defined() && cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->size(0) >= 1,
                "attnkern: ", name, " must be an int32 (B + 1,) tensor, got ",
                cu->defined() ? shape_str(cu->sizes()) : std::string("undefined"));
    TORCH_CHECK(cu->device() == q.device(), "attnkern: ", name, " must be on the query's device ", q.device(),
                ", got ", cu->device());
    TORCH_CHECK(cu->is_contiguous(), "attnkern: ", name, " must be contiguous");
  }
  TORCH_CHECK(cu_q.size(0) == cu_k.size(0), "attnkern: cu_seqlens_k must have cu_seqlens_q's length ", cu_q.size(0),
              ", got ", cu_k.size(0));
  VarlenShape shape;
  shape.B = cu_q.size(0) - 1;
  const at::Tensor hq = cu_q.cpu(), hk = cu_k.cpu();
  const int32_t *oq = hq.data_ptr<int32_t>(), *ok = hk.data_ptr<int32_t>();
  const int64_t totals[2] = {q.size(0), Tk};
  for (int w = 0; w < 2; ++w) {
    const int32_t* o = w ? ok : oq;
    const char* name = w ? "cu_seqlens_k" : "cu_seqlens_q";
    TORCH_CHECK(o[0] == 0, "attnkern: ", name, "[0] must be 0, got ", o[0]);
    int64_t most = 0;
    for (int64_t b = 0; b < shape.B; ++b) {
      TORCH_CHECK(o[b + 1] >= o[b], "attnkern: ", name, " must be non-decreasing: ", name, "[", b, "] = ", o[b],
                  " > ", name, "[", b + 1, "] = ", o[b + 1]);
      most = std::max<int64_t>(most, o[b + 1] - o[b]);
    }
    TORCH_CHECK(o[shape.B] == totals[w], "attnkern: ", name, "[-1] must equal the packed token count ", totals[w],
                ", got ", o[shape.B]);
    (w ? shape.max_k : shape.max_q) = most;
  }
  return shape;
}

// The ALiBi slopes of a packed batch, (1 or B, Hq): a (1, Hq) tensor passes through forward_params' own
// check; a per-sequence (B, Hq) one is checked here and set afterwards (set_varlen_alibi), since the
// canonical views have batch 1.
inline std::optional<at::Tensor> shared_alibi(const std::optional<at::Tensor>& alibi, const at::Tensor& q, int64_t B) {
  if (!alibi.has_value() || !alibi->defined() || alibi->size(0) == 1) return alibi;
  const at::Tensor& a = *alibi;
  TORCH_CHECK(a.device() == q.device(), "attnkern: alibi must be on the query's device ", q.device(), ", got ",
              a.device());
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(0) == B && a.size(1) == q.size(1) &&
                  a.is_contiguous(),
              "attnkern: alibi must be a contiguous float32 (1 or B, Hq) = (1 or ", B, ", ", q.size(1),
              ") tensor, got ", a.scalar_type(), " of shape ", shape_str(a.sizes()));
  return std::nullopt;
}

// p (filled from the canonical views) as the packed batch of the offsets.
inline void make_varlen(AttentionParams& p, const VarlenShape& shape, const at::Tensor& cu_q, const at::Tensor& cu_k,
                        const std::optional<at::Tensor>& alibi) {
  if (alibi.has_value() && alibi->defined() && alibi->size(0) > 1) {
    p.alibi = alibi->data_ptr<float>();
    p.alibi_st_b = p.Hq;
  }
  p.total_q = p.L;  // the views' length: the packed token count
  p.B = shape.B, p.L = shape.max_q, p.S = shape.max_k;
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>(), p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  // Padded-batch strides are meaningless here; the kernels never step a batch of a packed one.
  p.q_st.b = p.k_st.b = p.v_st.b = p.out_st.b = p.out_lo_st.b = p.dout_st.b = p.dlse_st.b = 0;
  p.dq_st.b = p.dk_st.b = p.dv_st.b = 0;
  p.set_band_offsets();  // rebuilt per sequence by each block; here those of the longest lengths
}

inline AttentionParams varlen_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_q, const at::Tensor& cu_k, double scale,
                                             at::IntArrayRef band, double softcap,
                                             const std::optional<at::Tensor>& alibi, double dropout_p,
                                             const std::optional<at::Tensor>& rng, const at::Tensor& out,
                                             const at::Tensor& lse, const at::Tensor& stats,
                                             const std::optional<at::Tensor>& out_lo) {
  check_packed(q, "query", "(Tq, Hq, E)"), check_packed(k, "key", "(Tk, Hkv, E)");
  check_packed(v, "value", "(Tk, Hkv, Ev)"), check_packed(out, "out", "(Tq, Hq, Ev)");
  check_packed(stats, "stats", "(Hq, Tq, 2)");
  TORCH_CHECK(lse.defined() && lse.dim() == 2, "attnkern: varlen lse must be a 2-D tensor (Hq, Tq)");
  const VarlenShape shape = varlen_shape(cu_q, cu_k, q, k.size(0));
  const std::optional<at::Tensor> al = shared_alibi(alibi, q, shape.B);
  const at::Tensor lse_view = lse.unsqueeze(0);
  std::optional<at::Tensor> lo;
  if (out_lo.has_value() && out_lo->defined()) {
    check_packed(*out_lo, "out_lo", "(Tq, Hq, Ev)");
    lo = packed_view(*out_lo);
  }
  AttentionParams p = forward_params(packed_view(q), packed_view(k), packed_view(v), std::nullopt, scale, band,
                                     {softcap, al, dropout_p, rng}, packed_view(out), &lse_view,
                                     stats.unsqueeze(0), lo);
  make_varlen(p, shape, cu_q, cu_k, alibi);
  return p;
}

inline AttentionParams varlen_backward_params(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& out,
                                              const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                                              double scale, at::IntArrayRef band, double softcap,
                                              const std::optional<at::Tensor>& alibi, double dropout_p,
                                              const std::optional<at::Tensor>& rng, const at::Tensor& dq,
                                              const at::Tensor& dk, const at::Tensor& dv) {
  const std::pair<const at::Tensor*, const char*> packed[] = {
      {&q, "query"}, {&k, "key"}, {&v, "value"}, {&out, "out"}, {&dout, "grad_out"},
      {&dq, "grad_query"}, {&dk, "grad_key"}, {&dv, "grad_value"}, {&stats, "stats"}};
  for (const auto& [t, name] : packed) check_packed(*t, name, "(tokens, heads, head dim)");
  const VarlenShape shape = varlen_shape(cu_q, cu_k, q, k.size(0));
  const std::optional<at::Tensor> al = shared_alibi(alibi, q, shape.B);
  std::optional<at::Tensor> lo, dl;
  if (out_lo.has_value() && out_lo->defined()) {
    check_packed(*out_lo, "out_lo", "(Tq, Hq, Ev)");
    lo = packed_view(*out_lo);
  }
  if (dlse.has_value() && dlse->defined()) {
    TORCH_CHECK(dlse->dim() == 2, "attnkern: varlen grad_lse must be a 2-D tensor (Hq, Tq)");
    dl = dlse->unsqueeze(0);
  }
  AttentionParams p = backward_params(packed_view(dout), dl, packed_view(q), packed_view(k), packed_view(v),
                                      std::nullopt, packed_view(out), lo, stats.unsqueeze(0), scale, band,
                                      {softcap, al, dropout_p, rng}, packed_view(dq), packed_view(dk),
                                      packed_view(dv), std::nullopt);
  make_varlen(p, shape, cu_q, cu_k, alibi);
  return p;
}

}  // namespace attnkern
