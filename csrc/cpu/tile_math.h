// Building blocks of the CPU kernels: aligned scratch buffers, a register-blocked GEMM micro-kernel,
// conversions, and the per-row application of masks to a score tile.
//
// All tile math runs in acc_t (float for float/half/bfloat16 inputs, double for double) with ATen's
// Vectorized<acc_t>, so the same code compiles to AVX2 (8 floats) or AVX-512 or NEON lanes.
#pragma once

#if defined(CPU_CAPABILITY_AVX2) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define ATTNKERN_AVX2_MICROKERNEL 1
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "../params.h"

namespace attnkern {
namespace cpu {
// Internal linkage: each translation unit keeps its own copies of these templates (with weak linkage
// the linker kept one TU's copy, in which GCC had spilled the accumulators to the stack).
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Micro-kernel tile: MR rows x NR columns of C held in 2*MR vector registers (6 x 16 floats on AVX2:
// 12 accumulators + 2 B vectors + 1 broadcast of the 16 ymm registers).
constexpr int kMR = 6;
template <typename T>
constexpr int64_t kNR = 2 * Vec<T>::size();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}


// A 64-byte aligned scratch buffer that only grows (one per thread, reused across tasks).
template <typename T>
class Scratch {
 public:
  T* get(int64_t n) {
    if (n > capacity_) {
      std::size_t bytes = static_cast<std::size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
      data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      if (!data_) throw std::bad_alloc();
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t capacity_ = 0;
};

// Every B operand is packed in panels of kNR columns: B(k, j) lives at
//     B[(j / NR) * panel_stride + k * NR + j % NR]
// so the micro-kernel reads one 64-byte row of a panel per k, consecutive in memory. (Reading B rows
// straight out of a matrix whose rows are thousands of bytes apart maps them all to a few L1 sets and
// thrashes; that alone cost 3x on the first version.)

// C[MR x NR] (+)= A[MR x K] * B[K x NR]. A is row-major (a(r, k) = A[r*lda + k]) or, with A_TRANS,
// column-major (a(r, k) = A[k*lda + r], i.e. the transpose of a row-major matrix, so P^T dO and
// dS^T Q need no explicit transposes). B is one panel: row k at B + k*NR.
template <typename T, int MR, bool A_TRANS, bool ACCUM>
inline void micro_kernel(int64_t K, const T* __restrict A, int64_t lda, const T* __restrict B,
                         T* __restrict C, int64_t ldc) {
  constexpr int V = Vec<T>::size();
  constexpr int64_t NR = 2 * V;
  Vec<T> c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if (ACCUM) {
      c0[r] = Vec<T>::loadu(C + r * ldc);
      c1[r] = Vec<T>::loadu(C + r * ldc + V);
    } else {
      c0[r] = Vec<T>(T(0));
      c1[r] = Vec<T>(T(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec<T> b0 = Vec<T>::loadu(B + k * NR);
    const Vec<T> b1 = Vec<T>::loadu(B + k * NR + V);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const Vec<T> a(A_TRANS ? A[k * lda + r] : A[r * lda + k]);
      c0[r] = at::vec::fmadd(a, b0, c0[r]);
      c1[r] = at::vec::fmadd(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c0[r].store(C + r * ldc);
    c1[r].store(C + r * ldc + V);
  }
}

#ifdef ATTNKERN_AVX2_MICROKERNEL
// The hot case spelled out: float, 6 x 16, twelve named ymm accumulators, so that no compiler's
// register allocation can put them on the stack.
template <bool A_TRANS, bool ACCUM>
inline void micro_kernel_6x16_avx2(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B,
                                   float* __restrict C, int64_t ldc) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (ACCUM) {
    c00 = _mm256_loadu_ps(C), c01 = _mm256_loadu_ps(C + 8);
    c10 = _mm256_loadu_ps(C + ldc), c11 = _mm256_loadu_ps(C + ldc + 8);
    c20 = _mm256_loadu_ps(C + 2 * ldc), c21 = _mm256_loadu_ps(C + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(C + 3 * ldc), c31 = _mm256_loadu_ps(C + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(C + 4 * ldc), c41 = _mm256_loadu_ps(C + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(C + 5 * ldc), c51 = _mm256_loadu_ps(C + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
  const int64_t ar = A_TRANS ? 1 : lda;  // step between rows of A
  const int64_t ak = A_TRANS ? lda : 1;  // step between k of A
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * 16);
    const __m256 b1 = _mm256_loadu_ps(B + k * 16 + 8);
    const float* a = A + k * ak;
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + ar);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2 * ar);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3 * ar);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4 * ar);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5 * ar);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_storeu_ps(C, c00), _mm256_storeu_ps(C + 8, c01);
  _mm256_storeu_ps(C + ldc, c10), _mm256_storeu_ps(C + ldc + 8, c11);
  _mm256_storeu_ps(C + 2 * ldc, c20), _mm256_storeu_ps(C + 2 * ldc + 8, c21);
  _mm256_storeu_ps(C + 3 * ldc, c30), _mm256_storeu_ps(C + 3 * ldc + 8, c31);
  _mm256_storeu_ps(C + 4 * ldc, c40), _mm256_storeu_ps(C + 4 * ldc + 8, c41);
  _mm256_storeu_ps(C + 5 * ldc, c50), _mm256_storeu_ps(C + 5 * ldc + 8, c51);
}
#endif

// C[M x N] (+)= op(A)[M x K] * B[K x N], B panel-packed (see above), N a multiple of kNR<T>.
template <typename T, bool A_TRANS, bool ACCUM>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t panel_stride, T* C,
          int64_t ldc) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t j = 0; j < N; j += NR) {  // one B panel (K x NR) stays in L1 while A streams
    const T* b = B + (j / NR) * panel_stride;
    int64_t i = 0;
    for (; i + kMR <= M; i += kMR) {
      const T* a = A_TRANS ? A + i : A + i * lda;
#ifdef ATTNKERN_AVX2_MICROKERNEL
      if constexpr (std::is_same_v<T, float> && NR == 16) {
        micro_kernel_6x16_avx2<A_TRANS, ACCUM>(K, a, lda, b, C + i * ldc + j, ldc);
        continue;
      }
#endif
      micro_kernel<T, kMR, A_TRANS, ACCUM>(K, a, lda, b, C + i * ldc + j, ldc);
    }
    const T* a = A_TRANS ? A + i : A + i * lda;
    T* c = C + i * ldc + j;
    switch (M - i) {
      case 5: micro_kernel<T, 5, A_TRANS, ACCUM>(K, a, lda, b, c, ldc); break;
      case 4: micro_kernel<T, 4, A_TRANS, ACCUM>(K, a, lda, b, c, ldc); break;
      case 3: micro_kernel<T, 3, A_TRANS, ACCUM>(K, a, lda, b, c, ldc); break;
      case 2: micro_kernel<T, 2, A_TRANS, ACCUM>(K, a, lda, b, c, ldc); break;
      case 1: micro_kernel<T, 1, A_TRANS, ACCUM>(K, a, lda, b, c, ldc); break;
      default: break;
    }
  }
}

// Pack B(k, j) = src[k*stride_k + j*stride_j] * scale, k < K, j < N, into panels of NR columns with
// `panel_stride` between panels; columns [N, round_up(N, NR)) are zero.
template <typename scalar_t, typename acc_t>
void pack_panels(acc_t* dst, int64_t panel_stride, const scalar_t* src, int64_t stride_k, int64_t stride_j,
                 int64_t K, int64_t N, acc_t scale) {
  constexpr int64_t NR = kNR<acc_t>;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    acc_t* panel = dst + (j0 / NR) * panel_stride;
    const int64_t nj = std::min(NR, N - j0);
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* s = src + k * stride_k + j0 * stride_j;
      acc_t* d = panel + k * NR;
      for (int64_t j = 0; j < nj; ++j) d[j] = static_cast<acc_t>(s[j * stride_j]) * scale;
      for (int64_t j = nj; j < NR; ++j) d[j] = acc_t(0);
    }
  }
}

