// CUDA implementations of the attnkern_ext ops: the shared argument checks, the CUDA kernels' own
// requirements, then dispatch to the (dtype, head dim) instantiation. No kernel code here (dispatch.h
// only declares the entry points), so this unit compiles with the host compiler.
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS and cuSPARSE
// headers, which a bare toolkit (and the offline syntax check) need not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "../op_args.h"
#include "bwd_host.h"
#include "dispatch.h"
#include "host_checks.h"
#include "varlen_args.h"

namespace attnkern {
namespace {

void check_layout(const at::Tensor& t, const char* name) { check_cp_async_layout(t, name, "attnkern cuda"); }

void check_problem(const AttentionParams& p, const at::Tensor& q) {
  check_dtype_and_head_dims(q.scalar_type(), p.E, p.Ev, "attnkern cuda");
  int major = 0, minor = 0;
  const int dev = q.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  TORCH_CHECK(major >= 8, "attnkern cuda: the kernels need compute capability 8.0 or newer, got ", major, ".",
              minor);
  // Heads ride on grid y; batches past grid z's limit run as several launches (launch.h).
  TORCH_CHECK(p.Hq <= 65535, "attnkern cuda: at most 65535 query heads (grid y), got ", p.Hq);
}

int sm_count(const at::Tensor& q) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()));
  return sms;
}

template <typename T>
cudaError_t run_fwd(int hd, const AttentionParams& p, cudaStream_t s) {
  switch (hd) {
    case 32: return cuda::run_attention_fwd<T, 32>(p, s);
    case 64: return cuda::run_attention_fwd<T, 64>(p, s);
    case 96: return cuda::run_attention_fwd<T, 96>(p, s);
    case 128: return cuda::run_attention_fwd<T, 128>(p, s);
    case 160: return cuda::run_attention_fwd<T, 160>(p, s);
    case 192: return cuda::run_attention_fwd<T, 192>(p, s);
    default: return cuda::run_attention_fwd<T, 256>(p, s);
  }
}

template <typename T>
cudaError_t run_bwd(int hd, const AttentionParams& p, float* delta, cudaStream_t s) {
  switch (hd) {
    case 32: return cuda::run_attention_bwd<T, 32>(p, delta, s);
    case 64: return cuda::run_attention_bwd<T, 64>(p, delta, s);
    case 96: return cuda::run_attention_bwd<T, 96>(p, delta, s);
    case 128: return cuda::run_attention_bwd<T, 128>(p, delta, s);
    case 160: return cuda::run_attention_bwd<T, 160>(p, delta, s);
    case 192: return cuda::run_attention_bwd<T, 192>(p, delta, s);
    default: return cuda::run_attention_bwd<T, 256>(p, delta, s);
  }
}

void forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, double scale, at::IntArrayRef band,
                 double softcap, const std::optional<at::Tensor>& alibi, double dropout_p,
                 const std::optional<at::Tensor>& rng, const at::Tensor& out,
                  const at::Tensor& lse, const at::Tensor& stats, const std::optional<at::Tensor>& out_lo,
                  const std::optional<at::Tensor>& mask_map) {
  AttentionParams p =
      forward_params(q, k, v, mask, scale, band, {softcap, alibi, dropout_p, rng}, out, &lse, stats, out_lo);
  set_mask_map(p, mask_map, q);
  check_problem(p, q);
  check_layout(q, "query"), check_layout(k, "key"), check_layout(v, "value"), check_layout(out, "out");
  if (p.out_lo) check_layout(*out_lo, "out_lo");
  if (p.B * p.Hq * p.L == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err = q.scalar_type() == at::kHalf ? run_fwd<__half>(hd, p, stream)
                                                       : run_fwd<__nv_bfloat16>(hd, p, stream);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda forward: ", cudaGetErrorString(err));
}

void backward_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                   const at::Tensor& out, const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                   double scale, at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                  double dropout_p, const std::optional<at::Tensor>& rng,
                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
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
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor delta = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  const at::Tensor kv_parts = cuda::plan_kv_parts(p, q, p.B * p.S, sm_count(q), 65535);
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err =
      q.scalar_type() == at::kHalf ? run_bwd<__half>(hd, p, delta.data_ptr<float>(), stream)
                                   : run_bwd<__nv_bfloat16>(hd, p, delta.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda backward: ", cudaGetErrorString(err));
}

// Packed variable-length batches: one launch per pass over every sequence (varlen.h), on the packed
// tensors' canonical views (varlen_args.h).
void varlen_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, double scale, at::IntArrayRef band, double softcap,
                         const std::optional<at::Tensor>& alibi, const at::Tensor& out, const at::Tensor& lse,
                         const at::Tensor& stats, const std::optional<at::Tensor>& out_lo, double dropout_p,
                         const std::optional<at::Tensor>& rng) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionParams p =
      varlen_forward_params(q, k, v, cu_q, cu_k, scale, band, softcap, alibi, dropout_p, rng, out, lse, stats, out_lo);
  check_problem(p, q);
  check_layout(packed_view(q), "query"), check_layout(packed_view(k), "key"), check_layout(packed_view(v), "value");
  check_layout(packed_view(out), "out");
  if (p.out_lo) check_layout(packed_view(*out_lo), "out_lo");
  if (p.B * p.Hq * p.L == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err = q.scalar_type() == at::kHalf ? run_fwd<__half>(hd, p, stream)
                                                       : run_fwd<__nv_bfloat16>(hd, p, stream);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda varlen forward: ", cudaGetErrorString(err));
}

void varlen_backward_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                          const at::Tensor& out, const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                          double scale, at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                          const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, double dropout_p,
                          const std::optional<at::Tensor>& rng) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionParams p = varlen_backward_params(dout, dlse, q, k, v, cu_q, cu_k, out, out_lo, stats, scale, band,
                                             softcap, alibi, dropout_p, rng, dq, dk, dv);
  check_problem(p, q);
  const std::pair<const at::Tensor*, const char*> packed[] = {
      {&q, "query"}, {&k, "key"}, {&v, "value"}, {&out, "out"}, {&dout, "grad_out"},
      {&dq, "grad_query"}, {&dk, "grad_key"}, {&dv, "grad_value"}};
  for (const auto& [t, name] : packed) check_layout(packed_view(*t), name);
  if (p.out_lo) check_layout(packed_view(*out_lo), "out_lo");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor delta = at::empty({p.Hq, p.total_q}, q.options().dtype(at::kFloat));  // (Hq, Tq), like lse
  const at::Tensor kv_parts = cuda::plan_kv_parts(p, q, k.size(0), sm_count(q), 65535);
  const int hd = head_dim_bucket(std::max(p.E, p.Ev));
  const cudaError_t err =
      q.scalar_type() == at::kHalf ? run_bwd<__half>(hd, p, delta.data_ptr<float>(), stream)
                                   : run_bwd<__nv_bfloat16>(hd, p, delta.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda varlen backward: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern_ext, CUDA, m) {
  m.impl("forward", &attnkern::forward_cuda);
  m.impl("backward", &attnkern::backward_cuda);
  m.impl("varlen_forward", &attnkern::varlen_forward_cuda);
  m.impl("varlen_backward", &attnkern::varlen_backward_cuda);
}
