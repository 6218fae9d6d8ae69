#include "op_args.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace attnkern {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

Strides4 strides_of(const at::Tensor& t) {
  Strides4 st;
  st.b = t.stride(0), st.h = t.stride(1), st.l = t.stride(2), st.e = t.stride(3);
  return st;
}

bool is_float_kind(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "attnkern: ", name, " must be on the query's device ", q.device(),
              ", got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want, const char* what) {
  TORCH_CHECK(t.sizes() == want, "attnkern: ", name, " must have shape ", shape_str(want), " ", what, ", got ",
              shape_str(t.sizes()));
}

void fill_mods(AttentionParams& p, const ModArgs& mods, const at::Tensor& q) {
  TORCH_CHECK(std::isfinite(mods.softcap) && mods.softcap >= 0, "attnkern: softcap must be a finite float >= 0, got ",
              mods.softcap);
  p.softcap = mods.softcap;
  if (mods.alibi.has_value() && mods.alibi->defined()) {
    const at::Tensor& a = *mods.alibi;
    check_same_device(a, "alibi", q);
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(1) == p.Hq &&
                    (a.size(0) == 1 || a.size(0) == p.B) && a.is_contiguous(),
                "attnkern: alibi must be a contiguous float32 (1 or B, Hq) = (1 or ", p.B, ", ", p.Hq,
                ") tensor, got ", a.scalar_type(), " of shape ", shape_str(a.sizes()));
    p.alibi = a.data_ptr<float>();
    p.alibi_st_b = a.size(0) == 1 ? 0 : p.Hq;
  }
  TORCH_CHECK(mods.dropout_p >= 0 && mods.dropout_p <= 1, "attnkern: dropout_p must be in [0, 1], got ",
              mods.dropout_p);
  if (mods.dropout_p > 0) {
    TORCH_CHECK(mods.rng.has_value() && mods.rng->defined(), "attnkern: dropout_p > 0 needs rng (int64 (2,))");
    const at::Tensor& r = *mods.rng;
    check_same_device(r, "rng", q);
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.size(0) == 2 && r.is_contiguous(),
                "attnkern: rng must be a contiguous int64 tensor of shape (2,) (seed, offset), got ",
                r.scalar_type(), " of shape ", shape_str(r.sizes()));
    p.dropout_p = mods.dropout_p;
    // As attnkern/philox.py: floor(p 2^32), at most 2^32 - 1; scale 1 / (1 - p), 0 for p = 1.
    p.dropout_threshold = static_cast<uint32_t>(std::min(std::floor(mods.dropout_p * 4294967296.0), 4294967295.0));
    p.dropout_scale = mods.dropout_p >= 1 ? 0.0f : static_cast<float>(1.0 / (1.0 - mods.dropout_p));
    p.rng = r.data_ptr<int64_t>();
  }
}

}  // namespace

void check_no_mods(const AttentionParams& p, const char* where) {
  TORCH_CHECK(!p.has_mods(), "attnkern: softcap, alibi and dropout are not implemented by the ", where,
              " kernels yet");
}

