"""The public API's behaviour beyond numerics: backend choice, explain, fallbacks and their warnings,
dropout, layouts without copies, determinism, empty and 2-D problems, scale."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern import api, backends
from attnkern.problem import normalize
from matrix import AUTO, DEVICE, FUSED, pairs
from attnkern.tolerance import assert_all, check


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


@pytest.fixture(autouse=True)
def fresh_warnings():
    api._warned.clear()
    yield
    api._warned.clear()


def test_use_backend_and_environment_choose_the_backend(monkeypatch):
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16)
    other = FUSED[-1]
    assert attnkern.explain(q, k, v).backend == AUTO
    with attnkern.use_backend("reference"):
        assert attnkern.explain(q, k, v).backend == "reference"
        with attnkern.use_backend(other):
            assert attnkern.explain(q, k, v).backend == other
        assert attnkern.explain(q, k, v).backend == "reference"
        # an explicit argument wins over the context
        assert attnkern.explain(q, k, v, backend=other).backend == other
    monkeypatch.setenv("ATTNKERN_BACKEND", "reference")
    assert attnkern.explain(q, k, v).backend == "reference"
    with attnkern.use_backend("auto"):
        assert attnkern.explain(q, k, v).backend == AUTO


def test_backends_really_run_what_explain_says(monkeypatch):
    """Count the forward calls each backend receives."""
    calls = []
    for name in backends.names()[1:]:
        b = backends.get(name)
        orig = b.forward
        monkeypatch.setattr(b, "forward", lambda *a, _o=orig, _n=name: (calls.append(_n), _o(*a))[1])
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16)
    attnkern.scaled_dot_product_attention(q, k, v)
    with attnkern.use_backend("reference"):
        attnkern.scaled_dot_product_attention(q, k, v)
    assert calls == [AUTO, "reference"]


def test_explain_says_why(monkeypatch):
    q, k, v = rand(2, 4, 5, 16), rand(2, 2, 7, 16), rand(2, 2, 7, 16)
    e = attnkern.explain(q, k, v, enable_gqa=True, is_causal=True)
    assert e.backend == AUTO and not e.fallback
    assert "Hq=4 Hkv=2 L=5 S=7 E=16" in e.problem and "causal=top_left" in e.problem
    e = attnkern.explain(q, k, v, enable_gqa=True, dropout_p=0.1)
    assert all("dropout" in why for why in e.rejected.values())
    if set(e.rejected) == set(FUSED):  # no kernel of this device fuses dropout (yet)
        assert e.backend == "reference" and e.fallback and "backend: reference (fallback)" in str(e)
    else:  # the device's own kernels fuse it (the C++ CPU kernels do)
        assert e.backend == AUTO and not e.fallback and AUTO not in e.rejected
    if DEVICE == "cpu":
        assert e.backend == "cpu"
    monkeypatch.setattr(backends.get(AUTO), "unsupported_reason", lambda problem: "declined for this test")
    e = attnkern.explain(q, k, v, enable_gqa=True)
    assert e.rejected[AUTO] == "declined for this test" and "declined for this test" in str(e)
    e = attnkern.explain(q.double(), k.double(), v.double(), enable_gqa=True, backend="triton")
    assert e.backend == "none" and "cannot run this call" in e.reason and "float64" in e.reason
    e = attnkern.explain(q, k, v, enable_gqa=True, causal="bottom_right")
    assert "causal=bottom_right" in e.problem


def test_float64_goes_to_a_kernel_that_takes_it():
    q = rand(1, 2, 5, 16, dtype=torch.float64)
    e = attnkern.explain(q, q, q)
    if DEVICE == "cpu":
        assert e.backend == "cpu" and not e.fallback
    else:
        assert e.backend == "reference" and "float64" in e.rejected["triton"]


def test_fallback_warns_once_per_reason(monkeypatch):
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16)
    for name in FUSED:  # a call no kernel of the device serves (dropout was one until the CPU kernels fused it)
        monkeypatch.setattr(backends.get(name), "unsupported_reason",
                            lambda problem: "dropout_p: not fused here" if problem.mods.dropout_p else None)
    with pytest.warns(attnkern.AttnkernFallbackWarning, match=r"no fused kernel covers this call \(.*dropout"):
        attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.2)  # same reason: silent now
        with attnkern.use_backend("reference"):  # asked for: no warning at all
            attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.2)


def test_float64_runs_on_the_reference_path_exactly():
    q, k, v = rand(1, 2, 5, 16, dtype=torch.float64), rand(1, 2, 7, 16, dtype=torch.float64), rand(
        1, 2, 7, 16, dtype=torch.float64)
    with attnkern.use_backend("reference"):
        out = attnkern.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_dropout_with_gradients():
    """Fused where the device's kernels fuse dropout (the C++ CPU kernels), else the reference path with a
    warning; either way reproducible under torch.manual_seed, differentiable and unbiased."""
    q, k, v = rand(1, 2, 33, 16, grad=True), rand(1, 2, 40, 16, grad=True), rand(1, 2, 40, 16, grad=True)
    fused = not attnkern.explain(q, k, v, dropout_p=0.5).fallback
    assert fused == (DEVICE == "cpu") or DEVICE != "cpu"
    with (warnings.catch_warnings() if fused else pytest.warns(attnkern.AttnkernFallbackWarning, match="dropout")):
        if fused:
            warnings.simplefilter("error")
        torch.manual_seed(0)
        a = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)  # the same RNG state gives the same dropout mask
    no_drop = attnkern.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(a, no_drop)
    a.sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))
    # p = 1 drops everything
    assert torch.all(attnkern.scaled_dot_product_attention(q, k, v, dropout_p=1.0) == 0)
    # the expectation over masks is the undropped output
    torch.manual_seed(1)
    with torch.no_grad():
        mean = torch.stack([attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
                            for _ in range(300)]).mean(0)
    assert (mean - no_drop).abs().mean() < 0.05 * no_drop.abs().mean()


def test_strided_views_reach_the_kernel_without_copies():
    base = rand(2, 9, 4, 16)  # (B, L, H, E) as a model produces it
    q = base.transpose(1, 2)
    mask = torch.randn(9, 9, device=DEVICE)
    p = normalize(q, q, q, attn_mask=mask)
    assert p.q.data_ptr() == base.data_ptr() and p.q.stride() == q.stride()
    assert p.mask.data_ptr() == mask.data_ptr()  # broadcast, never expanded in memory
    assert p.mask.shape == (1, 1, 9, 9)
    key_pad = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEVICE)
    assert normalize(q, q, q, attn_mask=key_pad).mask.data_ptr() == key_pad.data_ptr()
    five = rand(2, 3, 4, 9, 16)
    assert normalize(five, five, five).q.data_ptr() == five.data_ptr()


def test_output_keeps_the_query_layout():
    base = rand(2, 9, 4, 16)
    q = base.transpose(1, 2)
    out = attnkern.scaled_dot_product_attention(q, q, q)
    assert out.transpose(1, 2).is_contiguous()  # so out.transpose(1, 2).reshape(B, L, H*E) is free
    assert attnkern.scaled_dot_product_attention(base, base, base).is_contiguous()


@pytest.mark.parametrize("backend", FUSED)
def test_backward_is_deterministic(backend):
    """With deterministic=True every fused backend's backward repeats bitwise (Triton's default single
    pass sums dQ with atomics; tests/test_triton_backward_paths.py checks the choice of path)."""
    q, k, v = rand(1, 4, 40, 32, grad=True), rand(1, 2, 50, 32, grad=True), rand(1, 2, 50, 32, grad=True)
    mask = rand(4, 40, 50, grad=True)
    grads = []
    for _ in range(2):
        out = attnkern.attention(q, k, v, attn_mask=mask, enable_gqa=True, causal="bottom_right",
                                 return_lse=False, backend=backend, deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in (q, k, v, mask)])
        for t in (q, k, v, mask):
            t.grad = None
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_empty_problems_match_torch():
    for L, S in ((0, 7), (5, 0)):
        q, k, v = rand(1, 2, L, 8, grad=True), rand(1, 2, S, 8, grad=True), rand(1, 2, S, 8, grad=True)
        out = attnkern.scaled_dot_product_attention(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v)
        assert out.shape == ref.shape and torch.equal(out, ref)
        out.sum().backward()


def test_two_dim_inputs_and_scale():
    q, k, v = rand(5, 16), rand(7, 16), rand(7, 16)
    for backend in FUSED + ["reference"]:
        with attnkern.use_backend(backend):
            out = attnkern.scaled_dot_product_attention(q, k, v, scale=0.3)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)


def test_fp32_mask_with_half_inputs():
    """torch accepts a float32 mask for half inputs; so do we, and the mask's precision is kept."""
    q, k, v = rand(1, 2, 17, 32, dtype=torch.float16), rand(1, 2, 20, 32, dtype=torch.float16), rand(
        1, 2, 20, 32, dtype=torch.float16)
    mask = torch.randn(17, 20, device=DEVICE)
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    ref_lp = attnkern.reference_attention(q, k, v, mask)[0]
    for backend in FUSED:
        out = attnkern.attention(q, k, v, attn_mask=mask, backend=backend, return_lse=False)
        assert_all([check(f"{backend} out", out, ref64, ref_lp, torch.float16)])


