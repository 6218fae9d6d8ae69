// Fused attention forward on the CPU: tiled, online softmax, never materializing L x S scores.
//
// Work is split into tasks (batch, kv head, query chunk). A task packs its kv head's K^T and V once
// (in acc_t, padded to the micro-kernel width), then for every query head of the group and every
// block of BLOCK_M query rows streams key blocks of BLOCK_N:
//     S = (Q K^T) scale          GEMM, in register tiles of 6 x 16; scaled after the dot (as the
//                                Triton and CUDA kernels do), so only a score beyond float range overflows
//     S = cap(S) + alibi         soft-capping and ALiBi (score_mods.h), only in the MODS kernels
//     S += mask; band (causal, window)/bounds -> -inf
//     online softmax, exp(s - m) as 2^((s - m) log2 e): m, l, rescale the output accumulator
//     P *= dropout multipliers   (MODS kernels: regenerated from the Philox key, l keeps the undropped sum)
//     O += P V                   GEMM
// Problems with very few query rows per kv head (decode-like: L * group <= kDirectRows) in float or
// double with contiguous head dims skip the packing: it would cost more than their arithmetic (one
// extra pass over K and V), so scores are dot products over K's rows and O += p v reads V's rows in
// place. The choice depends on the problem alone (never on the thread count), so results stay bitwise
// reproducible.
// Tasks are handed out dynamically (an atomic counter), so banded problems balance across threads.
// With p.out_lo the output's rounding residual is written beside it (for the backward's delta).
// Extra memory per thread: K^T and V of one kv head (O(S*E)) plus O(BLOCK_M * (BLOCK_N + Ev)) tiles.
#include <ATen/Parallel.h>

#include <atomic>

#include "attention_cpu.h"
#include "score_mods.h"
#include "tile_math.h"

