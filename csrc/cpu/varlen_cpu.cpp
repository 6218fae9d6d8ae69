// Packed variable-length batches on the CPU (attnkern/varlen.py): the attnkern_ext varlen ops.
//
// q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), out (Tq, Hq, Ev), lse (Hq, Tq), stats (Hq, Tq, 2);
// cu_seqlens_q/k int32 (B + 1,) on the CPU, checked by the caller (attnkern/varlen.py sequence_bounds).
// Each sequence is its own (1, H, L_b, E) problem on views of the packed tensors, filled and checked by
// forward_params/backward_params like any other call, with the band aligned to its own L_b, S_b; no
// sequence reads another's keys. One parallel region serves them all: a sequence with at least 1/threads
// of the total work runs alone with every thread (its kernel parallelizes inside), the others share a
// region in which each runs single-threaded (the kernels' parallel_for runs inline inside a parallel
// region), largest first, handed out by an atomic counter. Per-sequence launches of a parallel region
// each cost a barrier, which is what a loop from Python paid B times. Results do not depend on the thread
// count: a sequence's arithmetic is that of its own problem either way (the kernels are deterministic).
// lse and stats pass through per-sequence contiguous buffers (the kernels write (1, Hq, L_b) rows).
// Dropout: sequence b draws its own problem's mask with rng (seed, (offset mod 2^32) + b)
// (varlen.sequence_rng), a small CPU tensor of its own.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "../op_args.h"
#include "attention_cpu.h"
#include "isa.h"

namespace attnkern {
namespace {

struct Seq {
  int64_t b, q0, q1, k0, k1;
  double work;
};

std::vector<Seq> sequences(const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal) {
  TORCH_CHECK(cu_q.device().is_cpu() && cu_k.device().is_cpu() && cu_q.scalar_type() == at::kInt &&
                  cu_k.scalar_type() == at::kInt && cu_q.dim() == 1 && cu_q.sizes() == cu_k.sizes(),
              "attnkern: cu_seqlens_q/k must be int32 (B + 1,) CPU tensors of the same length");
  const auto cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t *oq = cq.data_ptr<int32_t>(), *ok = ck.data_ptr<int32_t>();
  TORCH_CHECK(cq.numel() >= 1 && oq[0] == 0 && ok[0] == 0, "attnkern: cu_seqlens_q/k must start at 0");
  std::vector<Seq> seqs;
  for (int64_t b = 0; b + 1 < cq.numel(); ++b) {
    const double L = oq[b + 1] - oq[b], S = ok[b + 1] - ok[b];
    TORCH_CHECK(L >= 0 && S >= 0, "attnkern: cu_seqlens must be non-decreasing");
    if (L > 0 && S > 0) seqs.push_back({b, oq[b], oq[b + 1], ok[b], ok[b + 1], L * S * (causal ? 0.5 : 1.0)});
  }
  std::sort(seqs.begin(), seqs.end(), [](const Seq& a, const Seq& c) { return a.work > c.work; });
  return seqs;
}

// The canonical (1, H, n, D) view of tokens [t0, t1) of a packed (T, H, D) tensor.
at::Tensor rows(const at::Tensor& t, int64_t t0, int64_t t1) { return t.narrow(0, t0, t1 - t0).permute({1, 0, 2}).unsqueeze(0); }

std::optional<at::Tensor> seq_alibi(const std::optional<at::Tensor>& alibi, int64_t b) {
  if (alibi.has_value() && alibi->defined() && alibi->size(0) > 1) return alibi->narrow(0, b, 1);
  return alibi;
}

// Sequence b's dropout rng (varlen.sequence_rng), or none without dropout.
std::optional<at::Tensor> seq_rng(double dropout_p, const std::optional<at::Tensor>& rng, int64_t b) {
  if (dropout_p <= 0) return std::nullopt;
  TORCH_CHECK(rng.has_value() && rng->defined() && rng->device().is_cpu() && rng->scalar_type() == at::kLong &&
                  rng->dim() == 1 && rng->size(0) == 2,
              "attnkern: dropout_p > 0 needs rng, an int64 (2,) CPU tensor (seed, offset)");
  const at::Tensor r = rng->contiguous();
  const int64_t seed = r.data_ptr<int64_t>()[0], offset = r.data_ptr<int64_t>()[1];
  const int64_t wrap = int64_t(1) << 32;
  at::Tensor out = at::empty({2}, r.options());
  out.data_ptr<int64_t>()[0] = seed;
  out.data_ptr<int64_t>()[1] = (offset % wrap + wrap) % wrap + b;
  return out;
}

// Runs fn(seq) for every sequence: the big ones alone (fn parallelizes inside), the rest in one shared
// parallel region, one thread each.
template <typename Fn>
void for_each_sequence(const std::vector<Seq>& seqs, const Fn& fn) {
  const double total = std::accumulate(seqs.begin(), seqs.end(), 0.0, [](double s, const Seq& q) { return s + q.work; });
  const int64_t threads = at::get_num_threads();
  size_t n_big = 0;
  while (n_big < seqs.size() && threads > 1 && seqs[n_big].work * threads >= total) ++n_big;
  for (size_t i = 0; i < n_big; ++i) fn(seqs[i]);
  if (n_big == seqs.size()) return;
  std::atomic<size_t> next{n_big};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (size_t i = next++; i < seqs.size(); i = next++) fn(seqs[i]);
  });
}

