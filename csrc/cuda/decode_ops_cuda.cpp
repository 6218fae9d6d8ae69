// The CUDA implementation of attnkern_ext::decode (KV-cache decoding, attnkern/kvcache.py): the op's
// checks (decode_op.cpp), the kernels' own requirements, the split count from the device's SM count,
// then the split-KV kernels of the (dtype, head dim) instantiation (inst/decode_hdim*). Host code only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "decode_host.h"

namespace attnkern {
namespace {

void decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                 const std::optional<at::Tensor>& block_table, double scale, at::IntArrayRef band, double softcap,
                 const std::optional<at::Tensor>& alibi, int64_t num_splits, const at::Tensor& out,
                 const at::Tensor& lse) {
  const DecodeParams p =
      decode_params(q, k_cache, v_cache, seqlens, block_table, scale, band, softcap, alibi, num_splits, out, lse);
  cuda::check_decode_call(p, q, k_cache, v_cache, out, "attnkern cuda");
  const c10::cuda::CUDAGuard guard(q.device());
  int major = 0, sms = 0;
  const int dev = q.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 8, "attnkern cuda decode: the kernels need compute capability 8.0 or newer, got ", major);
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const cuda::DecodePlan plan = cuda::plan_decode(p, q, k_cache, block_table, sms);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = cuda::run_decode_plan(plan, p, q.scalar_type(), stream);
  TORCH_CHECK(err == cudaSuccess, "attnkern cuda decode: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern_ext, CUDA, m) { m.impl("decode", &attnkern::decode_cuda); }