// sum_k a[k] * b[k] over n contiguous elements (lanes summed at the end).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(T(0));
  int64_t k = 0;
  for (; k + W <= n; k += W) acc = at::vec::fmadd(Vec<T>::loadu(a + k), Vec<T>::loadu(b + k), acc);
  T sum = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, acc);
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// y[c] += alpha * x[c] for n contiguous elements.
template <typename T>
inline void axpy(T* y, T alpha, const T* x, int64_t n) {
  at::vec::map2([alpha](Vec<T> yv, Vec<T> xv) { return at::vec::fmadd(Vec<T>(alpha), xv, yv); }, y, y, x, n);
}

// Scores, masks and row maxima stay in natural units (any finite float mask, finfo.min included, then
// adds without overflow); only differences from the row max enter base 2: exp(s - m) = 2^((s - m) log2 e).
// 2^x needs no Cody-Waite reduction, only x = n + f, |f| <= 1/2.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// 2^x over a vector. float on AVX2: Cephes' exp2f polynomial (relative error about 1.7e-7), exactly
// 0 below the float range (-inf included), NaN for NaN. Elsewhere: ATen's exp2. (Callers pass x <= 0
// or NaN: differences from a row max.)
template <typename T>
inline Vec<T> exp2_vec(const Vec<T>& x) {
#ifdef ATTNKERN_AVX2_MICROKERNEL
  if constexpr (std::is_same_v<T, float>) {
    const __m256 v = x;
    const __m256 underflow = _mm256_cmp_ps(v, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
    // The clamp keeps NaN: max/min_ps return their second operand when either is NaN, and the NaN then
    // flows through the polynomial into the result (the underflow compare is false for NaN).
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), v));
    const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(xc, n);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
