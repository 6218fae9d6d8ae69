// The CPU kernels' instruction-set check: a build for AVX2/FMA refuses, with a clear error, a processor
// without them (shared by the attention and decode ops).
#pragma once

#include <c10/util/Exception.h>

namespace attnkern::cpu {

inline void check_isa() {
#if defined(__AVX2__) && (defined(__x86_64__) || defined(_M_X64))
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "attnkern: this build of the CPU kernels needs AVX2 and FMA, which this processor lacks; "
              "rebuild attnkern on this machine");
#endif
}

}  // namespace attnkern::cpu
