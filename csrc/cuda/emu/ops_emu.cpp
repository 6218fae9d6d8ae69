// The attnkern_emu ops: the attnkern_ext forward/backward schemas, run on CPU tensors by the CUDA
// kernels of csrc/cuda compiled as host C++ under the SIMT emulator (runtime.h). The checks and the
// (dtype, head dim) dispatch follow ops_cuda.cpp; the device-only parts (capability, streams) are gone.
// Each call registers the tensors it passes in as the global memory the kernels may touch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <sstream>
#include <string>

#include "../../op_args.h"
#include "../bwd_host.h"
#include "../dispatch.h"
#include "../host_checks.h"
#include "../varlen_args.h"
#include "runtime.h"

namespace attnkern {
namespace {

void check_layout(const at::Tensor& t, const char* name) { check_cp_async_layout(t, name, "attnkern cuda-emu"); }

// The emulated device's SM count, where the kernels' host code sizes grids by it (the backward's GQA
// split, the decode's split count): a small one, so that small problems take those paths too.
constexpr int64_t kEmuSms = 8;

void check_problem(const AttentionParams& p, const at::Tensor& q) {
  check_dtype_and_head_dims(q.scalar_type(), p.E, p.Ev, "attnkern cuda-emu");
}

// The bytes a tensor view spans (strides are non-negative here), named for the reports.
emu::GlobalRange span(const at::Tensor& t, const char* name) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return {name, t.data_ptr(), t.data_ptr()};
    last += (t.size(d) - 1) * t.stride(d);
  }
  const char* base = static_cast<const char*>(t.data_ptr());
  return {name, base, base + (last + 1) * t.element_size()};
}

emu::GlobalRange span(const std::optional<at::Tensor>& t, const char* name) {
  return t ? span(*t, name) : emu::GlobalRange{name, nullptr, nullptr};
}

template <typename T>
cudaError_t run_fwd(int hd, const AttentionParams& p) {
  switch (hd) {
    case 32: return cuda::run_attention_fwd<T, 32>(p, nullptr);
    case 64: return cuda::run_attention_fwd<T, 64>(p, nullptr);
    case 96: return cuda::run_attention_fwd<T, 96>(p, nullptr);
    case 128: return cuda::run_attention_fwd<T, 128>(p, nullptr);
    case 160: return cuda::run_attention_fwd<T, 160>(p, nullptr);
    case 192: return cuda::run_attention_fwd<T, 192>(p, nullptr);
    default: return cuda::run_attention_fwd<T, 256>(p, nullptr);
  }
}

template <typename T>
cudaError_t run_bwd(int hd, const AttentionParams& p, float* delta) {
  switch (hd) {
    case 32: return cuda::run_attention_bwd<T, 32>(p, delta, nullptr);
    case 64: return cuda::run_attention_bwd<T, 64>(p, delta, nullptr);
    case 96: return cuda::run_attention_bwd<T, 96>(p, delta, nullptr);
    case 128: return cuda::run_attention_bwd<T, 128>(p, delta, nullptr);
    case 160: return cuda::run_attention_bwd<T, 160>(p, delta, nullptr);
    case 192: return cuda::run_attention_bwd<T, 192>(p, delta, nullptr);
    default: return cuda::run_attention_bwd<T, 256>(p, delta, nullptr);
  }
}

void forward_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                 double scale, at::IntArrayRef band,
                 double softcap, const std::optional<at::Tensor>& alibi, double dropout_p,
                 const std::optional<at::Tensor>& rng, const at::Tensor& out, const at::Tensor& lse,
                 const at::Tensor& stats, const std::optional<at::Tensor>& out_lo,
                 const std::optional<at::Tensor>& mask_map) {
  AttentionParams p =
      forward_params(q, k, v, mask, scale, band, {softcap, alibi, dropout_p, rng}, out, &lse, stats, out_lo);
  set_mask_map(p, mask_map, q);
  check_problem(p, q);
  check_layout(q, "query"), check_layout(k, "key"), check_layout(v, "value"), check_layout(out, "out");
  if (p.out_lo) check_layout(*out_lo, "out_lo");
  if (p.B * p.Hq * p.L == 0) return;
  const emu::GlobalRanges ranges{span(q, "query"), span(k, "key"),     span(v, "value"),  span(mask, "attn_mask"),
                                 span(out, "out"), span(lse, "lse"), span(stats, "stats"), span(out_lo, "out_lo"),
                                 span(alibi, "alibi"), span(rng, "rng"), span(mask_map, "mask_map")};
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err = q.scalar_type() == at::kHalf ? run_fwd<__half>(hd, p) : run_fwd<__nv_bfloat16>(hd, p);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda-emu forward: error ", int(err));
}