#endif
  return x.exp2();
}

// max over row[0, n), n a multiple of the vector width.
template <typename T>
inline T row_max(const T* row, int64_t n) {
  Vec<T> m(-std::numeric_limits<T>::infinity());
  // Plain max (no NaN propagation, which costs a compare and a blend): a NaN score still reaches the
  // output through the exponential, which propagates it. (Only a row of nothing but NaN and -inf gets
  // -inf here: callers check that rare case with row_has_nan.)
  for (int64_t j = 0; j < n; j += Vec<T>::size()) m = at::vec::clamp_min(Vec<T>::loadu(row + j), m);
  T lanes[Vec<T>::size()];
  m.store(lanes);
  return *std::max_element(lanes, lanes + Vec<T>::size());
}

// Whether row[0, n) holds a NaN (the slow check, for rows whose max came out -inf).
template <typename T>
inline bool row_has_nan(const T* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(row[j])) return true;
  }
  return false;
}

// row[j] = exp(row[j] - shift) = 2^((row[j] - shift) log2 e) over [0, n), n a multiple of the vector
// width; returns the sum.
template <typename T>
inline T exp_shift_sum(T* row, int64_t n, T shift) {
  const Vec<T> s(shift), to_log2(static_cast<T>(kLog2e));
  Vec<T> sum(T(0));
  for (int64_t j = 0; j < n; j += Vec<T>::size()) {
    const Vec<T> e = exp2_vec<T>((Vec<T>::loadu(row + j) - s) * to_log2);
    e.store(row + j);
    sum = sum + e;
  }
  T lanes[Vec<T>::size()];
  sum.store(lanes);
  T total = 0;
  for (int i = 0; i < Vec<T>::size(); ++i) total += lanes[i];
  return total;
}


// dst[0, n) = value (vectorized fill).
template <typename T>
inline void fill(T* dst, int64_t n, T value) {
  std::fill(dst, dst + n, value);
}

// row[0, n) *= scale: scores are scaled after the dot, never Q or K before it, so that only a scaled
// score beyond float range can overflow (as in the Triton and CUDA kernels).
template <typename acc_t>
inline void scale_row(acc_t* row, int64_t n, acc_t scale) {
  at::vec::map([scale](Vec<acc_t> x) { return x * Vec<acc_t>(scale); }, row, row, n);
}

// Rows of a strided input tensor -> packed acc_t rows (optionally scaled); columns [n, ld) zeroed.
template <typename scalar_t, typename acc_t>
inline void pack_rows(acc_t* dst, int64_t ld, const scalar_t* src, int64_t row_stride, int64_t col_stride,
                      int64_t rows, int64_t cols, acc_t scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t* d = dst + r * ld;
    if (col_stride == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]) * scale;
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * col_stride]) * scale;
    }
    for (int64_t c = cols; c < ld; ++c) d[c] = acc_t(0);
  }
}

// Packed acc_t row -> strided output row.
template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, int64_t col_stride, const acc_t* src, int64_t cols, acc_t scale) {
  for (int64_t c = 0; c < cols; ++c) dst[c * col_stride] = static_cast<scalar_t>(src[c] * scale);
}

// Packed acc_t row -> strided output row, and its rounding residual src - acc_t(dst) (rounded to
// scalar_t) into a second strided row `lo` (see params.h: out_lo).
template <typename scalar_t, typename acc_t>
inline void store_row_split(scalar_t* dst, int64_t col_stride, scalar_t* lo, int64_t lo_stride, const acc_t* src,
                            int64_t cols, acc_t scale) {
  for (int64_t c = 0; c < cols; ++c) {
    const acc_t x = src[c] * scale;
    const scalar_t hi = static_cast<scalar_t>(x);
    dst[c * col_stride] = hi;
    lo[c * lo_stride] = static_cast<scalar_t>(x - static_cast<acc_t>(hi));
  }
}

