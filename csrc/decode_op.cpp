// The attnkern_ext::decode op (KV-cache decoding, attnkern/kvcache.py): its schema and argument checks.
//
// A fragment of the attnkern_ext library (ops.cpp defines the attention ops), kept in its own unit so
// the decode op and the attention ops change independently. The op only attends: appending new keys
// and values to the cache is done in place by the Python layer before it is called. It writes into
// out (B, Lq, Hq, Ev) and lse (B, Hq, Lq) that the caller allocates. The checks repeat the Python
// ones on purpose (the op can be called directly) and read the lengths and the block table, so that
// no bad call can read outside the cache.
#include "decode_op.h"
#include "op_args.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace attnkern {

namespace {

Strides4D strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void same_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "attnkern decode: ", name, " must be on the query's device ", q.device(),
              ", got ", t.device());
}

}  // namespace

DecodeParams decode_params(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table, double scale,
                           at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                           int64_t num_splits, const at::Tensor& out, const at::Tensor& lse) {
  DecodeParams p;
  TORCH_CHECK(q.dim() == 4, "attnkern decode: query must be 4-D (B, Lq, Hq, E), got shape ", shape_str(q.sizes()));
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "attnkern decode: query must be float16, bfloat16, float32 or float64, got ", dt);
  p.B = q.size(0), p.Lq = q.size(1), p.Hq = q.size(2), p.E = q.size(3);
  const bool paged = block_table.has_value() && block_table->defined();
  const char* layout = paged ? "(num_pages, page_size, Hkv, E)" : "(B, S_max, Hkv, E)";
  for (const auto* t : {&k_cache, &v_cache}) {
    const char* name = t == &k_cache ? "k_cache" : "v_cache";
    same_device(*t, name, q);
    TORCH_CHECK(t->scalar_type() == dt, "attnkern decode: ", name, " must have the query's dtype ", dt, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 4, "attnkern decode: ", name, " must be 4-D ", layout, ", got shape ",
                shape_str(t->sizes()));
  }
  p.Hkv = k_cache.size(2), p.Ev = v_cache.size(3);
  TORCH_CHECK(k_cache.size(3) == p.E, "attnkern decode: k_cache's last dim must be the query's E = ", p.E,
              ", got shape ", shape_str(k_cache.sizes()));
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) && v_cache.size(2) == p.Hkv,
              "attnkern decode: v_cache must match k_cache in its first three dims ",
              shape_str(k_cache.sizes().slice(0, 3)), ", got shape ", shape_str(v_cache.sizes()));
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "attnkern decode: the query's heads Hq = ", p.Hq,
              " must be a multiple of the cache's Hkv = ", p.Hkv);
  p.group = p.Hq / p.Hkv;
  p.page_size = k_cache.size(1);
  p.num_pages = k_cache.size(0);

  same_device(seqlens, "seqlens", q);
  TORCH_CHECK(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == p.B,
              "attnkern decode: seqlens must be an int32 tensor of shape (B,) = (", p.B, ",), got ",
              seqlens.scalar_type(), " of shape ", shape_str(seqlens.sizes()));
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.seqlens_st = seqlens.stride(0);
  int64_t capacity = p.page_size;
  if (paged) {
    const at::Tensor& bt = *block_table;
    same_device(bt, "block_table", q);
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == p.B,
                "attnkern decode: block_table must be an int32 tensor of shape (B, max_pages) with B = ", p.B,
                ", got ", bt.scalar_type(), " of shape ", shape_str(bt.sizes()));
    p.block_table = bt.data_ptr<int32_t>();
    p.bt_st_b = bt.stride(0), p.bt_st_p = bt.stride(1);
    capacity = bt.size(1) * p.page_size;
  } else {
    TORCH_CHECK(k_cache.size(0) == p.B, "attnkern decode: a contiguous k_cache must have the query's batch size B = ",
                p.B, " in dim 0, got shape ", shape_str(k_cache.sizes()));
  }
  // The lengths and the block table are read on the host: a copy of them for a device's tensors.
  const at::Tensor lens = seqlens.cpu();
  const at::Tensor table = paged ? block_table->cpu() : at::Tensor();
  const auto lens_at = lens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t n = lens_at[b];
    TORCH_CHECK(n >= 0 && n <= capacity, "attnkern decode: seqlens[", b, "] = ", n, " is outside [0, ", capacity,
                "], the keys the cache holds per batch element");
    for (int64_t j = 0; paged && j < n; j += p.page_size) {
      const int64_t page = table.accessor<int32_t, 2>()[b][j / p.page_size];
      TORCH_CHECK(page >= 0 && page < p.num_pages, "attnkern decode: block_table[", b, ", ", j / p.page_size,
                  "] = ", page, " is not a page of the cache [0, ", p.num_pages, ")");
    }
  }
  p.q = q.data_ptr(), p.k = k_cache.data_ptr(), p.v = v_cache.data_ptr();
  p.q_st = strides(q), p.k_st = strides(k_cache), p.v_st = strides(v_cache);

  TORCH_CHECK(std::isfinite(scale), "attnkern decode: scale must be finite, got ", scale);
  p.scale = scale;
  TORCH_CHECK(band.size() == 3 && band[0] == 1 && band[1] >= -1 && band[2] >= -1,
              "attnkern decode: band must be [1, left, right] (bottom-right, bounds >= -1), got ", band);
  p.has_left = band[1] >= 0, p.has_right = band[2] >= 0;
  p.left = band[1], p.right = band[2];
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "attnkern decode: softcap must be a finite float >= 0, got ",
              softcap);
  p.softcap = softcap;
  if (alibi.has_value() && alibi->defined()) {
    const at::Tensor& a = *alibi;
    same_device(a, "alibi", q);
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(1) == p.Hq &&
                    (a.size(0) == 1 || a.size(0) == p.B) && a.is_contiguous(),
                "attnkern decode: alibi must be a contiguous float32 (1 or B, Hq) = (1 or ", p.B, ", ", p.Hq,
                ") tensor, got ", a.scalar_type(), " of shape ", shape_str(a.sizes()));
    p.alibi = a.data_ptr<float>();
    p.alibi_st_b = a.size(0) == 1 ? 0 : p.Hq;
  }
  TORCH_CHECK(num_splits >= 0, "attnkern decode: num_splits must be >= 0 (0: chosen from the problem), got ",
              num_splits);
  p.num_splits = num_splits;

  same_device(out, "out", q);
  TORCH_CHECK(out.scalar_type() == dt && out.dim() == 4 && out.size(0) == p.B && out.size(1) == p.Lq &&
                  out.size(2) == p.Hq && out.size(3) == p.Ev,
              "attnkern decode: out must be a ", dt, " tensor of shape (B, Lq, Hq, Ev) = (", p.B, ", ", p.Lq, ", ",
              p.Hq, ", ", p.Ev, "), got ", out.scalar_type(), " of shape ", shape_str(out.sizes()));
  const auto lse_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  same_device(lse, "lse", q);
  TORCH_CHECK(lse.scalar_type() == lse_dt && lse.is_contiguous() && lse.sizes() == at::IntArrayRef({p.B, p.Hq, p.Lq}),
              "attnkern decode: lse must be a contiguous ", lse_dt, " tensor of shape (B, Hq, Lq) = (", p.B, ", ",
              p.Hq, ", ", p.Lq, "), got ", lse.scalar_type(), " of shape ", shape_str(lse.sizes()));
  p.out = out.data_ptr(), p.lse = lse.data_ptr();
  p.out_st = strides(out);
  return p;
}

}  // namespace attnkern

// The cuda-emu module (attnkern/backends/cuda_emu.py) links this unit for decode_params alone, with
// ATTNKERN_DECODE_PARAMS_ONLY: the op itself is attnkern._C's.
#ifndef ATTNKERN_DECODE_PARAMS_ONLY
TORCH_LIBRARY_FRAGMENT(attnkern_ext, m) { m.def(attnkern::kDecodeSchema); }
#endif