def test_lse_is_returned_and_consistent():
    q, k, v = rand(2, 3, 17, 16), rand(2, 3, 20, 16), rand(2, 3, 20, 16)
    out, lse = attnkern.attention(q, k, v)
    assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    assert attnkern.attention(q, k, v, return_lse=False).shape == out.shape


def test_matrix_covers_every_backend():
    """Every registered backend that runs on this device is in the shared test matrix."""
    tested = {b for b, _ in pairs()}
    runnable = {n for n in backends.names()[1:] if backends.get(n).availability(torch.device(DEVICE)) is None}
    assert runnable <= tested


def test_int64_indexing_switch():
    """Offsets of tensors spanning >= 2**31 elements switch the kernels to int64 index math."""
    from attnkern.triton.common import needs_int64

    assert not needs_int64(torch.empty(2**20, device="meta"), None)
    assert needs_int64(torch.empty(2**31 + 1, device="meta"))
    # a full (L, S) mask of 64k x 64k, read per row: the row offset alone wraps an int32
    assert needs_int64(torch.empty(65536, 1, device="meta").expand(65536, 65536).contiguous())
    assert not needs_int64(torch.empty(1, 1, device="meta").expand(65536, 65536))  # broadcast: stride 0


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_int64_indexing_path_is_correct(monkeypatch, causal, deterministic):
    """The int64 variant of every kernel computes the same thing (forced on a small problem), on both
    backward paths. The single pass's dQ is a sum of atomic additions in no fixed order: on a GPU
    it may differ in the last bits between two runs, so it is compared to rounding there."""
    import attnkern.triton.backward as bwd
    import attnkern.triton.forward as fwd

    q, k, v = rand(2, 4, 40, 16, grad=True), rand(2, 2, 33, 16, grad=True), rand(2, 2, 33, 16, grad=True)
    mask = rand(4, 40, 33, grad=True)
    results = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(fwd, "needs_int64", lambda *t: True)
            monkeypatch.setattr(bwd, "needs_int64", lambda *t: True)
        out = attnkern.attention(q, k, v, attn_mask=mask, causal=causal, enable_gqa=True, return_lse=False,
                                 backend="triton", deterministic=deterministic)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v, mask)])
        for t in (q, k, v, mask):
            t.grad = None
    for name, a, b in zip(["out", "dq", "dk", "dv", "dmask"], *results):
        if name == "dq" and not deterministic and DEVICE == "cuda":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name