// Add a float mask row / apply a bool mask row to scores row[0, n): stride 0 broadcasts one value.
template <typename mask_t, typename acc_t>
inline void apply_mask_row(acc_t* row, const mask_t* m, int64_t stride, int64_t n) {
  if constexpr (std::is_same_v<mask_t, uint8_t>) {
    if (stride == 0) {
      if (!m[0]) fill(row, n, neg_inf<acc_t>());
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      if (!m[j * stride]) row[j] = neg_inf<acc_t>();
    }
  } else {
    if (stride == 0) {
      const acc_t add = static_cast<acc_t>(m[0]);
      for (int64_t j = 0; j < n; ++j) row[j] += add;
      return;
    }
    if (stride == 1) {
      for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(m[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] += static_cast<acc_t>(m[j * stride]);
    }
  }
}

// The key tiles a block of query rows [m0, m0 + mb) visits, BN keys apart from n_begin (a multiple of
// BN, so that packed panels stay aligned) to n_end, and which of them need the band compare: those not
// inside [full_begin, full_end), the keys every row of the block sees.
struct KeyTiles {
  int64_t n_begin, n_end, full_begin, full_end;
  KeyTiles(const AttentionParams& p, int64_t m0, int64_t mb, int64_t BN)
      : n_begin(p.key_begin(m0) / BN * BN), n_end(p.key_end(m0 + mb)),
        full_begin(p.full_key_begin(m0 + mb)), full_end(p.full_key_end(m0)) {}
  bool band_check(const AttentionParams& p, int64_t n0, int64_t nb) const {
    return p.banded() && (n0 < full_begin || n0 + nb > full_end);
  }
};

// Masks known per row: the user mask (any kind/dtype, via params), the band (causal, window) and the key
// bound.
template <typename acc_t>
struct RowMasker {
  const AttentionParams& p;
  int64_t b, h;

  // Scores row for query `qi` and keys [n0, n0 + nb), padded with -inf up to `padded`.
  // `band_check`: whether this tile may cross an edge of the band (band_tile_check).
  inline void apply(acc_t* row, int64_t qi, int64_t n0, int64_t nb, int64_t padded, bool band_check) const {
    if (p.mask_kind != MaskKind::kNone) {
      const int64_t off = b * p.mask_st.b + h * p.mask_st.h + qi * p.mask_st.l + n0 * p.mask_st.e;
      if (p.mask_kind == MaskKind::kBool) {
        apply_mask_row(row, static_cast<const uint8_t*>(p.mask) + off, p.mask_st.e, nb);
      } else {
        switch (p.mask_elem) {
          case MaskElem::kFloat32:
            apply_mask_row(row, static_cast<const float*>(p.mask) + off, p.mask_st.e, nb);
            break;
          case MaskElem::kFloat64:
            apply_mask_row(row, static_cast<const double*>(p.mask) + off, p.mask_st.e, nb);
            break;
          case MaskElem::kBFloat16:
            apply_mask_row(row, static_cast<const c10::BFloat16*>(p.mask) + off, p.mask_st.e, nb);
            break;
          case MaskElem::kFloat16:
            apply_mask_row(row, static_cast<const c10::Half*>(p.mask) + off, p.mask_st.e, nb);
            break;
        }
      }
    }
    int64_t first, valid;
    band_columns(qi, n0, nb, band_check, &first, &valid);
    fill(row, first, neg_inf<acc_t>());
    fill(row + valid, padded - valid, neg_inf<acc_t>());
  }

  // The band's keys of the tile in row qi: columns [*first, *valid) of keys n0 .. n0 + nb.
  inline void band_columns(int64_t qi, int64_t n0, int64_t nb, bool band_check, int64_t* first,
                           int64_t* valid) const {
    *first = 0, *valid = nb;
    if (band_check) {  // key n0 + j visible iff qi + band_lo <= n0 + j <= qi + band_hi
      if (p.has_right) *valid = std::clamp<int64_t>(qi + p.band_hi - n0 + 1, 0, nb);
      if (p.has_left) *first = std::clamp<int64_t>(qi + p.band_lo - n0, 0, *valid);
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace attnkern
