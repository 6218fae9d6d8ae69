// Entry points of the CUDA kernels, one explicit instantiation per (dtype, head dim) in inst/.
// Declarations only: the op layer (ops_cuda.cpp) includes this without any kernel code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../params.h"

namespace attnkern {
namespace cuda {

// The instantiated head dims; a problem runs on the smallest one >= max(E, Ev) (the kernels zero-fill
// the columns past E and Ev).
constexpr int kHeadDims[] = {32, 64, 96, 128, 160, 192, 256};

template <typename T, int HD>
cudaError_t run_attention_fwd(const AttentionParams& p, cudaStream_t stream);

// Keys per CTA of the backward's dK/dV pass (BwdTraits::kBlockN of every configuration): what the op
// layer's split of GQA/MQA groups over CTAs (bwd_host.h) counts in.
constexpr int kDkDvBlockKeys = 64;

// `delta`: a float32 (B, Hq, L) scratch buffer; with p.kv_parts > 1, p.dkv_parts the dK/dV parts' workspace.
template <typename T, int HD>
cudaError_t run_attention_bwd(const AttentionParams& p, float* delta, cudaStream_t stream);

// The same for problems with score modifications (p.has_mods(); run_attention_fwd/bwd call these), in units
// of their own (inst/mods_hdim*): the general kernels they launch cost a build as much as the plain ones.
template <typename T, int HD>
cudaError_t run_attention_fwd_mods(const AttentionParams& p, cudaStream_t stream);
template <typename T, int HD>
cudaError_t run_attention_bwd_mods(const AttentionParams& p, float* delta, cudaStream_t stream);

#define ATTNKERN_DECLARE_INSTANCES(T, HD)                                                                 \
  extern template cudaError_t run_attention_fwd<T, HD>(const AttentionParams&, cudaStream_t);           \
  extern template cudaError_t run_attention_bwd<T, HD>(const AttentionParams&, float*, cudaStream_t);   \
  extern template cudaError_t run_attention_fwd_mods<T, HD>(const AttentionParams&, cudaStream_t);      \
  extern template cudaError_t run_attention_bwd_mods<T, HD>(const AttentionParams&, float*, cudaStream_t);

#define ATTNKERN_FOR_EACH_HEAD_DIM(M, T) M(T, 32) M(T, 64) M(T, 96) M(T, 128) M(T, 160) M(T, 192) M(T, 256)
ATTNKERN_FOR_EACH_HEAD_DIM(ATTNKERN_DECLARE_INSTANCES, __half)
ATTNKERN_FOR_EACH_HEAD_DIM(ATTNKERN_DECLARE_INSTANCES, __nv_bfloat16)

}  // namespace cuda
}  // namespace attnkern
