"""Packed variable-length batches (attnkern.varlen_attention): every varlen backend against the float64
reference run one sequence at a time (tolerance rule), forward and every gradient; declines; bad inputs."""
from __future__ import annotations

import itertools

import pytest
import torch

import attnkern
from attnkern import tolerance
from attnkern.reference import reference_varlen_attention

VARLEN_BACKENDS = ("reference", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _random_lens(gen, n, lo=1, hi=200):
    """Mixed lengths, with 1 and odd lengths always among them."""
    lens = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    lens[0] = 1
    lens[-1] |= 1
    return lens


# (name, query lengths, key lengths or None for the same, Hq, Hkv, E, Ev, causal, window)
CASES = [
    ("self_mixed", None, None, 4, 4, 32, 32, False, None),
    ("self_causal_gqa", None, None, 6, 2, 64, 64, True, None),
    ("cross_causal_rows_empty", [1, 37, 130, 9], [5, 37, 100, 1], 2, 1, 40, 24, True, None),
    ("self_window", None, None, 2, 2, 16, 48, False, (17, 5)),
    ("cross_window_causal", [3, 64, 199], [40, 1, 150], 4, 2, 32, 32, True, (20, -1)),
    # empty sequences: none at all, queries without keys (output 0, lse -inf), keys without queries
    ("empty_sequences", [0, 5, 7, 0, 11], [0, 0, 7, 4, 11], 2, 2, 16, 16, False, None),
]


def _make(case, dtype, seed):
    name, lq, lk, Hq, Hkv, E, Ev, causal, window = case
    gen = torch.Generator().manual_seed(seed)
    if lq is None:
        lq = _random_lens(gen, 5)
        lk = lq
    q = torch.randn(sum(lq), Hq, E, generator=gen).to(dtype)
    k = torch.randn(sum(lk), Hkv, E, generator=gen).to(dtype)
    v = torch.randn(sum(lk), Hkv, Ev, generator=gen).to(dtype)
    dout = torch.randn(sum(lq), Hq, Ev, generator=gen).to(dtype)
    dlse = torch.randn(Hq, sum(lq), generator=gen)
    return lq, lk, q, k, v, dout, dlse, dict(causal=causal, window=window)


def _grads(out, lse, dout, dlse, leaves):
    # Rows that see no key have lse = -inf: their dlse is dropped (its gradient is 0 by the contract).
    dl = torch.where(torch.isfinite(lse.detach()), dlse.to(lse.dtype), torch.zeros_like(lse))
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.autograd.grad((out * dout.to(out.dtype)).sum() + (fin * dl).sum(), leaves)


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_varlen_matches_reference(case, dtype, backend):
    check_against_reference(*_make(case, dtype, seed=hash(case[0]) % 1000), dtype, backend)


def check_against_reference(lq, lk, q, k, v, dout, dlse, kw, dtype, backend, deterministic=False):
    """varlen_attention on `backend` against the float64 reference, output, lse and every gradient (the
    tolerance rule); kw: varlen_attention's keywords (causal, window, score mods)."""
    cu_q, cu_k = _cu(lq), _cu(lk)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attnkern.varlen_attention(*leaves, cu_q, cu_k, max(lq), max(lk), enable_gqa=True, return_lse=True,
                                         backend=backend, deterministic=deterministic, **kw)
    assert out.shape == (sum(lq), q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], sum(lq))
    grads = _grads(out, lse, dout, dlse, leaves)

    def ref(cast, cd):
        ls = [cast(t).requires_grad_() for t in (q, k, v)]
        o, l = reference_varlen_attention(*ls, cu_q, cu_k, compute_dtype=cd, **kw)
        return o, l, _grads(o, l, dout, dlse, ls)

    o64, l64, g64 = ref(lambda t: t.detach().double(), torch.float64)
    olp, llp, glp = ref(lambda t: t.detach().clone(), None) if dtype != torch.float32 else (o64, l64, g64)
    results = [tolerance.check("out", out, o64, olp, dtype), tolerance.check("lse", lse, l64, llp, torch.float32)]
    results += [tolerance.check(n, g, r64, rlp, dtype, factor=3.0)
                for n, g, r64, rlp in zip(("dq", "dk", "dv"), grads, g64, glp)]
    tolerance.assert_all(results)


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_varlen_equals_padded_per_sequence(backend):
    """Each sequence's rows equal attnkern.attention on that sequence alone (bottom-right causal)."""
    lq, lk, q, k, v, *_ = _make(CASES[2], torch.float32, seed=3)
    out, lse = attnkern.varlen_attention(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), causal=True, enable_gqa=True,
                                         return_lse=True, backend=backend)
    q0 = k0 = 0
    for a, b in zip(lq, lk):
        o, l = attnkern.attention(q[q0:q0 + a].transpose(0, 1), k[k0:k0 + b].transpose(0, 1),
                                  v[k0:k0 + b].transpose(0, 1), causal="bottom_right", enable_gqa=True,
                                  backend=backend)
        torch.testing.assert_close(out[q0:q0 + a], o.transpose(0, 1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[:, q0:q0 + a], l, rtol=1e-6, atol=1e-6)
        q0, k0 = q0 + a, k0 + b


def test_varlen_mods_match_reference():
    """softcap and per-sequence ALiBi slopes (B, Hq) on the cpu kernels."""
    lq = [1, 50, 77]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lq), 2, 32, generator=gen) for _ in range(3))
    slopes = torch.rand(3, 2, generator=gen)
    kw = dict(causal=True, softcap=5.0, alibi_slopes=slopes)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnkern.varlen_attention(*leaves, _cu(lq), _cu(lq), 77, 77, backend="cpu", **kw)
    grads = torch.autograd.grad(out.sum(), leaves)
    ls = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_varlen_attention(*ls, _cu(lq), _cu(lq), **kw)
    rg = torch.autograd.grad(ref.sum(), ls)
    tolerance.assert_all([tolerance.check("out", out, ref, ref, torch.float32)] + [
        tolerance.check(n, g, r, r, torch.float32) for n, g, r in zip(("dq", "dk", "dv"), grads, rg)])


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_varlen_dropout_matches_reference(backend):
    """Dropout with a fixed rng: the kernels' masks equal the reference's (sequence b drawn with offset + b),
    output and gradients; distinct sequences of equal content get distinct masks."""
    lq = [1, 40, 40, 77]
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(sum(lq), 2, 16, generator=gen) for _ in range(3))
    q[41:81], k[41:81], v[41:81] = q[1:41], k[1:41], v[1:41]  # sequences 1 and 2 identical
    rng = torch.tensor([1234, 5678], dtype=torch.int64)
    kw = dict(causal=True, dropout_p=0.3, dropout_rng=rng)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnkern.varlen_attention(*leaves, _cu(lq), _cu(lq), 77, 77, backend=backend, **kw)
    grads = torch.autograd.grad(out.sum(), leaves)
    ls = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_varlen_attention(*ls, _cu(lq), _cu(lq), **kw)
    rg = torch.autograd.grad(ref.sum(), ls)
    tolerance.assert_all([tolerance.check("out", out, ref, ref, torch.float32)] + [
        tolerance.check(n, g, r, r, torch.float32) for n, g, r in zip(("dq", "dk", "dv"), grads, rg)])
    assert not torch.equal(out[1:41], out[41:81])


