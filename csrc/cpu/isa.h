// The CPU kernels' instruction-set check: a build for AVX2/FMA refuses, with a clear error, a processor
// without them (shared by the attention and decode ops). The extension is built for AVX2; the few
// AVX-512 paths carry ATTNKERN_TARGET_AVX512 and run only where has_avx512f() says so at run time.
#pragma once

#include <c10/util/Exception.h>

#if defined(__AVX2__) && defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define ATTNKERN_AVX512_TARGET 1
#define ATTNKERN_TARGET_AVX512 __attribute__((target("avx512f")))
#endif

namespace attnkern::cpu {

inline void check_isa() {
#if defined(__AVX2__) && (defined(__x86_64__) || defined(_M_X64))
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "attnkern: this build of the CPU kernels needs AVX2 and FMA, which this processor lacks; "
              "rebuild attnkern on this machine");
#endif
}

#ifdef ATTNKERN_AVX512_TARGET
// Whether this processor (and its OS) runs AVX-512F code.
inline bool has_avx512f() {
  static const bool on = __builtin_cpu_supports("avx512f");
  return on;
}
#endif

}  // namespace attnkern::cpu