void backward_emu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                  const at::Tensor& out, const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                  double scale, at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                  double dropout_p, const std::optional<at::Tensor>& rng, const at::Tensor& dq, const at::Tensor& dk,
                  const at::Tensor& dv,
                  const std::optional<at::Tensor>& dmask, const std::optional<at::Tensor>& mask_map) {
  AttentionParams p =
      backward_params(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, {softcap, alibi, dropout_p, rng}, dq,
                      dk, dv, dmask);
  set_mask_map(p, mask_map, q);
  check_problem(p, q);
  check_layout(q, "query"), check_layout(k, "key"), check_layout(v, "value"), check_layout(out, "out");
  if (p.out_lo) check_layout(*out_lo, "out_lo");
  check_layout(dout, "grad_out"), check_layout(dq, "grad_query"), check_layout(dk, "grad_key");
  check_layout(dv, "grad_value");
  const at::Tensor delta = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  const at::Tensor kv_parts = cuda::plan_kv_parts(p, q, p.B * p.S, kEmuSms, emu::max_grid_yz());
  const emu::GlobalRanges ranges{span(dout, "grad_out"),    span(dlse, "grad_lse"), span(q, "query"),
                                 span(k, "key"),            span(v, "value"),       span(mask, "attn_mask"),
                                 span(out, "out"),          span(out_lo, "out_lo"), span(stats, "stats"),
                                 span(dq, "grad_query"),
                                 span(dk, "grad_key"),      span(dv, "grad_value"), span(dmask, "grad_mask"),
                                 span(alibi, "alibi"),      span(rng, "rng"),       span(delta, "delta (scratch)"),
                                 span(kv_parts, "dK/dV parts (workspace)"), span(mask_map, "mask_map")};
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err = q.scalar_type() == at::kHalf ? run_bwd<__half>(hd, p, delta.data_ptr<float>())
                                                       : run_bwd<__nv_bfloat16>(hd, p, delta.data_ptr<float>());
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda-emu backward: error ", int(err));
}

// Packed variable-length batches: varlen_forward_cuda / varlen_backward_cuda of ops_cuda.cpp, emulated.
void varlen_forward_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                        const at::Tensor& cu_k, double scale, at::IntArrayRef band, double softcap,
                        const std::optional<at::Tensor>& alibi, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& stats, const std::optional<at::Tensor>& out_lo, double dropout_p,
                        const std::optional<at::Tensor>& rng) {
  const AttentionParams p =
      varlen_forward_params(q, k, v, cu_q, cu_k, scale, band, softcap, alibi, dropout_p, rng, out, lse, stats, out_lo);
  check_problem(p, q);
  check_layout(packed_view(q), "query"), check_layout(packed_view(k), "key"), check_layout(packed_view(v), "value");
  check_layout(packed_view(out), "out");
  if (p.out_lo) check_layout(packed_view(*out_lo), "out_lo");
  if (p.B * p.Hq * p.L == 0) return;
  const emu::GlobalRanges ranges{span(q, "query"),         span(k, "key"),
                                 span(v, "value"),         span(cu_q, "cu_seqlens_q"),
                                 span(cu_k, "cu_seqlens_k"), span(out, "out"),
                                 span(lse, "lse"),         span(stats, "stats"),
                                 span(out_lo, "out_lo"),   span(alibi, "alibi"),
                                 span(rng, "rng")};
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err = q.scalar_type() == at::kHalf ? run_fwd<__half>(hd, p) : run_fwd<__nv_bfloat16>(hd, p);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda-emu varlen forward: error ", int(err));
}