namespace attnkern {
namespace cpu {

namespace {

constexpr int64_t kDirectRows = 8;

// x itself where the input is already in acc_t (the direct path's only case), else nothing.
template <typename acc_t, typename scalar_t>
inline const acc_t* in_place(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) return x;
  return nullptr;
}

// MODS: whether soft-capping, ALiBi or dropout are compiled in (the plain kernel has none of their per-score
// code; it only builds the unused per-slice RowMods).
template <typename scalar_t, bool MODS>
void forward_kernel(const AttentionParams& p, const Blocking& blk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t NR = kNR<acc_t>;
  const int64_t BM = blk.block_m, BN = blk.block_n;
  const int64_t Ep = round_up(p.E, 1), Evp = round_up(p.Ev, NR), BNp = round_up(BN, NR);
  const int64_t n_chunks = blk.query_chunks;
  // Whole blocks per chunk: only the last block of the last chunk can be short.
  const int64_t chunk_rows = round_up((p.L + n_chunks - 1) / n_chunks, BM);
  const int64_t n_tasks = p.B * p.Hkv * n_chunks;
  const acc_t scale = static_cast<acc_t>(p.scale);
  // K and V read in place (no packing): see the top of the file.
  const bool direct = std::is_same_v<scalar_t, acc_t> && p.L * p.group <= kDirectRows && p.k_st.e == 1 &&
                      p.v_st.e == 1;

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* out_lo = static_cast<scalar_t*>(p.out_lo);
  auto* lse = static_cast<acc_t*>(p.lse);
  auto* stats = static_cast<acc_t*>(p.stats);

  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch<acc_t> kt_buf, v_buf, q_buf, s_buf, o_buf, stat_buf, z_buf;
    int64_t packed_b = -1, packed_hk = -1, packed_base = 0, packed_keys = 0, packed_sp = 0;
    acc_t *kt = nullptr, *vp = nullptr;
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const int64_t chunk = task_chunk(p, task, n_chunks);
      const int64_t hk = (task / n_chunks) % p.Hkv;
      const int64_t b = task / (n_chunks * p.Hkv);
      const int64_t r0 = chunk * chunk_rows, r1 = std::min(p.L, r0 + chunk_rows);
      if (r0 >= r1) continue;
      // Keys any row of this chunk can see: [base, keys), base the band's first tile (a multiple of BN).
      const int64_t base = p.key_begin(r0) / BN * BN, keys = p.key_end(r1);
      const int64_t Sp = round_up(std::max<int64_t>(keys - base, 1), NR);

      const scalar_t* k_head = k + b * p.k_st.b + hk * p.k_st.h;  // (direct) this kv head's keys, in place
      const scalar_t* v_head = v + b * p.v_st.b + hk * p.v_st.h;
      if (!direct && (b != packed_b || hk != packed_hk || base < packed_base || keys > packed_keys)) {
        // K^T in panels of NR keys (K-dim E) and V in panels of NR columns (K-dim keys).
        packed_sp = Sp;
        kt = kt_buf.get(p.E * Sp);
        vp = v_buf.get(Sp * Evp);
        const scalar_t* kb = k + b * p.k_st.b + hk * p.k_st.h + base * p.k_st.l;
        const scalar_t* vb = v + b * p.v_st.b + hk * p.v_st.h + base * p.v_st.l;
        const int64_t n = std::max<int64_t>(keys - base, 0);
        pack_panels(kt, p.E * NR, kb, p.k_st.e, p.k_st.l, p.E, n, acc_t(1));
        pack_panels(vp, packed_sp * NR, vb, p.v_st.l, p.v_st.e, n, p.Ev, acc_t(1));
        packed_b = b, packed_hk = hk, packed_base = base, packed_keys = keys;
      }

      acc_t* qb = q_buf.get(BM * Ep);
      acc_t* sb = s_buf.get(BM * BNp);
      acc_t* ob = o_buf.get(BM * Evp);
      acc_t* m_i = stat_buf.get(2 * BM);
      acc_t* l_i = m_i + BM;
      acc_t* zb = MODS ? z_buf.get(dropout_width(BNp)) : nullptr;  // one row's dropout multipliers

      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t h = hk * p.group + g;
        const RowMasker<acc_t> masker{p, b, h};
        const RowMods<acc_t> mods(p, b, h);
        for (int64_t m0 = r0; m0 < r1; m0 += BM) {
          const int64_t mb = std::min(BM, r1 - m0);
          pack_rows(qb, Ep, q + b * p.q_st.b + h * p.q_st.h + m0 * p.q_st.l, p.q_st.l, p.q_st.e, mb, p.E, acc_t(1));
          fill(m_i, mb, neg_inf<acc_t>());
          fill(l_i, mb, acc_t(0));
          fill(ob, mb * Evp, acc_t(0));

          const KeyTiles tiles(p, m0, mb, BN);  // keys visible to some / to every row of the block
          for (int64_t n0 = tiles.n_begin; n0 < tiles.n_end; n0 += BN) {
            const int64_t nb = std::min(BN, tiles.n_end - n0);
            const int64_t nbp = round_up(nb, NR);
            if (direct) {
              for (int64_t i = 0; i < mb; ++i) {
                acc_t* row = sb + i * BNp;
                for (int64_t j = 0; j < nb; ++j)
                  row[j] = dot(qb + i * Ep, in_place<acc_t>(k_head + (n0 + j) * p.k_st.l), p.E);
                fill(row + nb, nbp - nb, acc_t(0));  // as the packed panels' zero columns
              }
            } else {
              gemm<acc_t, false, false>(mb, nbp, p.E, qb, Ep, kt + ((n0 - packed_base) / NR) * p.E * NR, p.E * NR,
                                        sb, BNp);
            }
            const bool band_check = tiles.band_check(p, n0, nb);
            for (int64_t i = 0; i < mb; ++i) {
              acc_t* row = sb + i * BNp;
              scale_row(row, nbp, scale);
              if constexpr (MODS) mods.scores(row, nullptr, m0 + i, n0, nbp);
              masker.apply(row, m0 + i, n0, nb, nbp, band_check);
              // std::max keeps a NaN m_i (its first argument): once NaN, a row stays NaN.
              acc_t m_new = std::max(m_i[i], cpu::row_max(row, nbp));
              if (m_new == neg_inf<acc_t>()) {
                if (!row_has_nan(row, nbp)) {  // nothing visible yet in this row
                  fill(row, nbp, acc_t(0));
                  continue;
                }
                m_new = std::numeric_limits<acc_t>::quiet_NaN();  // scores of NaN only: the row is NaN
              }
              const acc_t alpha = std::exp(m_i[i] - m_new);  // 0 when m_i was -inf
              l_i[i] = l_i[i] * alpha + exp_shift_sum(row, nbp, m_new);
              m_i[i] = m_new;
              if constexpr (MODS) {
                if (mods.dropout_on) {  // after the sum: the softmax statistics are those without dropout
                  int64_t lo, hi;  // outside the band's keys the probabilities are 0 (or a NaN row's NaN)
                  masker.band_columns(m0 + i, n0, nb, band_check, &lo, &hi);
                  mods.apply_dropout(row, zb, m0 + i, n0, nbp, lo, hi);
                }
              }
              if (alpha != acc_t(1)) {
                acc_t* orow = ob + i * Evp;
                at::vec::map([alpha](Vec<acc_t> x) { return x * Vec<acc_t>(alpha); }, orow, orow, Evp);
              }
            }
            if (direct) {
              for (int64_t i = 0; i < mb; ++i)
                for (int64_t j = 0; j < nb; ++j)
                  axpy(ob + i * Evp, sb[i * BNp + j], in_place<acc_t>(v_head + (n0 + j) * p.v_st.l),
                       p.Ev);
            } else {
              gemm<acc_t, false, true>(mb, Evp, nb, sb, BNp, vp + (n0 - packed_base) * NR, packed_sp * NR, ob, Evp);
            }
          }

          scalar_t* o_rows = out + b * p.out_st.b + h * p.out_st.h + m0 * p.out_st.l;
          acc_t* lse_rows = lse + (b * p.Hq + h) * p.L + m0;
          acc_t* stat_rows = stats + ((b * p.Hq + h) * p.L + m0) * 2;
          for (int64_t i = 0; i < mb; ++i) {
            const bool empty = l_i[i] == acc_t(0);  // every key masked: output 0, lse -inf
            const acc_t inv = empty ? acc_t(0) : acc_t(1) / l_i[i];
            if (out_lo) {
              scalar_t* lo_row = out_lo + b * p.out_lo_st.b + h * p.out_lo_st.h + (m0 + i) * p.out_lo_st.l;
              store_row_split(o_rows + i * p.out_st.l, p.out_st.e, lo_row, p.out_lo_st.e, ob + i * Evp, p.Ev, inv);
            } else {
              store_row(o_rows + i * p.out_st.l, p.out_st.e, ob + i * Evp, p.Ev, inv);
            }
            const acc_t log2l = empty ? neg_inf<acc_t>() : std::log2(l_i[i]);
            stat_rows[2 * i] = empty ? neg_inf<acc_t>() : m_i[i];
            stat_rows[2 * i + 1] = log2l;
            lse_rows[i] = empty ? neg_inf<acc_t>() : m_i[i] + log2l * acc_t(kLn2);
          }
        }
      }
    }
  });
}

}  // namespace

void attention_forward(const AttentionParams& p, c10::ScalarType dtype) {
  const Blocking blk = choose_blocking(p, dtype, /*backward=*/false);
  const bool mods = p.has_mods();
  switch (dtype) {
    case c10::ScalarType::Float: mods ? forward_kernel<float, true>(p, blk) : forward_kernel<float, false>(p, blk); break;
    case c10::ScalarType::Double:
      mods ? forward_kernel<double, true>(p, blk) : forward_kernel<double, false>(p, blk);
      break;
    case c10::ScalarType::BFloat16:
      mods ? forward_kernel<c10::BFloat16, true>(p, blk) : forward_kernel<c10::BFloat16, false>(p, blk);
      break;
    case c10::ScalarType::Half:
      mods ? forward_kernel<c10::Half, true>(p, blk) : forward_kernel<c10::Half, false>(p, blk);
      break;
    default: TORCH_CHECK(false, "attnkern cpu forward: unsupported dtype ", dtype);
  }
}

}  // namespace cpu
}  // namespace attnkern
