// The attnkern_ext operator library: schemas here, one TORCH_LIBRARY_IMPL per device elsewhere.
//
// Both ops write into buffers the caller allocates (out=, grad_*=), so that the Python layer decides
// every output's layout once, for every backend and for its fake (meta) implementations alike.
// `stats` holds the per-row softmax statistics the backward recomputes probabilities from, `out_lo`
// (optional) the rounding residual of a half-precision output, for a float32-accurate delta (params.h).
#include <torch/library.h>

TORCH_LIBRARY(attnkern_ext, m) {
  m.def(
      "forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, int causal, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!) stats, Tensor(d!)? out_lo=None) -> ()");
  m.def(
      "backward(Tensor grad_out, Tensor? grad_lse, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor out, Tensor? out_lo, Tensor stats, float scale, int causal, Tensor(a!) grad_query, Tensor(b!) grad_key, "
      "Tensor(c!) grad_value, Tensor(d!)? grad_mask) -> ()");
}