AttentionParams forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale, at::IntArrayRef band,
                               const ModArgs& mods, const at::Tensor& out, const at::Tensor* lse,
                               const at::Tensor& stats, const std::optional<at::Tensor>& out_lo) {
  const std::pair<const at::Tensor*, const char*> qkv[] = {{&q, "query"}, {&k, "key"}, {&v, "value"}};
  for (const auto& [t, name] : qkv) {
    TORCH_CHECK(t->defined(), "attnkern: ", name, " is undefined");
    TORCH_CHECK(t->dim() == 4, "attnkern: ", name, " must be 4-D (batch, heads, length, head_dim), got ",
                t->dim(), "-D of shape ", shape_str(t->sizes()));
    TORCH_CHECK(is_float_kind(t->scalar_type()), "attnkern: ", name,
                " must be float16, bfloat16, float32 or float64, got ", t->scalar_type());
    check_same_device(*t, name, q);
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attnkern: query, key and value must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "attnkern: key and value must have the query's batch size ", B,
              ", got key ", shape_str(k.sizes()), " and value ", shape_str(v.sizes()));
  TORCH_CHECK(v.size(1) == Hkv, "attnkern: key and value must have the same number of heads, got key ",
              shape_str(k.sizes()), " and value ", shape_str(v.sizes()));
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "attnkern: the query's heads (", Hq,
              ") must be a multiple of the key/value heads (", Hkv, ")");
  TORCH_CHECK(v.size(2) == S, "attnkern: key and value must have the same length, got key ",
              shape_str(k.sizes()), " and value ", shape_str(v.sizes()));
  TORCH_CHECK(k.size(3) == E, "attnkern: key must have the query's head dim ", E, ", got key ",
              shape_str(k.sizes()));
  TORCH_CHECK(E >= 1 && Ev >= 1, "attnkern: head dims must be at least 1, got E=", E, " Ev=", Ev);
  TORCH_CHECK(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  // Non-float64 kernels compute scores in float32: a scale float32 cannot hold would become infinity.
  TORCH_CHECK(q.scalar_type() == at::kDouble || std::abs(scale) <= std::numeric_limits<float>::max(),
              "attnkern: scale=", scale, " does not fit float32, in which ", q.scalar_type(),
              " problems compute their scores");
  TORCH_CHECK(band.size() == 3 && (band[0] == 0 || band[0] == 1) && band[1] >= -1 && band[2] >= -1,
              "attnkern: band must be [bottom_right (0 or 1), left (>= -1), right (>= -1)], got ", band);

  AttentionParams p;
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.L = L, p.S = S, p.E = E, p.Ev = Ev, p.group = Hq / Hkv;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_st = strides_of(q), p.k_st = strides_of(k), p.v_st = strides_of(v);
  p.scale = scale;
  p.set_band({band[0], band[1], band[2]});

  fill_mods(p, mods, q);

  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    check_same_device(m, "attn_mask", q);
    TORCH_CHECK(m.dim() == 4, "attnkern: attn_mask must be 4-D (Bm, Hm, Lm, Sm), got shape ", shape_str(m.sizes()));
    const int64_t full[4] = {B, Hq, L, S};
    const char* dims[4] = {"batch", "heads", "query length", "key length"};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(m.size(d) == 1 || m.size(d) == full[d], "attnkern: attn_mask dim ", d, " (", dims[d],
                  ") must be 1 or ", full[d], ", got shape ", shape_str(m.sizes()));
    }
    const auto mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == q.scalar_type(),
                "attnkern: attn_mask must be bool, float32 or the query's dtype ", q.scalar_type(), ", got ", mt);
    p.mask = m.data_ptr();
    p.mask_kind = mt == at::kBool ? MaskKind::kBool : MaskKind::kFloat;
    p.mask_elem = mt == at::kDouble ? MaskElem::kFloat64
                  : mt == at::kHalf ? MaskElem::kFloat16
                  : mt == at::kBFloat16 ? MaskElem::kBFloat16 : MaskElem::kFloat32;
    p.Bm = m.size(0), p.Hm = m.size(1), p.Lm = m.size(2), p.Sm = m.size(3);
    Strides4 st = strides_of(m);
    if (p.Bm == 1) st.b = 0;
    if (p.Hm == 1) st.h = 0;
    if (p.Lm == 1) st.l = 0;
    if (p.Sm == 1) st.e = 0;
    p.mask_st = st;
  }

  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_same_device(out, "out", q);
  check_shape(out, "out", {B, Hq, L, Ev}, "(batch, query heads, query length, value head dim)");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "attnkern: out must have the query's dtype ",
              q.scalar_type(), ", got ", out.scalar_type());
  if (lse) {
    check_same_device(*lse, "lse", q);
    check_shape(*lse, "lse", {B, Hq, L}, "(batch, query heads, query length)");
    TORCH_CHECK(lse->scalar_type() == lse_dtype, "attnkern: lse must be ", lse_dtype, ", got ", lse->scalar_type());
    TORCH_CHECK(lse->is_contiguous(), "attnkern: lse must be contiguous");
    p.lse = lse->data_ptr();
  }
  check_same_device(stats, "stats", q);
  check_shape(stats, "stats", {B, Hq, L, 2}, "(batch, query heads, query length, 2)");
  TORCH_CHECK(stats.scalar_type() == lse_dtype, "attnkern: stats must be ", lse_dtype, ", got ",
              stats.scalar_type());
  TORCH_CHECK(stats.is_contiguous(), "attnkern: stats must be contiguous");
  p.out = out.data_ptr(), p.out_st = strides_of(out);
  p.stats = stats.data_ptr();
  if (out_lo.has_value() && out_lo->defined()) {
    check_same_device(*out_lo, "out_lo", q);
    check_shape(*out_lo, "out_lo", {B, Hq, L, Ev}, "(like out)");
    TORCH_CHECK(out_lo->scalar_type() == q.scalar_type(), "attnkern: out_lo must have the query's dtype ",
                q.scalar_type(), ", got ", out_lo->scalar_type());
    p.out_lo = out_lo->data_ptr(), p.out_lo_st = strides_of(*out_lo);
  }
  return p;
}

