"""What attnkern does with arguments at the edges of validity, on every backend that runs here:

- scale: zero, negative, tiny and huge scales compute what the float64 reference computes; a scale float32
  cannot hold is refused for float16/bfloat16/float32 inputs (their scores are float32); the scale is
  applied after the dot, so a large scale times a large query entry does not overflow on its own.
- the custom ops check their arguments (shapes, dtypes, devices, codes) before any kernel runs; the bad
  calls run in a child process so that a crash fails one test, not the run.
- problems with a zero-sized dim (zero heads, batch, lengths, head dims) return torch's empty results.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern import ops
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from isolated import run_isolated
from matrix import BACKEND_DTYPES, DEVICE, FUSED, pair_id, pairs

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BACKENDS = FUSED + ["reference"]
FP32_BACKENDS = [b for b in BACKENDS if F32 in BACKEND_DTYPES[b]]


def _grads_and_out(backend, q, k, v, do, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attnkern.attention(*leaves, backend=backend, return_lse=False, **kw)
    return (out, *torch.autograd.grad(out, leaves, do))


def _reference(q, k, v, do, dtype, **kw):
    """(out, dq, dk, dv) of the reference in `dtype` (float64: the oracle; the input dtype: ref_lp)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, **kw)[0]
    return (out, *torch.autograd.grad(out, leaves, do.to(dtype)))


# ---------------------------------------------------------------------------------------------- scale

@pytest.mark.parametrize("scale", [0.0, -0.0, -0.7, 1e-30, 1e-46, 7.0, -7.0])
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_zero_negative_tiny_and_large_scales_match_the_reference(pair, scale):
    backend, dtype = pair
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 16, device=DEVICE).to(dtype) for _ in range(3))
    do = torch.randn(2, 3, 21, 16, device=DEVICE).to(dtype)
    mask = torch.randn(21, 21, device=DEVICE)
    got = _grads_and_out(backend, q, k, v, do, scale=scale, attn_mask=mask, causal=True)
    ref64 = _reference(q, k, v, do, F64, scale=scale, attn_mask=mask, causal=True)
    ref_lp = _reference(q, k, v, do, dtype, scale=scale, attn_mask=mask, causal=True)
    names = ("out", "dq", "dk", "dv")
    assert_all([check(f"{backend} {n} scale={scale}", g, r64, rlp, dtype, 2.0 if n == "out" else 3.0)
                for n, g, r64, rlp in zip(names, got, ref64, ref_lp)])


@pytest.mark.parametrize("scale", [0.0, -0.7, 1e-46])
def test_scales_torch_allows_match_torch(scale):
    q, k, v = (torch.randn(1, 2, 9, 8, device=DEVICE) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    for backend in FP32_BACKENDS:
        with attnkern.use_backend(backend):
            got = attnkern.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38])
def test_scale_beyond_float32_is_refused_for_float32_scores(dtype, scale):
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE, dtype=dtype) for _ in range(3))
    for backend in [None] + BACKENDS:
        with pytest.raises(ValueError, match=r"scale=.* out of range for .* computed in float32, so \|scale\| "
                                             r"must be at most 3.40282e\+38"):
            attnkern.attention(q, k, v, scale=scale, backend=backend)
    with pytest.raises(ValueError, match=r"scale="):
        attnkern.explain(q, k, v, scale=scale)


def test_float64_takes_any_finite_scale():
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE, dtype=F64) * 1e-40 for _ in range(3))
    out = attnkern.scaled_dot_product_attention(q, k, v, scale=1e39)
    want = reference_attention(q, k, v, scale=1e39)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_large_scale_times_a_large_query_does_not_overflow(backend):
    """scale * q overflows float32 (4 * 1e38) though every scaled score q.k * scale (about 4e36) fits: the
    kernels scale the dot, not the query, so the output is the reference's (one-hot rows) and not NaN."""
    torch.manual_seed(1)
    q = torch.full((1, 2, 7, 4), 4.0, device=DEVICE)
    k = torch.randn(1, 2, 9, 4, device=DEVICE) * 1e-2
    v = torch.randn(1, 2, 9, 4, device=DEVICE)
    do = torch.randn(1, 2, 7, 4, device=DEVICE)
    out, _, _, dv = _grads_and_out(backend, q, k, v, do, scale=1e38)
    ref = _reference(q, k, v, do, F64, scale=1e38)
    assert_all([check(f"{backend} out", out, ref[0], None, F32), check(f"{backend} dv", dv, ref[3], None, F32)])


