// Fused attention backward on the CPU: recomputes P from the saved log-sum-exp, five GEMMs per tile.
//
// Tasks are (batch, kv head, query chunk), as in the forward. A task packs its kv head's K^T, V^T and
// K once, then for every query head of the group and every block of query rows:
//     S  = (Q K^T) scale,  P = exp(S + mask - m) / l          (m, l: the forward's per-row statistics;
//                                                              0 where masked and on fully masked rows)
//     dP = dO V^T,  dS = P (dP - delta),  delta = rowsum(dO O) - dlse  (O = out + out_lo, see params.h)
//     dV += P^T dO,  dK += dS^T Q,  dQ += dS K;  dK, dQ times scale when written
// With score mods (the MODS kernels, score_mods.h; attnkern/reference.py's backward): S = cap(S scale) +
// alibi + mask with T = tanh(S scale / c); the dropout multipliers Z regenerated from the Philox key turn
// dP into (dO V^T) Z and P into P Z for dV; dK and dQ take dS (1 - T^2), the float mask's gradient dS.
// S is the forward's, bit for bit (same packing, GEMM and scaling after the dot); applying the scale
// after the products, never to Q or K, means only a result beyond float range can overflow.
// dK/dV accumulate in per-task buffers (O(S*E)); when a kv head's rows are split over several tasks
// their partial sums are added afterwards in chunk order, and the split depends on the problem and the
// machine alone (choose_blocking), so results depend neither on scheduling nor on the thread count.
// A float mask's gradient (dS summed over the mask's broadcast dims) is a separate pass whose tasks
// each own disjoint entries of the gradient: deterministic, no atomics.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "attention_cpu.h"
#include "score_mods.h"
#include "tile_math.h"

namespace attnkern {
namespace cpu {

namespace {

// One (batch, kv head)'s K and V, panel-packed for the GEMMs (see tile_math.h); repacked only when the
// (batch, kv head) changes or more keys are needed:
//   kt  K^T    panels of NR keys, K-dim E       (B of S  = Q K^T)
//   vt  V^T    panels of NR keys, K-dim Ev      (B of dP = dO V^T)
//   kr  K      panels of NR head-dim columns, K-dim keys (B of dQ = dS K)
template <typename scalar_t, typename acc_t>
struct PackedKV {
  Scratch<acc_t> kt_buf, vt_buf, kr_buf;
  acc_t *kt = nullptr, *vt = nullptr, *kr = nullptr;
  int64_t b = -1, hk = -1, base = 0, keys = -1, sp = 0;

  // Keys [base_, keys_) of kv head hk_ of batch b_ (base_ a multiple of NR: a band's first tile), unless
  // what is packed already covers them.
  void pack(const AttentionParams& p, int64_t b_, int64_t hk_, int64_t base_, int64_t keys_, int64_t Ep) {
    if (b_ == b && hk_ == hk && base_ >= base && keys_ <= keys) return;
    constexpr int64_t NR = kNR<acc_t>;
    b = b_, hk = hk_, base = base_, keys = keys_;
    const int64_t n = std::max<int64_t>(keys - base, 0);
    sp = round_up(std::max<int64_t>(n, 1), NR);
    kt = kt_buf.get(p.E * sp);
    vt = vt_buf.get(p.Ev * sp);
    kr = kr_buf.get(sp * Ep);
    const auto* kb = static_cast<const scalar_t*>(p.k) + b * p.k_st.b + hk * p.k_st.h + base * p.k_st.l;
    const auto* vb = static_cast<const scalar_t*>(p.v) + b * p.v_st.b + hk * p.v_st.h + base * p.v_st.l;
    pack_panels(kt, p.E * NR, kb, p.k_st.e, p.k_st.l, p.E, n, acc_t(1));
    pack_panels(vt, p.Ev * NR, vb, p.v_st.e, p.v_st.l, p.Ev, n, acc_t(1));
    pack_panels(kr, sp * NR, kb, p.k_st.l, p.k_st.e, n, p.E, acc_t(1));
  }
  // The packed panels from key n0 on (n0 >= base, n0 - base a multiple of NR).
  const acc_t* kt_block(int64_t n0, const AttentionParams& p) const {
    return kt + ((n0 - base) / kNR<acc_t>) * p.E * kNR<acc_t>;
  }
  const acc_t* vt_block(int64_t n0, const AttentionParams& p) const {
    return vt + ((n0 - base) / kNR<acc_t>) * p.Ev * kNR<acc_t>;
  }
  const acc_t* kr_rows(int64_t n0) const { return kr + (n0 - base) * kNR<acc_t>; }
};

// One block of query rows, packed: Q and dO row-major (the A of S and dP) and in panels (the B of
// dK and dV), and per row delta and the forward's softmax statistics: the row max (+inf for fully masked
// rows, so that P = exp(-inf - inf) = 0 rather than NaN) and log2 of the denominator (0 there).
template <typename scalar_t, typename acc_t>
struct QueryBlock {
  Scratch<acc_t> q_buf, do_buf, qp_buf, dop_buf, stat_buf;
  acc_t *qb = nullptr, *dob = nullptr, *qp = nullptr, *dop = nullptr, *delta = nullptr;
  acc_t *row_max = nullptr, *log2_denom = nullptr;

