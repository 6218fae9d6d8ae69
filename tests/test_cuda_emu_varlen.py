"""The CUDA kernels' packed variable-length batches (csrc/cuda/varlen.h), run on the CPU under the SIMT
emulator (backend "cuda-emu"): forward and every gradient against the float64 reference run one sequence
at a time (tolerance rule), in float16 and bfloat16; the dropout mask bit for bit; explain.

Shapes are tiny (the emulator runs every CUDA thread as a fiber), but each case mixes lengths 0 and 1
with lengths that span several tiles of the kernels, so blocks past a short sequence's end return, and
Lq != Lk.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import attnkern
from attnkern import philox, tolerance
from attnkern.backends import cuda_emu
from attnkern.reference import reference_varlen_attention
from attnkern.varlen import sequence_rng

pytestmark = pytest.mark.skipif(cuda_emu.build_error() is not None, reason=f"cuda-emu: {cuda_emu.build_error()}")


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


# (name, query lengths, key lengths, Hq, Hkv, E, Ev, kwargs of varlen_attention)
CASES = [
    # GQA, bottom-right causal per sequence; a sequence without keys (rows see nothing: 0, lse -inf), one
    # without queries, one of length 1, and 65 keys: two dK/dV key blocks.
    ("causal_gqa_empty", [17, 1, 4, 0, 33], [17, 0, 65, 3, 40], 4, 2, 32, 32, dict(causal=True)),
    # a sliding window (left and right bounds) with Lq != Lk per sequence, head dims 40 / 24 (zero-padded
    # to 40, run at 64), 65 rows: two forward row blocks
    ("window_cross", [65, 1, 9], [33, 17, 1], 2, 2, 40, 24, dict(window=(8, 3))),
    # MQA over 3 sequences of at most 65 keys: 6 dK/dV CTAs, under the emulated 8 SMs, so the group of 4
    # splits in 2 parts (float32 partial sums on the packed key rows); a sequence without keys and one
    # without queries.
    ("mqa_group_split", [17, 5, 0], [65, 0, 9], 4, 1, 32, 32, dict(causal=True)),
]


def _grads(out, lse, dout, dlse, leaves):
    # Rows that see no key have lse = -inf: their dlse is dropped (its gradient is 0 by the contract).
    dl = torch.where(torch.isfinite(lse.detach()), dlse.to(lse.dtype), torch.zeros_like(lse))
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.autograd.grad((out * dout.to(out.dtype)).sum() + (fin * dl).sum(), leaves)


def _inputs(lq, lk, Hq, Hkv, E, Ev, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, E, generator=gen).to(dtype)
    k = torch.randn(sum(lk), Hkv, E, generator=gen).to(dtype)
    v = torch.randn(sum(lk), Hkv, Ev, generator=gen).to(dtype)
    dout = torch.randn(sum(lq), Hq, Ev, generator=gen).to(dtype)
    dlse = torch.randn(Hq, sum(lq), generator=gen)
    return q, k, v, dout, dlse


def _check_against_reference(lq, lk, q, k, v, dout, dlse, dtype, **kw):
    cu_q, cu_k = _cu(lq), _cu(lk)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attnkern.varlen_attention(*leaves, cu_q, cu_k, max(lq), max(lk), enable_gqa=True, return_lse=True,
                                         backend="cuda-emu", **kw)
    grads = _grads(out, lse, dout, dlse, leaves)

    def ref(cast, cd):
        ls = [cast(t).requires_grad_() for t in (q, k, v)]
        o, l = reference_varlen_attention(*ls, cu_q, cu_k, compute_dtype=cd, **kw)
        return o, l, _grads(o, l, dout, dlse, ls)

    o64, l64, g64 = ref(lambda t: t.detach().double(), torch.float64)
    olp, llp, glp = ref(lambda t: t.detach().clone(), None)
    results = [tolerance.check("out", out, o64, olp, dtype), tolerance.check("lse", lse, l64, llp, torch.float32)]
    results += [tolerance.check(n, g, r64, rlp, dtype, factor=3.0)
                for n, g, r64, rlp in zip(("dq", "dk", "dv"), grads, g64, glp)]
    tolerance.assert_all(results)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_varlen_matches_reference(case, dtype):
    _, lq, lk, Hq, Hkv, E, Ev, kw = case
    q, k, v, dout, dlse = _inputs(lq, lk, Hq, Hkv, E, Ev, dtype, seed=len(case[0]))
    _check_against_reference(lq, lk, q, k, v, dout, dlse, dtype, **kw)


def test_mqa_case_takes_the_group_split():
    cuda_emu.load()
    assert torch.ops.attnkern_emu.kv_group_parts(3, 1, 4, 65) == 2  # CASES' mqa_group_split


def test_no_block_reads_another_sequences_tokens():
    """Every other sequence's q, k, v set to NaN leaves a sequence's output, lse and gradients bit for bit
    as they were: no tile reads (even masked off) a token of another sequence (0 * NaN would show)."""
    lq, lk = [17, 5, 9], [20, 3, 70]
    q, k, v, dout, _ = _inputs(lq, lk, 2, 2, 16, 16, torch.float16, seed=3)
    cu_q, cu_k = _cu(lq), _cu(lk)

    def run(q, k, v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attnkern.varlen_attention(*leaves, cu_q, cu_k, max(lq), max(lk), return_lse=True,
                                             backend="cuda-emu")
        return (out, lse, *torch.autograd.grad((out * dout).sum(), leaves))

    clean = run(q, k, v)
    for b in range(len(lq)):
        rows, keys = slice(*cu_q[b:b + 2].tolist()), slice(*cu_k[b:b + 2].tolist())
        poisoned = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        poisoned[0][rows], poisoned[1][keys], poisoned[2][keys] = q[rows], k[keys], v[keys]
        got = run(*poisoned)
        for name, a, c, sel in zip(("out", "lse", "dq", "dk", "dv"), got, clean,
                                   ((rows,), (slice(None), rows), (rows,), (keys,), (keys,))):
            assert torch.equal(a[sel], c[sel]), f"sequence {b}: {name} changed with the other sequences NaN"


def test_varlen_score_mods_match_reference():
    """softcap, per-sequence ALiBi slopes (B, Hq) and dropout through the kMods kernels, causal, GQA."""
    lq, lk = [1, 17, 0, 9], [3, 20, 2, 9]
    q, k, v, dout, dlse = _inputs(lq, lk, 4, 2, 16, 16, torch.float16, seed=7)
    slopes = torch.rand(len(lq), 4, generator=torch.Generator().manual_seed(8))
    rng = torch.tensor([1234, 2**32 - 2], dtype=torch.int64)  # sequence offsets wrap around 2^32
    _check_against_reference(lq, lk, q, k, v, dout, dlse, torch.float16, causal=True, softcap=3.0,
                             alibi_slopes=slopes, dropout_p=0.25, dropout_rng=rng)


def test_varlen_dropout_mask_is_the_references_bit_for_bit():
    """With v one-hot over each sequence's keys, out[i, j] = P_ij Z_ij / (1 - p): it is 0 exactly where the
    kernel dropped key j, which must be where sequence b's own problem drawn with rng offset + b drops it."""
    lq, lk, H, Ev, p = [1, 9, 16], [5, 16, 12], 2, 16, 0.4
    gen = torch.Generator().manual_seed(11)
    q = (0.1 * torch.randn(sum(lq), H, 16, generator=gen)).half()
    k = (0.1 * torch.randn(sum(lk), H, 16, generator=gen)).half()
    v = torch.zeros(sum(lk), H, Ev, dtype=torch.float16)
    k0 = 0
    for n in lk:
        v[k0 + torch.arange(n), :, torch.arange(n)] = 1.0
        k0 += n
    rng = torch.tensor([987654321, 42], dtype=torch.int64)
    out = attnkern.varlen_attention(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), dropout_p=p, dropout_rng=rng,
                                    backend="cuda-emu")
    q0, n_kept, n_all = 0, 0, 0
    for b, (m, n) in enumerate(zip(lq, lk)):
        draws = philox.dropout_draws(sequence_rng(rng, b), 1, H, m, n)[0]  # (H, m, n)
        kept = draws >= philox.dropout_threshold(p)
        got = out[q0:q0 + m, :, :n].transpose(0, 1) != 0  # (H, m, n)
        assert torch.equal(got, kept), f"sequence {b}: the kernel's dropout mask differs from the reference's"
        assert not out[q0:q0 + m, :, n:].any()
        q0, n_kept, n_all = q0 + m, n_kept + int(kept.sum()), n_all + kept.numel()
    assert 0 < n_kept < n_all  # the comparison saw both kept and dropped scores