def test_varlen_explain_and_declines():
    lq = [3, 5]
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    e = attnkern.explain_varlen(q, k, v, _cu(lq), _cu(lq), 5, 5, causal=True)
    assert e.backend == "cpu" and "varlen" in e.problem
    # The CUDA kernels take packed batches; CPU tensors they decline for the device, not for varlen.
    with pytest.raises(attnkern.BackendUnavailableError, match="backend='cuda' cannot run this call: (?!.*varlen)"):
        attnkern.varlen_attention(q, k, v, _cu(lq), _cu(lq), 5, 5, backend="cuda")


def _bad_call(**over):
    lq = [3, 5]
    args = dict(q=torch.randn(8, 2, 16), k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16),
                cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lq), max_seqlen_q=5, max_seqlen_k=5)
    args.update(over)
    return attnkern.varlen_attention(**args)


@pytest.mark.parametrize("over, err, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=torch.tensor([[0, 3, 8]], dtype=torch.int32)), ValueError, r"cu_seqlens_k must be 1-D"),
    (dict(cu_seqlens_k=_cu([8])), ValueError, "same length as cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32),
          cu_seqlens_k=_cu([3, 2, 3])), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=_cu([3, 4])), ValueError, r"cu_seqlens_q\[-1\] must equal the packed query token count 8"),
    (dict(cu_seqlens_k=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[0\] must be 0"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q must be at least the longest sequence's length 5"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be an int >= 0"),
    (dict(q=torch.randn(1, 8, 2, 16)), ValueError, r"q must be 3-D \(total_q, Hq, E\)"),
    (dict(k=torch.randn(8, 2, 8)), ValueError, "k's head dim"),
    (dict(v=torch.randn(7, 2, 16)), ValueError, "v must be"),
    (dict(k=torch.randn(8, 1, 16), v=torch.randn(8, 1, 16)), ValueError, "enable_gqa"),
    (dict(v=torch.randn(8, 2, 16, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(dropout_p=1.5), ValueError, "dropout_p must be a float in"),
    (dict(dropout_p=0.1, dropout_rng=torch.zeros(2)), ValueError, "dropout_rng must be an int64"),
])
def test_varlen_bad_inputs(over, err, match):
    with pytest.raises(err, match=match):
        _bad_call(**over)


def test_varlen_compile_traces():
    lq = [3, 5]
    q, k, v = (torch.randn(8, 2, 16, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: attnkern.varlen_attention(q, k, v, _cu(lq), _cu(lq), 5, 5, causal=True),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    ref = attnkern.varlen_attention(q, k, v, _cu(lq), _cu(lq), 5, 5, causal=True)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    rg = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)


def _njt(lens, H, E, dtype, gen):
    """A leaf (B, j, H, E) nested jagged tensor and its (B, H, j, E) transpose, as SDPA takes it."""
    parts = [torch.randn(n, H, E, generator=gen).to(dtype) for n in lens]
    leaf = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    return leaf, leaf.transpose(1, 2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_nested_jagged_sdpa_matches_torch(dtype):
    """attnkern's SDPA on (B, H, j, E) nested jagged tensors equals torch's SDPA on the same tensors,
    output and gradients, and returns a nested jagged tensor with the query's offsets."""
    gen = torch.Generator().manual_seed(11)
    lq, lk = [1, 17, 64, 3], [9, 2, 64, 33]
    (ql, q), (kl, k), (vl, v) = _njt(lq, 2, 32, dtype, gen), _njt(lk, 2, 32, dtype, gen), _njt(lk, 2, 24, dtype, gen)
    out = attnkern.scaled_dot_product_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.is_nested and out.layout == torch.jagged and out.shape[:2] == ref.shape[:2]
    assert torch.equal(out.transpose(1, 2).offsets(), q.transpose(1, 2).offsets())
    o, r = out.transpose(1, 2).values(), ref.transpose(1, 2).values()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(o, r, **tol)
    dout = torch.randn(o.shape, generator=gen).to(dtype)
    g = torch.autograd.grad((o * dout).sum(), (ql, kl, vl))
    rg = torch.autograd.grad((r * dout).sum(), (ql, kl, vl))
    for a, b in zip(g, rg):
        torch.testing.assert_close(a.values(), b.values(), **tol)


def test_nested_jagged_sdpa_refuses_as_torch():
    gen = torch.Generator().manual_seed(1)
    _, q = _njt([3, 5], 2, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="is_causal"):
        attnkern.scaled_dot_product_attention(q, q, q, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        attnkern.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))


def test_varlen_cpu_bitwise_across_thread_counts():
    """One long and many short sequences (the long one runs alone, the short ones share a parallel region):
    output, lse and gradients bitwise equal with 1 thread and with several."""
    lq = [300, *range(1, 60, 7)]
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(sum(lq), 4, 32, generator=gen) for _ in range(3))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attnkern.varlen_attention(*leaves, _cu(lq), _cu(lq), 300, 300, causal=True, return_lse=True,
                                             backend="cpu")
        return (out, lse, *torch.autograd.grad(out.sum() + lse.sum(), leaves))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))
        many = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(many, one):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cu_q, cu_k, match", [
    ([0, 3, 2, 8], [0, 3, 5, 8], "non-decreasing"),
    ([-2, 3, 8], [0, 3, 8], "start at 0"),
    ([0, 3, 9], [0, 3, 8], "end at the packed token counts"),
])
def test_varlen_cpu_op_checks_offsets(cu_q, cu_k, match):
    """The C++ op checks the offsets itself (it can be called directly): an error, never an access
    outside the packed tensors."""
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    out, lse, stats = torch.empty(8, 2, 16), torch.empty(2, 8), torch.empty(2, 8, 2)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.attnkern_ext.varlen_forward(q, k, v, torch.tensor(cu_q, dtype=torch.int32),
                                              torch.tensor(cu_k, dtype=torch.int32), 0.25, [1, -1, -1], 0.0, None,
                                              out, lse, stats)