  void load(const AttentionParams& p, int64_t b, int64_t h, int64_t m0, int64_t mb, int64_t BM, int64_t Ep,
            int64_t Evp) {
    constexpr int64_t NR = kNR<acc_t>;
    qb = q_buf.get(BM * Ep);
    dob = do_buf.get(BM * Evp);
    qp = qp_buf.get(BM * Ep);
    dop = dop_buf.get(BM * Evp);
    delta = stat_buf.get(3 * BM);
    row_max = delta + BM;
    log2_denom = row_max + BM;
    const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_st.b + h * p.q_st.h + m0 * p.q_st.l;
    const auto* dout = static_cast<const scalar_t*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + m0 * p.dout_st.l;
    const auto* out = static_cast<const scalar_t*>(p.out) + b * p.out_st.b + h * p.out_st.h + m0 * p.out_st.l;
    const auto* out_lo = p.out_lo ? static_cast<const scalar_t*>(p.out_lo) + b * p.out_lo_st.b + h * p.out_lo_st.h +
                                        m0 * p.out_lo_st.l
                                  : nullptr;
    pack_rows(qb, Ep, q, p.q_st.l, p.q_st.e, mb, p.E, acc_t(1));
    pack_rows(dob, Evp, dout, p.dout_st.l, p.dout_st.e, mb, p.Ev, acc_t(1));
    pack_panels(qp, BM * NR, q, p.q_st.l, p.q_st.e, mb, p.E, acc_t(1));
    pack_panels(dop, BM * NR, dob, Evp, int64_t(1), mb, p.Ev, acc_t(1));
    const acc_t* stats = static_cast<const acc_t*>(p.stats) + ((b * p.Hq + h) * p.L + m0) * 2;
    for (int64_t i = 0; i < mb; ++i) {
      acc_t d = 0;
      const scalar_t* orow = out + i * p.out_st.l;
      if (out_lo) {  // O = out + out_lo: delta to float32 accuracy for half outputs
        const scalar_t* lrow = out_lo + i * p.out_lo_st.l;
        for (int64_t e = 0; e < p.Ev; ++e) {
          d += dob[i * Evp + e] *
               (static_cast<acc_t>(orow[e * p.out_st.e]) + static_cast<acc_t>(lrow[e * p.out_lo_st.e]));
        }
      } else {
        for (int64_t e = 0; e < p.Ev; ++e) d += dob[i * Evp + e] * static_cast<acc_t>(orow[e * p.out_st.e]);
      }
      const bool empty = stats[2 * i] == neg_inf<acc_t>();
      if (p.dlse && !empty) {  // a fully masked row's lse is constant: its dlse (maybe inf/NaN) has no effect
        const auto* dl = static_cast<const acc_t*>(p.dlse);
        d -= dl[b * p.dlse_st.b + h * p.dlse_st.h + (m0 + i) * p.dlse_st.l];
      }
      delta[i] = d;
      row_max[i] = empty ? std::numeric_limits<acc_t>::infinity() : stats[2 * i];
      log2_denom[i] = empty ? acc_t(0) : stats[2 * i + 1];
    }
  }
};

// The per-row values probabilities_and_ds reads.
template <typename acc_t>
struct RowStats {
  const acc_t *row_max, *log2_denom, *delta;
};

// The score mods of one (batch, head) slice and one row of scratch for them: t = tanh of the scaled
// scores (softcap), z = dropout multipliers (dropout_width(BNp) values). `mask_grad`: the tile serves
// the float mask's gradient, which wants P itself and dS before the softcap's factor.
template <typename acc_t>
struct TileMods {
  const RowMods<acc_t>& mods;
  acc_t *t, *z;
  bool mask_grad;
};

// P = 2^((S scale + masks - m) log2 e - log2 l) over a (mb x nbp) tile of unscaled S, then
// dS = P (dP - delta) into dp. Subtracting the row max first keeps P exact when the scores are huge.
// MODS: with the score mods of tm (see the file comment): sb gets P Z, dp gets dS (1 - T^2), unless
// tm.mask_grad (then P and dS).
template <typename acc_t, bool MODS>
inline void probabilities_and_ds(const RowMasker<acc_t>& masker, const TileMods<acc_t>& tm, acc_t* sb, acc_t* dp,
                                 int64_t ld, int64_t m0, int64_t mb, int64_t n0, int64_t nb, int64_t nbp,
                                 bool band_check, const RowStats<acc_t>& st, acc_t scale) {
  for (int64_t i = 0; i < mb; ++i) {
    acc_t* srow = sb + i * ld;
    acc_t* drow = dp + i * ld;
    scale_row(srow, nbp, scale);
    if constexpr (MODS) tm.mods.scores(srow, tm.mods.softcap_on ? tm.t : nullptr, m0 + i, n0, nbp);
    masker.apply(srow, m0 + i, n0, nb, nbp, band_check);
    const Vec<acc_t> m(st.row_max[i]), l(st.log2_denom[i]), d(st.delta[i]), to_log2(static_cast<acc_t>(kLog2e));
    if constexpr (MODS) {
      const bool drop = tm.mods.dropout_on, drop_p = drop && !tm.mask_grad;
      const bool cap_grad = tm.mods.softcap_on && !tm.mask_grad;
      if (drop) {  // outside the band's keys P = 0: any finite multiplier gives the same dS and P Z
        int64_t lo, hi;
        masker.band_columns(m0 + i, n0, nb, band_check, &lo, &hi);
        tm.mods.multipliers(tm.z, m0 + i, n0, nbp, lo, hi);
      }
      const Vec<acc_t> one(acc_t(1));
      for (int64_t j = 0; j < nbp; j += Vec<acc_t>::size()) {
        Vec<acc_t> pv = exp2_vec<acc_t>((Vec<acc_t>::loadu(srow + j) - m) * to_log2 - l);
        Vec<acc_t> dpv = Vec<acc_t>::loadu(drow + j);
        if (drop) dpv = dpv * Vec<acc_t>::loadu(tm.z + j);
        Vec<acc_t> ds = pv * (dpv - d);
        if (cap_grad) {
          const Vec<acc_t> t = Vec<acc_t>::loadu(tm.t + j);
          ds = ds * (one - t * t);
        }
        if (drop_p) pv = pv * Vec<acc_t>::loadu(tm.z + j);
        pv.store(srow + j);
        ds.store(drow + j);
      }
      continue;
    }
    for (int64_t j = 0; j < nbp; j += Vec<acc_t>::size()) {
      const Vec<acc_t> pv = exp2_vec<acc_t>((Vec<acc_t>::loadu(srow + j) - m) * to_log2 - l);
      pv.store(srow + j);
      (pv * (Vec<acc_t>::loadu(drow + j) - d)).store(drow + j);
    }
  }
}

// One (query block, key tile) step shared by both passes: S = Q K^T into sb and dP = dO V^T into dpb,
// then P (in sb) and dS (in dpb) by probabilities_and_ds. Ep, Evp: the packed query block's row widths.
template <typename scalar_t, typename acc_t, bool MODS>
inline void tile_p_and_ds(const AttentionParams& p, const RowMasker<acc_t>& masker, const TileMods<acc_t>& tm,
                          const QueryBlock<scalar_t, acc_t>& qblk, const PackedKV<scalar_t, acc_t>& kv, int64_t m0,
                          int64_t mb, int64_t n0, int64_t nb, const KeyTiles& tiles, int64_t Ep, int64_t Evp, acc_t* sb,
                          acc_t* dpb, int64_t BNp) {
  constexpr int64_t NR = kNR<acc_t>;
  const int64_t nbp = round_up(nb, NR);
  gemm<acc_t, false, false>(mb, nbp, p.E, qblk.qb, Ep, kv.kt_block(n0, p), p.E * NR, sb, BNp);
  gemm<acc_t, false, false>(mb, nbp, p.Ev, qblk.dob, Evp, kv.vt_block(n0, p), p.Ev * NR, dpb, BNp);
  probabilities_and_ds<acc_t, MODS>(masker, tm, sb, dpb, BNp, m0, mb, n0, nb, nbp, tiles.band_check(p, n0, nb),
                       {qblk.row_max, qblk.log2_denom, qblk.delta}, static_cast<acc_t>(p.scale));
}

// MODS: whether soft-capping, ALiBi or dropout are compiled in (the plain kernel has none of their per-score
// code; it only builds the unused per-slice RowMods).
template <typename scalar_t, bool MODS>
void backward_kernel(const AttentionParams& p, const Blocking& blk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t NR = kNR<acc_t>;
  const int64_t BM = blk.block_m, BN = blk.block_n;
  const int64_t Ep = round_up(p.E, NR), Evp = round_up(p.Ev, NR), BNp = round_up(BN, NR);
  const int64_t n_chunks = blk.query_chunks;
  const int64_t chunk_rows = round_up((p.L + n_chunks - 1) / n_chunks, BM);
  const int64_t n_tasks = p.B * p.Hkv * n_chunks;
  const acc_t scale = static_cast<acc_t>(p.scale);

  // With several chunks per kv head, each chunk's dK/dV go to its own slot, summed afterwards. The
  // slots are zeroed by their tasks, in parallel (and first touched by the thread that uses them).
  std::unique_ptr<acc_t[]> partial;
  const int64_t slot = p.S * (Ep + Evp);
  if (n_chunks > 1) partial.reset(new acc_t[static_cast<size_t>(n_tasks * slot)]);

  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);

  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    PackedKV<scalar_t, acc_t> kv;
    QueryBlock<scalar_t, acc_t> qblk;
    Scratch<acc_t> s_buf, dp_buf, dq_buf, acc_buf, mod_buf;
    acc_t* mod_rows = MODS ? mod_buf.get(BNp + dropout_width(BNp)) : nullptr;
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const int64_t chunk = task_chunk(p, task, n_chunks);
      const int64_t hk = (task / n_chunks) % p.Hkv;
      const int64_t b = task / (n_chunks * p.Hkv);
      const int64_t r0 = std::min(p.L, chunk * chunk_rows), r1 = std::min(p.L, r0 + chunk_rows);
      const int64_t keys = p.key_end(r1);