def test_explain_varlen_accepts_cuda_emu_and_cuda():
    lq = [3, 5]
    q, k, v = (torch.randn(8, 2, 16, dtype=torch.float16) for _ in range(3))
    e = attnkern.explain_varlen(q, k, v, _cu(lq), _cu(lq), 5, 5, causal=True, backend="cuda-emu")
    assert e.backend == "cuda-emu", e
    # "cuda" takes packed batches too: on CPU tensors it declines for the device, not for varlen.
    e = attnkern.explain_varlen(q, k, v, _cu(lq), _cu(lq), 5, 5, backend="cuda")
    assert e.backend == "none" and "varlen" not in e.reason and "CUDA" in e.reason, e


def test_varlen_op_rejects_bad_offsets():
    """The op checks the offsets itself (called directly, a bad one must raise, not send blocks astray)."""
    cuda_emu.load()
    q = torch.randn(8, 2, 16, dtype=torch.float16)
    out, lse, stats = torch.empty_like(q), torch.empty(2, 8), torch.empty(2, 8, 2)
    bad = torch.tensor([0, 6, 5, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must be non-decreasing"):
        torch.ops.attnkern_emu.varlen_forward(q, q, q, bad, _cu([3, 2, 3]), 0.25, [0, -1, -1], 0.0, None, out, lse,
                                              stats)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k\[-1\] must equal the packed token count 8, got 7"):
        torch.ops.attnkern_emu.varlen_forward(q, q, q, _cu([3, 5]), _cu([3, 4]), 0.25, [0, -1, -1], 0.0, None, out,
                                              lse, stats)