void varlen_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                        const at::Tensor& cu_k, double scale, at::IntArrayRef band, double softcap,
                        const std::optional<at::Tensor>& alibi, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& stats, const std::optional<at::Tensor>& out_lo, double dropout_p,
                        const std::optional<at::Tensor>& rng) {
  cpu::check_isa();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3, "attnkern: varlen q, k, v, out must be 3-D");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0) && stats.dim() == 3 &&
                  stats.size(0) == q.size(1) && stats.size(1) == q.size(0) && stats.size(2) == 2,
              "attnkern: varlen lse must be (Hq, Tq) and stats (Hq, Tq, 2)");
  TORCH_CHECK(out.size(0) == q.size(0) && cu_q.numel() >= 1 && cu_q[-1].item<int64_t>() == q.size(0) &&
                  cu_k[-1].item<int64_t>() == k.size(0),
              "attnkern: cu_seqlens must end at the packed token counts");
  const bool causal = band.size() == 3 && band[2] == 0;
  const auto seqs = sequences(cu_q, cu_k, causal);
  const bool has_lo = out_lo.has_value() && out_lo->defined();
  // Params of every sequence first (their checks raise here, outside any parallel region).
  std::vector<AttentionParams> params(seqs.size());
  std::vector<at::Tensor> lse_b(seqs.size()), stats_b(seqs.size());
  std::vector<std::optional<at::Tensor>> rng_b(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = seqs[i];
    const at::Tensor qb = rows(q, s.q0, s.q1);
    lse_b[i] = at::empty({1, q.size(1), s.q1 - s.q0}, lse.options());
    stats_b[i] = at::empty({1, q.size(1), s.q1 - s.q0, 2}, stats.options());
    const std::optional<at::Tensor> lo = has_lo ? std::optional<at::Tensor>(rows(*out_lo, s.q0, s.q1)) : std::nullopt;
    const std::optional<at::Tensor> none, al = seq_alibi(alibi, s.b);
    rng_b[i] = seq_rng(dropout_p, rng, s.b);
    params[i] = forward_params(qb, rows(k, s.k0, s.k1), rows(v, s.k0, s.k1), none, scale, band,
                               {softcap, al, dropout_p, rng_b[i]}, rows(out, s.q0, s.q1), &lse_b[i], stats_b[i], lo);
  }
  const auto dtype = q.scalar_type();
  for_each_sequence(seqs, [&](const Seq& s) {
    const size_t i = &s - seqs.data();
    cpu::attention_forward(params[i], dtype);
  });
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = seqs[i];
    lse.narrow(1, s.q0, s.q1 - s.q0).copy_(lse_b[i][0]);
    stats.narrow(1, s.q0, s.q1 - s.q0).copy_(stats_b[i][0]);
  }
}

void varlen_backward_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                         const at::Tensor& out, const std::optional<at::Tensor>& out_lo, const at::Tensor& stats,
                         double scale, at::IntArrayRef band, double softcap, const std::optional<at::Tensor>& alibi,
                         const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, double dropout_p,
                         const std::optional<at::Tensor>& rng) {
  cpu::check_isa();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && dq.sizes() == q.sizes() && dk.sizes() == k.sizes() &&
                  dv.sizes() == v.sizes() && stats.dim() == 3 && stats.size(1) == q.size(0),
              "attnkern: varlen backward tensors must be packed (T, H, D) like q, k, v; stats (Hq, Tq, 2)");
  TORCH_CHECK(cu_q.numel() >= 1 && cu_q[-1].item<int64_t>() == q.size(0) && cu_k[-1].item<int64_t>() == k.size(0),
              "attnkern: cu_seqlens must end at the packed token counts");
  const bool causal = band.size() == 3 && band[2] == 0;
  const auto seqs = sequences(cu_q, cu_k, causal);
  const bool has_lo = out_lo.has_value() && out_lo->defined() && out_lo->numel() > 0;
  const bool has_dlse = dlse.has_value() && dlse->defined();
  std::vector<AttentionParams> params(seqs.size());
  std::vector<at::Tensor> stats_b(seqs.size());
  std::vector<std::optional<at::Tensor>> rng_b(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = seqs[i];
    stats_b[i] = stats.narrow(1, s.q0, s.q1 - s.q0).unsqueeze(0).contiguous();
    const std::optional<at::Tensor> none, al = seq_alibi(alibi, s.b);
    rng_b[i] = seq_rng(dropout_p, rng, s.b);
    const std::optional<at::Tensor> lo = has_lo ? std::optional<at::Tensor>(rows(*out_lo, s.q0, s.q1)) : std::nullopt;
    const std::optional<at::Tensor> dl =
        has_dlse ? std::optional<at::Tensor>(dlse->narrow(1, s.q0, s.q1 - s.q0).unsqueeze(0)) : std::nullopt;
    params[i] = backward_params(rows(dout, s.q0, s.q1), dl, rows(q, s.q0, s.q1), rows(k, s.k0, s.k1),
                                rows(v, s.k0, s.k1), none, rows(out, s.q0, s.q1), lo, stats_b[i], scale, band,
                                {softcap, al, dropout_p, rng_b[i]}, rows(dq, s.q0, s.q1), rows(dk, s.k0, s.k1),
                                rows(dv, s.k0, s.k1), none);
  }
  const auto dtype = q.scalar_type();
  for_each_sequence(seqs, [&](const Seq& s) { cpu::attention_backward(params[&s - seqs.data()], dtype); });
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_FRAGMENT(attnkern_ext, m) {
  m.def(attnkern::kVarlenForwardSchema);
  m.def(attnkern::kVarlenBackwardSchema);
}

TORCH_LIBRARY_IMPL(attnkern_ext, CPU, m) {
  m.impl("varlen_forward", &attnkern::varlen_forward_cpu);
  m.impl("varlen_backward", &attnkern::varlen_backward_cpu);
}