      acc_t* dk_acc = n_chunks > 1 ? partial.get() + ((b * p.Hkv + hk) * n_chunks + chunk) * slot
                                   : acc_buf.get(std::max<int64_t>(slot, 1));
      acc_t* dv_acc = dk_acc + p.S * Ep;
      fill(dk_acc, slot, acc_t(0));
      if (r0 < r1) {  // rows that see no key still get their dQ written (as zeros)
        kv.pack(p, b, hk, p.key_begin(r0) / BN * BN, keys, Ep);
        acc_t* sb = s_buf.get(BM * BNp);
        acc_t* dpb = dp_buf.get(BM * BNp);
        acc_t* dqb = dq_buf.get(BM * Ep);
        for (int64_t g = 0; g < p.group; ++g) {
          const int64_t h = hk * p.group + g;
          const RowMasker<acc_t> masker{p, b, h};
          const RowMods<acc_t> mods(p, b, h);
          const TileMods<acc_t> tm{mods, mod_rows, MODS ? mod_rows + BNp : nullptr, /*mask_grad=*/false};
          for (int64_t m0 = r0; m0 < r1; m0 += BM) {
            const int64_t mb = std::min(BM, r1 - m0);
            qblk.load(p, b, h, m0, mb, BM, Ep, Evp);
            fill(dqb, mb * Ep, acc_t(0));
            const KeyTiles tiles(p, m0, mb, BN);
            for (int64_t n0 = tiles.n_begin; n0 < tiles.n_end; n0 += BN) {
              const int64_t nb = std::min(BN, tiles.n_end - n0);
              tile_p_and_ds<scalar_t, acc_t, MODS>(p, masker, tm, qblk, kv, m0, mb, n0, nb, tiles, Ep, Evp, sb, dpb,
                                                   BNp);
              gemm<acc_t, true, true>(nb, Evp, mb, sb, BNp, qblk.dop, BM * NR, dv_acc + n0 * Evp, Evp);
              gemm<acc_t, true, true>(nb, Ep, mb, dpb, BNp, qblk.qp, BM * NR, dk_acc + n0 * Ep, Ep);
              gemm<acc_t, false, true>(mb, Ep, nb, dpb, BNp, kv.kr_rows(n0), kv.sp * NR, dqb, Ep);
            }
            scalar_t* dq_rows = dq + b * p.dq_st.b + h * p.dq_st.h + m0 * p.dq_st.l;
            for (int64_t i = 0; i < mb; ++i) store_row(dq_rows + i * p.dq_st.l, p.dq_st.e, dqb + i * Ep, p.E, scale);
          }
        }
      }
      if (n_chunks == 1) {  // this task saw every query row of its kv head: write dK, dV
        for (int64_t s = 0; s < p.S; ++s) {
          store_row(dk + b * p.dk_st.b + hk * p.dk_st.h + s * p.dk_st.l, p.dk_st.e, dk_acc + s * Ep, p.E, scale);
          store_row(dv + b * p.dv_st.b + hk * p.dv_st.h + s * p.dv_st.l, p.dv_st.e, dv_acc + s * Evp, p.Ev, acc_t(1));
        }
      }
    }
  });

  if (n_chunks > 1) {  // sum the chunks' partial dK/dV in chunk order
    at::parallel_for(0, p.B * p.Hkv * p.S, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(static_cast<size_t>(Ep + Evp));
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t s = idx % p.S, bh = idx / p.S, hk = bh % p.Hkv, b = bh / p.Hkv;
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t c = 0; c < n_chunks; ++c) {
          const acc_t* src = partial.get() + (bh * n_chunks + c) * slot;
          for (int64_t e = 0; e < Ep; ++e) row[e] += src[s * Ep + e];
          for (int64_t e = 0; e < Evp; ++e) row[Ep + e] += src[p.S * Ep + s * Evp + e];
        }
        store_row(dk + b * p.dk_st.b + hk * p.dk_st.h + s * p.dk_st.l, p.dk_st.e, row.data(), p.E, scale);
        store_row(dv + b * p.dv_st.b + hk * p.dv_st.h + s * p.dv_st.l, p.dv_st.e, row.data() + Ep, p.Ev, acc_t(1));
      }
    });
  }
}