void set_mask_map(AttentionParams& p, const std::optional<at::Tensor>& map, const at::Tensor& q) {
  if (!map.has_value() || !map->defined()) return;
  const at::Tensor& t = *map;
  TORCH_CHECK(p.mask_kind != MaskKind::kNone, "attnkern: mask_map given without an attn_mask");
  check_same_device(t, "mask_map", q);
  TORCH_CHECK(t.scalar_type() == at::kChar, "attnkern: mask_map must be int8 (attnkern.block_map), got ",
              t.scalar_type());
  const int64_t cells[4] = {p.Bm, p.Hm, p.Lm > 1 ? (p.L + kMapTile - 1) / kMapTile : 1,
                            p.Sm > 1 ? (p.S + kMapTile - 1) / kMapTile : 1};
  TORCH_CHECK(t.dim() == 4, "attnkern: mask_map must be 4-D, got shape ", shape_str(t.sizes()));
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(t.size(d) == 1 || t.size(d) == cells[d], "attnkern: mask_map must have shape (", cells[0], ", ",
                cells[1], ", ", cells[2], ", ", cells[3], ") or 1 on a dim (the mask's 16 x 16 sub-tiles), got ",
                shape_str(t.sizes()));
  }
  Strides4 st = strides_of(t);
  if (t.size(0) == 1) st.b = 0;
  if (t.size(1) == 1) st.h = 0;
  if (t.size(2) == 1) st.l = 0;
  if (t.size(3) == 1) st.e = 0;
  p.mask_map = t.data_ptr<int8_t>();
  p.map_st = st;
}

AttentionParams backward_params(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, const at::Tensor& out,
                                const std::optional<at::Tensor>& out_lo, const at::Tensor& stats, double scale,
                                at::IntArrayRef band, const ModArgs& mods, const at::Tensor& dq, const at::Tensor& dk,
                                const at::Tensor& dv, const std::optional<at::Tensor>& dmask) {
  AttentionParams p = forward_params(q, k, v, mask, scale, band, mods, out, nullptr, stats, out_lo);
  const auto acc_dtype = stats.scalar_type();
  const std::tuple<const at::Tensor*, const at::Tensor*, const char*> like[] = {
      {&dout, &out, "grad_out"}, {&dq, &q, "grad_query"}, {&dk, &k, "grad_key"}, {&dv, &v, "grad_value"}};
  for (const auto& [t, ref, name] : like) {
    check_same_device(*t, name, q);
    check_shape(*t, name, ref->sizes(), "(like the tensor it is the gradient of)");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "attnkern: ", name, " must have the query's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
  }
  p.dout = dout.data_ptr(), p.dout_st = strides_of(dout);
  p.dq = dq.data_ptr(), p.dq_st = strides_of(dq);
  p.dk = dk.data_ptr(), p.dk_st = strides_of(dk);
  p.dv = dv.data_ptr(), p.dv_st = strides_of(dv);
  if (dlse.has_value() && dlse->defined()) {
    check_same_device(*dlse, "grad_lse", q);
    check_shape(*dlse, "grad_lse", {p.B, p.Hq, p.L}, "(batch, query heads, query length)");
    TORCH_CHECK(dlse->scalar_type() == acc_dtype, "attnkern: grad_lse must be ", acc_dtype, ", got ",
                dlse->scalar_type());
    p.dlse = dlse->data_ptr();
    p.dlse_st.b = dlse->stride(0), p.dlse_st.h = dlse->stride(1), p.dlse_st.l = dlse->stride(2);
  }
  if (dmask.has_value() && dmask->defined()) {
    TORCH_CHECK(p.mask_kind == MaskKind::kFloat, "attnkern: grad_mask needs a float attn_mask");
    check_same_device(*dmask, "grad_mask", q);
    check_shape(*dmask, "grad_mask", mask->sizes(), "(like attn_mask)");
    TORCH_CHECK(dmask->scalar_type() == acc_dtype && dmask->is_contiguous(),
                "attnkern: grad_mask must be a contiguous ", acc_dtype, " buffer, got ", dmask->scalar_type());
    p.dmask = dmask->data_ptr();
  }
  return p;
}

}  // namespace attnkern