# --------------------------------------------------------------------------------------- op arguments

# A child process calls the op with one wrong argument per case and prints, per case, the exception it
# got. Cases: (name, what to change, the message the error must contain).
_OP_CHECK_SCRIPT = r"""
import json, sys, torch, attnkern
from attnkern import ops
backend, device, which, dtype = sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
dname = str(dtype).replace("torch.", "")
fwd = getattr(torch.ops.attnkern, f"attention_forward_{ops.CONTRACT}")
bwd = getattr(torch.ops.attnkern, f"attention_backward_{ops.CONTRACT}")
B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 5, 7, 8, 6
r = lambda *s, dtype=dtype: torch.randn(*s, dtype=dtype, device=device)
good = dict(q=r(B, Hq, L, E), k=r(B, Hkv, S, E), v=r(B, Hkv, S, Ev), mask=r(1, Hq, L, S, dtype=torch.float32),
            scale=0.5, band=[0, -1, 0], softcap=0.0, alibi=None, dropout_p=0.0, rng=None,
            backend=backend, residual=True)
out, lse, stats, out_lo = fwd(**good)
good_bwd = dict(dout=r(B, Hq, L, Ev), dlse=r(B, Hq, L, dtype=torch.float32), **good, out=out, out_lo=out_lo,
                stats=stats, mask_grad=True)
good_bwd = {n: good_bwd[n] for n in ("dout", "dlse", "q", "k", "v", "mask", "out", "out_lo", "stats", "scale",
                                     "band", "softcap", "alibi", "dropout_p", "rng", "mask_grad", "backend")}
meta = lambda t: t.to("meta")
fwd_cases = {
    "kv heads not dividing query heads": (dict(k=r(B, 3, S, E), v=r(B, 3, S, Ev)), "multiple of the key/value heads"),
    "query rank": (dict(q=r(Hq, L, E)), "query must be 4-D"),
    "key head dim": (dict(k=r(B, Hkv, S, E + 1)), "key must have shape"),
    "key batch": (dict(k=r(B + 1, Hkv, S, E)), "key must have shape"),
    "value length": (dict(v=r(B, Hkv, S + 1, Ev)), "value must have shape"),
    "value heads": (dict(v=r(B, 1, S, Ev)), "value must have shape"),
    "key dtype": (dict(k=r(B, Hkv, S, E, dtype=torch.float64)), f"key must be {dname}"),
    "integer query": (dict(q=torch.ones(B, Hq, L, E, dtype=torch.int64, device=device)), "query must be float16"),
    "key device": (dict(k=meta(r(B, Hkv, S, E))), "key must be on the query's device"),
    "mask dim": (dict(mask=r(1, Hq, 3, S)), "attn_mask must have shape"),
    "mask rank": (dict(mask=r(L, S)), "attn_mask must be 4-D"),
    "mask dtype": (dict(mask=r(1, Hq, L, S, dtype=torch.float64)), "attn_mask must be bool, float32"),
    "mask device": (dict(mask=meta(r(1, Hq, L, S))), "attn_mask must be on the query's device"),
    "band alignment": (dict(band=[3, -1, 0]), "band must be [bottom_right (0 or 1), left (>= -1), right (>= -1)]"),
    "band left": (dict(band=[1, -5, 0]), "band must be [bottom_right"),
    "band length": (dict(band=[1, 2]), "band must be [bottom_right"),
    "infinite scale": (dict(scale=float("inf")), "scale must be a finite float"),
    "scale beyond float32": (dict(scale=1e39), "does not fit float32"),
    "negative softcap": (dict(softcap=-2.0), "softcap must be a finite float >= 0"),
    "alibi shape": (dict(alibi=torch.ones(Hq, device=device)), "alibi must be a contiguous float32 (1 or B, Hq)"),
    "alibi dtype": (dict(alibi=torch.ones(1, Hq, device=device, dtype=torch.float64)), "alibi must be"),
    "dropout_p range": (dict(dropout_p=1.5), "dropout_p must be a float in [0, 1]"),
    "dropout without rng": (dict(dropout_p=0.5), "dropout_p > 0 needs rng"),
    "rng shape": (dict(dropout_p=0.5, rng=torch.zeros(3, dtype=torch.int64, device=device)), "rng must be an int64"),
    "unknown backend": (dict(backend="flash"), "backend must name a registered backend"),
    "auto is not a backend": (dict(backend="auto"), "backend must name a registered backend"),
}
bwd_cases = {
    "kv heads not dividing query heads": (dict(k=r(B, 3, S, E), v=r(B, 3, S, Ev)), "multiple of the key/value heads"),
    "grad_out shape": (dict(dout=r(B, Hq, L, E)), "grad_out must have shape"),
    "grad_out dtype": (dict(dout=r(B, Hq, L, Ev, dtype=torch.float64)), f"grad_out must be {dname}"),
    "out shape": (dict(out=r(B, Hq, L + 1, Ev)), "out must have shape"),
    "out device": (dict(out=meta(r(B, Hq, L, Ev))), "out must be on the query's device"),
    "out_lo shape": (dict(out_lo=r(B, Hq, L, Ev + 1)), "out_lo must"),
    "stats shape": (dict(stats=r(B, Hq, L, dtype=torch.float32)), "stats must be 4-D"),
    "stats dtype": (dict(stats=r(B, Hq, L, 2, dtype=torch.float64)), "stats must be float32"),
    "stats broadcast": (dict(stats=r(1, 1, 1, 2, dtype=torch.float32).expand(B, Hq, L, 2)),
                        "stats must be contiguous"),
    "grad_lse shape": (dict(dlse=r(B, Hq, L + 2, dtype=torch.float32)), "grad_lse must have shape"),
    "grad_lse dtype": (dict(dlse=r(B, Hq, L, dtype=torch.float64)), "grad_lse must be float32"),
    "mask_grad without a float mask": (dict(mask=None), "mask_grad=True needs a float attn_mask"),
    "scale beyond float32": (dict(scale=-1e39), "does not fit float32"),
    "rng device": (dict(dropout_p=0.5, rng=meta(torch.zeros(2, dtype=torch.int64))), "rng must be on the query's"),
}
op, base, cases = (fwd, good, fwd_cases) if which == "forward" else (bwd, good_bwd, bwd_cases)
results = {}
for name, (change, want) in cases.items():
    try:
        op(**{**base, **change})
        results[name] = "no error"
    except (ValueError, TypeError, RuntimeError) as exc:
        results[name] = f"{type(exc).__name__}: {exc}" if want in str(exc) else f"wrong message: {exc}"
    print(json.dumps({name: results[name]}), flush=True)  # a crash still leaves the earlier lines
# The fake (meta) implementation checks too: a meta call with the heads that would be read out of bounds.
if which == "forward":
    try:
        fwd(**{**good, "q": meta(good["q"]), "k": meta(r(B, 3, S, E)), "v": meta(r(B, 3, S, Ev)),
               "mask": None})
        results["fake impl"] = "no error"
    except ValueError as exc:
        results["fake impl"] = f"ValueError: {exc}"
    print(json.dumps({"fake impl": results["fake impl"]}))
print("ALL " + json.dumps(results))
"""


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_reject_bad_arguments_before_any_kernel_runs(backend, which):
    dtype = str(BACKEND_DTYPES[backend][0]).replace("torch.", "")  # one the backend takes
    argv = "sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])"
    res = run_isolated(_OP_CHECK_SCRIPT.replace(argv, f"{backend!r}, {DEVICE!r}, {which!r}, torch.{dtype}"))
    results = json.loads(res.stdout.split("ALL ", 1)[1])
    bad = {name: got for name, got in results.items() if not got.startswith(("ValueError", "TypeError"))}
    assert not bad, f"{backend} {which}: calls not refused with the expected error: {bad}"