// dMask (Bm, Hm, Lm, Sm) = dS summed over the dims the mask broadcasts over. A task owns one
// (bm, hm) and, when the mask has full rows, one block of them: it loops over every (b, h) that
// reads those entries and writes only its own entries.
template <typename scalar_t, bool MODS>
void mask_grad_kernel(const AttentionParams& p, const Blocking& blk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t NR = kNR<acc_t>;
  const int64_t BM = blk.block_m, BN = blk.block_n;
  const int64_t Ep = round_up(p.E, NR), Evp = round_up(p.Ev, NR), BNp = round_up(BN, NR);
  const bool rows_full = p.Lm == p.L && p.L > 1, cols_full = p.Sm == p.S && p.S > 1;
  const int64_t row_blocks = rows_full ? (p.L + BM - 1) / BM : 1;
  const int64_t n_tasks = p.Bm * p.Hm * row_blocks;
  auto* dmask = static_cast<acc_t*>(p.dmask);

  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    PackedKV<scalar_t, acc_t> kv;
    QueryBlock<scalar_t, acc_t> qblk;
    Scratch<acc_t> s_buf, dp_buf, ab_buf, mod_buf;
    acc_t* mod_rows = MODS ? mod_buf.get(BNp + dropout_width(BNp)) : nullptr;
    acc_t* sb = s_buf.get(BM * BNp);
    acc_t* dpb = dp_buf.get(BM * BNp);
    acc_t* row_a = ab_buf.get(2 * BM);  // per row Σ_j P dP and Σ_j P (masks reduced over keys)
    acc_t* row_b = row_a + BM;
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const int64_t rb = task % row_blocks, hm = (task / row_blocks) % p.Hm, bm = task / (row_blocks * p.Hm);
      const int64_t r0 = rows_full ? rb * BM : 0, r1 = rows_full ? std::min(p.L, r0 + BM) : p.L;
      acc_t* dm = dmask + (bm * p.Hm + hm) * p.Lm * p.Sm;  // this (bm, hm)'s (Lm, Sm) slice
      if (rows_full) {
        fill(dm + r0 * p.Sm, (r1 - r0) * p.Sm, acc_t(0));
      } else {
        fill(dm, p.Lm * p.Sm, acc_t(0));
      }
      for (int64_t b = (p.Bm == 1 ? 0 : bm); b < (p.Bm == 1 ? p.B : bm + 1); ++b) {
        for (int64_t h = (p.Hm == 1 ? 0 : hm); h < (p.Hm == 1 ? p.Hq : hm + 1); ++h) {
          const int64_t hk = h / p.group;
          const RowMasker<acc_t> masker{p, b, h};
          const RowMods<acc_t> mods(p, b, h);
          const TileMods<acc_t> tm{mods, mod_rows, MODS ? mod_rows + BNp : nullptr, /*mask_grad=*/true};
          const int64_t keys = p.key_end(r1);
          if (keys == 0) continue;
          kv.pack(p, b, hk, p.key_begin(r0) / BN * BN, keys, Ep);
          for (int64_t m0 = r0; m0 < r1; m0 += BM) {
            const int64_t mb = std::min(BM, r1 - m0);
            qblk.load(p, b, h, m0, mb, BM, Ep, Evp);
            if (!cols_full) {
              // Summed over keys, Σ_j P (dP - delta) = A (1 - B) + dlse B with A = Σ_j P dP, B = Σ_j P:
              // the same value without the cancellation of delta (rounded from O) against A. With
              // delta = 0 the tile step leaves P dP in dpb.
              fill(qblk.delta, mb, acc_t(0));
              fill(row_a, mb, acc_t(0));
              fill(row_b, mb, acc_t(0));
            }
            const KeyTiles tiles(p, m0, mb, BN);
            for (int64_t n0 = tiles.n_begin; n0 < tiles.n_end; n0 += BN) {
              const int64_t nb = std::min(BN, tiles.n_end - n0);
              tile_p_and_ds<scalar_t, acc_t, MODS>(p, masker, tm, qblk, kv, m0, mb, n0, nb, tiles, Ep, Evp, sb, dpb,
                                                   BNp);
              for (int64_t i = 0; i < mb; ++i) {
                const acc_t* ds = dpb + i * BNp;
                if (cols_full) {
                  acc_t* dm_row = dm + (rows_full ? (m0 + i) * p.Sm : 0);
                  for (int64_t j = 0; j < nb; ++j) dm_row[n0 + j] += ds[j];
                } else {
                  const acc_t* pr = sb + i * BNp;
                  acc_t a = 0, bsum = 0;
                  for (int64_t j = 0; j < nb; ++j) a += ds[j], bsum += pr[j];
                  row_a[i] += a;
                  row_b[i] += bsum;
                }
              }
            }
            if (!cols_full) {
              const auto* dl = static_cast<const acc_t*>(p.dlse);
              for (int64_t i = 0; i < mb; ++i) {
                acc_t v = row_a[i] * (acc_t(1) - row_b[i]);
                // A row that sees no key (B = 0) gives 0, whatever its dlse.
                if (dl && row_b[i] != acc_t(0)) v += dl[b * p.dlse_st.b + h * p.dlse_st.h + (m0 + i) * p.dlse_st.l] * row_b[i];
                dm[rows_full ? (m0 + i) * p.Sm : 0] += v;
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, bool MODS>
void run_backward(const AttentionParams& p, const Blocking& blk) {
  backward_kernel<scalar_t, MODS>(p, blk);
  if (p.dmask) mask_grad_kernel<scalar_t, MODS>(p, blk);
}

template <typename scalar_t>
void run_backward(const AttentionParams& p, const Blocking& blk) {
  p.has_mods() ? run_backward<scalar_t, true>(p, blk) : run_backward<scalar_t, false>(p, blk);
}

}  // namespace

Blocking choose_blocking(const AttentionParams& p, c10::ScalarType dtype, bool backward) {
  Blocking blk;
  // Rows in multiples of the micro-kernel's 6; keys in multiples of its 16 columns.
  blk.block_m = dtype == c10::ScalarType::Double ? 30 : (backward ? 60 : 72);
  blk.block_n = backward ? 64 : 256;
  // Tuning knobs (multiples of 6 rows and 16 keys are what the micro-kernel wants).
  if (const char* env = std::getenv(backward ? "ATTNKERN_CPU_BWD_BLOCK_M" : "ATTNKERN_CPU_FWD_BLOCK_M")) {
    blk.block_m = std::max<int64_t>(1, std::atoll(env));
  }
  if (const char* env = std::getenv(backward ? "ATTNKERN_CPU_BWD_BLOCK_N" : "ATTNKERN_CPU_FWD_BLOCK_N")) {
    blk.block_n = std::max<int64_t>(16, std::atoll(env) / 16 * 16);
  }
  // Enough tasks to keep every thread busy (and balance causal work): split each kv head's query rows
  // when batch x kv heads alone are too few. Each extra forward chunk repacks its kv head's K and V;
  // each backward one adds a dK/dV buffer.
  const int64_t heads = std::max<int64_t>(p.B * p.Hkv, 1);
  const int64_t max_chunks = std::max<int64_t>((p.L + blk.block_m - 1) / blk.block_m, 1);
  int64_t want;
  if (backward) {
    // The backward's split never depends on the thread count in use: the chunks' partial dK/dV are
    // summed in chunk order, so a split that followed torch.set_num_threads would change the rounding
    // with it (results are bitwise equal across thread counts). It aims at two tasks per hardware
    // thread of the machine (fixed for the machine; ATTNKERN_CPU_BWD_TASKS overrides), within
    // kPartialBytes of partial buffers. (A fixed count for every machine either idles big machines or
    // burdens small ones with partial buffers: about 10% of the backward on 2 cores at 32 tasks.)
    static const int64_t machine_tasks = 2 * std::max<int64_t>(std::thread::hardware_concurrency(), 1);
    int64_t tasks = machine_tasks;
    if (const char* env = std::getenv("ATTNKERN_CPU_BWD_TASKS")) tasks = std::max<int64_t>(1, std::atoll(env));
    constexpr int64_t kPartialBytes = int64_t(256) << 20;
    const int64_t nr = dtype == c10::ScalarType::Double ? 8 : 16;  // kNR of the accumulation type
    const int64_t acc_bytes = dtype == c10::ScalarType::Double ? 8 : 4;
    const int64_t slot_bytes = std::max<int64_t>(p.S * (round_up(p.E, nr) + round_up(p.Ev, nr)) * acc_bytes, 1);
    want = std::min(tasks, std::max<int64_t>(kPartialBytes / slot_bytes, 1));
  } else {
    // The forward's split changes no result (every row is computed whole, over the same key tiles, by
    // one task), so it follows the threads. Non-causal tasks are equal, so two per thread balance;
    // causal ones are not (later rows see more keys): four per thread, handed out longest first (see
    // task_chunk).
    want = (p.banded() ? 4 : 2) * at::get_num_threads();
  }
  blk.query_chunks = heads >= want ? 1 : std::clamp<int64_t>((want + heads - 1) / heads, 1, max_chunks);
  return blk;
}

void attention_backward(const AttentionParams& p, c10::ScalarType dtype) {
  const Blocking blk = choose_blocking(p, dtype, /*backward=*/true);
  switch (dtype) {
    case c10::ScalarType::Float: run_backward<float>(p, blk); break;
    case c10::ScalarType::Double: run_backward<double>(p, blk); break;
    case c10::ScalarType::BFloat16: run_backward<c10::BFloat16>(p, blk); break;
    case c10::ScalarType::Half: run_backward<c10::Half>(p, blk); break;
    default: TORCH_CHECK(false, "attnkern cpu backward: unsupported dtype ", dtype);
  }
}

}  // namespace cpu
}  // namespace attnkern