void varlen_backward_emu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                         const at::Tensor& out, const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                         double scale, at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                         const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, double dropout_p,
                         const std::optional<at::Tensor>& rng) {
  AttentionParams p = varlen_backward_params(dout, dlse, q, k, v, cu_q, cu_k, out, out_lo, stats, scale, band,
                                                   softcap, alibi, dropout_p, rng, dq, dk, dv);
  check_problem(p, q);
  const std::pair<const at::Tensor*, const char*> packed[] = {
      {&q, "query"}, {&k, "key"}, {&v, "value"}, {&out, "out"}, {&dout, "grad_out"},
      {&dq, "grad_query"}, {&dk, "grad_key"}, {&dv, "grad_value"}};
  for (const auto& [t, name] : packed) check_layout(packed_view(*t), name);
  if (p.out_lo) check_layout(packed_view(*out_lo), "out_lo");
  const at::Tensor delta = at::empty({p.Hq, p.total_q}, q.options().dtype(at::kFloat));  // (Hq, Tq), like lse
  const at::Tensor kv_parts = cuda::plan_kv_parts(p, q, k.size(0), kEmuSms, emu::max_grid_yz());
  const emu::GlobalRanges ranges{span(dout, "grad_out"),    span(dlse, "grad_lse"),       span(q, "query"),
                                 span(k, "key"),            span(v, "value"),             span(cu_q, "cu_seqlens_q"),
                                 span(cu_k, "cu_seqlens_k"), span(out, "out"),            span(out_lo, "out_lo"),
                                 span(stats, "stats"),      span(dq, "grad_query"),       span(dk, "grad_key"),
                                 span(dv, "grad_value"),    span(alibi, "alibi"),         span(rng, "rng"),
                                 span(delta, "delta (scratch)"), span(kv_parts, "dK/dV parts (workspace)")};
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err = q.scalar_type() == at::kHalf ? run_bwd<__half>(hd, p, delta.data_ptr<float>())
                                                       : run_bwd<__nv_bfloat16>(hd, p, delta.data_ptr<float>());
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda-emu varlen backward: error ", int(err));
}

}  // namespace

namespace cuda {  // selftest.cu
cudaError_t emu_warp_gemm_check(bool bf16, int hd, const void* q, const void* k, const void* v, float* s, float* o,
                                float* o_split);
void emu_run_broken(int which, const __half* in, float* out);
}  // namespace cuda

namespace {

// The emulator's own tests: one of the broken kernels of selftest.cu (0: missing __syncthreads, 1: a
// read before cp.async.wait_group, 2: a store one past a shared tile, 3: a store one past a global
// tensor, 4: a barrier only one warp reaches; 5-8: launches past the limits; 9: a shuffle half a warp
// skips; 10/11: a warp exchange with/without __syncwarp). Each but 10 must raise the emulator's report.
void run_broken_kernel(int64_t which) {
  const at::Tensor in = at::randn({128, 8}, at::kFloat).to(at::kHalf);
  const at::Tensor out = at::zeros({which == 3 ? 100 : 128}, at::kFloat);
  const emu::GlobalRanges ranges{span(in, "in"), span(out, "out")};
  cuda::emu_run_broken(int(which), static_cast<const __half*>(in.data_ptr()), out.data_ptr<float>());
}

// S = Q K^T and O = round(S) V through the kernels' warp GEMM helpers (64 x hd inputs, fp16/bf16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> warp_gemm_check(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 2 && q.size(0) == 64 && q.is_contiguous() && k.sizes() == q.sizes() &&
                  v.sizes() == q.sizes() && k.is_contiguous() && v.is_contiguous(),
              "warp_gemm_check takes contiguous (64, hd) q, k, v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "fp16 or bf16");
  const int hd = int(q.size(1));
  at::Tensor s = at::full({64, 64}, NAN, q.options().dtype(at::kFloat));
  at::Tensor o = at::full({64, hd}, NAN, q.options().dtype(at::kFloat)), o_split = at::full_like(o, NAN);
  const emu::GlobalRanges ranges{span(q, "q"), span(k, "k"), span(v, "v"), span(s, "s"), span(o, "o"),
                                 span(o_split, "o_split")};
  const cudaError_t err = cuda::emu_warp_gemm_check(q.scalar_type() == at::kBFloat16, hd, q.data_ptr(), k.data_ptr(),
                                                    v.data_ptr(), s.data_ptr<float>(), o.data_ptr<float>(),
                                                    o_split.data_ptr<float>());
  TORCH_CHECK(err == cudaSuccess, "warp_gemm_check: head dim ", hd, " is not instantiated");
  return {s, o, o_split};
}

}  // namespace
}  // namespace attnkern