def test_ops_name_the_backend_that_cannot_run_the_call():
    fwd = getattr(torch.ops.attnkern, f"attention_forward_{ops.CONTRACT}")
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE, dtype=F64) for _ in range(3))
    for backend in FUSED:
        if backend == "cpu":
            continue  # the CPU kernels take float64
        with pytest.raises(attnkern.BackendUnavailableError, match=rf"backend='{backend}' cannot run this call"):
            fwd(q, k, v, None, 0.5, [1, -1, -1], 0.0, None, 0.0, None, backend, False)


# ----------------------------------------------------------------------------------- zero-sized dims

EMPTY_SHAPES = {
    "zero heads": ((2, 0, 3, 4), (2, 0, 5, 4), (2, 0, 5, 4)),
    "zero query heads, gqa": ((2, 0, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4)),
    "zero batch": ((0, 2, 3, 4), (0, 2, 5, 4), (0, 2, 5, 4)),
    "L = 0": ((2, 2, 0, 4), (2, 2, 5, 4), (2, 2, 5, 4)),
    "S = 0": ((2, 2, 3, 4), (2, 2, 0, 4), (2, 2, 0, 4)),
    "E = 0": ((2, 2, 3, 0), (2, 2, 5, 0), (2, 2, 5, 4)),
    "Ev = 0": ((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 0)),
}


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("shapes", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_sized_problems_match_torch(backend, shapes, mask):
    gqa = shapes[0][1] != shapes[1][1]
    for enable_gqa in ([True] if gqa else [False, True]):
        ours = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes]
        theirs = [t.detach().clone().requires_grad_() for t in ours]
        L, S = shapes[0][2], shapes[1][2]
        m = {None: None, "bool": torch.rand(L, S, device=DEVICE) > 0.3,
             "float": torch.randn(L, S, device=DEVICE, requires_grad=True)}[mask]
        if m is not None and m.requires_grad:  # the float mask's gradient too
            ours, theirs = ours + [m], theirs + [m.detach().clone().requires_grad_()]
        with attnkern.use_backend(backend):
            out = attnkern.scaled_dot_product_attention(*ours[:3], attn_mask=ours[3] if len(ours) > 3 else m,
                                                        enable_gqa=enable_gqa)
        want = F.scaled_dot_product_attention(*theirs[:3], attn_mask=theirs[3] if len(theirs) > 3 else m,
                                              enable_gqa=enable_gqa)
        assert out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        do = torch.randn(want.shape, device=DEVICE)
        got_g = torch.autograd.grad(out, ours, do, allow_unused=True)
        want_g = torch.autograd.grad(want, theirs, do, allow_unused=True)
        for name, g, w, t in zip(("dq", "dk", "dv", "dmask"), got_g, want_g, theirs):
            if w is None:  # torch's math path leaves an input it never reads without a gradient
                w = torch.zeros_like(t)
            assert g is not None and g.shape == w.shape, name
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_called_directly_with_zero_heads_return_empty_results(backend):
    fwd = getattr(torch.ops.attnkern, f"attention_forward_{ops.CONTRACT}")
    bwd = getattr(torch.ops.attnkern, f"attention_backward_{ops.CONTRACT}")
    q, k, v = torch.randn(2, 0, 3, 4, device=DEVICE), torch.randn(2, 0, 5, 4, device=DEVICE), torch.randn(
        2, 0, 5, 6, device=DEVICE)
    out, lse, stats, out_lo = fwd(q, k, v, None, 0.5, [0, -1, 0], 0.0, None, 0.0, None, backend, True)
    assert out.shape == (2, 0, 3, 6) and lse.shape == (2, 0, 3) and stats.shape == (2, 0, 3, 2)
    dq, dk, dv, _ = bwd(torch.randn(2, 0, 3, 6, device=DEVICE), None, q, k, v, None, out, out_lo, stats, 0.5, [0, -1, 0],
                        0.0, None, 0.0, None, False, backend)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_zero_kv_heads_with_query_heads_is_a_clear_error():
    """torch returns zeros here; a query head with no key/value head to read is refused instead."""
    q, k, v = torch.randn(2, 4, 3, 4), torch.randn(2, 0, 5, 4), torch.randn(2, 0, 5, 4)
    with pytest.raises(ValueError, match=r"query has 4 heads \(dim -3\), key 0, value 0"):
        attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True)
