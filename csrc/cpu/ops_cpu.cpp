// CPU implementations of the attnkern_ext ops.
#include <torch/library.h>

#include "../op_args.h"
#include "attention_cpu.h"
#include "isa.h"

namespace attnkern {
namespace {

void forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, double scale, at::IntArrayRef band,
                 double softcap, const std::optional<at::Tensor>& alibi, double dropout_p,
                 const std::optional<at::Tensor>& rng, const at::Tensor& out,
                 const at::Tensor& lse, const at::Tensor& stats, const std::optional<at::Tensor>& out_lo,
                 const std::optional<at::Tensor>& mask_map) {
  cpu::check_isa();
  AttentionParams p =
      forward_params(q, k, v, mask, scale, band, {softcap, alibi, dropout_p, rng}, out, &lse, stats, out_lo);
  set_mask_map(p, mask_map, q);  // checked as every device does; the CPU kernels do not read it
  if (p.B * p.Hq * p.L == 0) return;
  cpu::attention_forward(p, q.scalar_type());
}

void backward_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                  const at::Tensor& out, const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                  double scale, at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                  double dropout_p, const std::optional<at::Tensor>& rng,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  const std::optional<at::Tensor>& dmask, const std::optional<at::Tensor>& mask_map) {
  cpu::check_isa();
  AttentionParams p =
      backward_params(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, {softcap, alibi, dropout_p, rng}, dq,
                      dk, dv, dmask);
  set_mask_map(p, mask_map, q);  // checked as every device does; the CPU kernels do not read it
  if (p.B * p.Hkv * p.S == 0 && p.B * p.Hq * p.L == 0) return;
  cpu::attention_backward(p, q.scalar_type());
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern_ext, CPU, m) {
  m.impl("forward", &attnkern::forward_cpu);
  m.impl("backward", &attnkern::backward_cpu);
}