namespace attnkern {
namespace {

// emu::kernel_counts() as JSON: {kernel: {"launches", "ctas", "mma", "ldmatrix", "ex2_lanes",
// "async_load_bytes": {tensor: bytes}, "sync_load_bytes": {tensor: bytes}}} (demangled kernel names
// and the tensor names of the spans hold no quote or backslash).
std::string kernel_counts_json() {
  std::ostringstream os;
  auto bytes = [&os](const std::map<std::string, int64_t>& m) {
    os << "{";
    const char* sep = "";
    for (const auto& [name, n] : m) os << sep << "\"" << name << "\": " << n, sep = ", ";
    os << "}";
  };
  os << "{";
  const char* sep = "";
  for (const auto& [kernel, c] : emu::kernel_counts()) {
    os << sep << "\"" << kernel << "\": {\"launches\": " << c.launches << ", \"ctas\": " << c.ctas
       << ", \"mma\": " << c.mma << ", \"ldmatrix\": " << c.ldmatrix << ", \"ex2_lanes\": " << c.ex2_lanes
       << ", \"async_load_bytes\": ";
    bytes(c.async_load_bytes);
    os << ", \"sync_load_bytes\": ";
    bytes(c.sync_load_bytes);
    os << "}";
    sep = ", ";
  }
  os << "}";
  return os.str();
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY(attnkern_emu, m) {
  m.def("run_broken_kernel(int which) -> ()");
  m.def("warp_gemm_check(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor, Tensor)");
  m.def("attribute_calls() -> int");
  m.def("kv_group_parts(int B, int Hkv, int group, int S) -> int");
  m.def("kernel_counts() -> str");
  m.def("reset_kernel_counts() -> ()");
  m.def(attnkern::kForwardSchema);
  m.def(attnkern::kBackwardSchema);
  m.def(attnkern::kVarlenForwardSchema);
  m.def(attnkern::kVarlenBackwardSchema);
}

TORCH_LIBRARY_IMPL(attnkern_emu, CPU, m) {
  m.impl("forward", &attnkern::forward_emu);
  m.impl("backward", &attnkern::backward_emu);
  m.impl("varlen_forward", &attnkern::varlen_forward_emu);
  m.impl("varlen_backward", &attnkern::varlen_backward_emu);
  m.impl("warp_gemm_check", &attnkern::warp_gemm_check);
}

TORCH_LIBRARY_IMPL(attnkern_emu, CompositeExplicitAutograd, m) {
  m.impl("run_broken_kernel", &attnkern::run_broken_kernel);
  m.impl("attribute_calls", []() -> int64_t { return attnkern::emu::attribute_calls(); });
  // What the kernels executed since the last reset (compile-report's CUDA main-loop figures).
  m.impl("kernel_counts", []() -> std::string { return attnkern::kernel_counts_json(); });
  m.impl("reset_kernel_counts", []() { attnkern::emu::reset_kernel_counts(); });
  // The backward's group split as the emulated device chooses it (tests: which cases take it).
  m.impl("kv_group_parts", [](int64_t B, int64_t Hkv, int64_t group, int64_t S) -> int64_t {
    return attnkern::cuda::kv_group_parts(B, Hkv, group, S, attnkern::kEmuSms, attnkern::emu::max_grid_yz());
  });
}

// attnkern_ext::decode's twin: the split-KV decode kernels (decode_kernel.h) on CPU tensors, with the
// checks and the split count of decode_ops_cuda.cpp (a device of kEmuSms SMs, so that small problems
// choose several splits too).
#include "../../decode_op.h"
#include "../decode_host.h"

namespace attnkern {
namespace {

void decode_emu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                const std::optional<at::Tensor>& block_table, double scale, at::IntArrayRef band, double softcap,
                const std::optional<at::Tensor>& alibi, int64_t num_splits, const at::Tensor& out,
                const at::Tensor& lse) {
  const DecodeParams p =
      decode_params(q, k_cache, v_cache, seqlens, block_table, scale, band, softcap, alibi, num_splits, out, lse);
  cuda::check_decode_call(p, q, k_cache, v_cache, out, "attnkern cuda-emu");
  const cuda::DecodePlan plan = cuda::plan_decode(p, q, k_cache, block_table, kEmuSms);
  const emu::GlobalRanges ranges{span(q, "query"),       span(k_cache, "k_cache"),
                                 span(v_cache, "v_cache"), span(seqlens, "seqlens"),
                                 span(block_table, "block_table"), span(alibi, "alibi"),
                                 span(out, "out"),       span(lse, "lse"),
                                 span(plan.ws_out, "split outputs (workspace)"),
                                 span(plan.ws_lse, "split lse (workspace)")};
  const cudaError_t err = cuda::run_decode_plan(plan, p, q.scalar_type(), nullptr);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda-emu decode: error ", int(err));
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_FRAGMENT(attnkern_emu, m) { m.def(attnkern::kDecodeSchema); }

TORCH_LIBRARY_IMPL(attnkern_emu, CPU, m) { m.impl("decode", &attnkern::decode_emu); }
