// The attnkern_ext operator library: schemas here, one TORCH_LIBRARY_IMPL per device elsewhere.
//
// Both ops write into buffers the caller allocates (out=, grad_*=), so that the Python layer decides
// every output's layout once, for every backend and for its fake (meta) implementations alike.
// `stats` holds the per-row softmax statistics the backward recomputes probabilities from, `out_lo`
// (optional) the rounding residual of a half-precision output, for a float32-accurate delta (params.h).
#include <torch/library.h>

#include "op_args.h"

TORCH_LIBRARY(attnkern_ext, m) {
  m.def(attnkern::kForwardSchema);
  m.def(attnkern::kBackwardSchema);
}
