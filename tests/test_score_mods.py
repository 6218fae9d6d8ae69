"""Soft-capping, ALiBi and fused dropout (score_mods.py, philox.py): the generator, the dropout mask's
statistics, the reference's math against hand-written float64 formulas, gradients with a fixed seed,
reproducibility under torch.manual_seed, and bad input. Every backend is compared with the reference on
the shared cases (tests/cases.py) in test_correctness.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern import philox
from attnkern.reference import reference_attention
from matrix import DEVICE, FUSED

F64 = torch.float64


# ------------------------------------------------------------------------------------------ Philox

@pytest.mark.parametrize("counter,key,want", [
    # Known answers of Philox4x32-10 (Random123's kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_known_answers(counter, key, want):
    c = [torch.tensor([x], dtype=torch.int64) for x in counter]
    got = philox.philox4x32(*c, *key)
    assert tuple(int(x) for x in got) == want


def test_dropout_draws_use_every_lane_of_a_counter():
    """Columns 4c .. 4c + 3 take the four words of one Philox call, in order."""
    rng = torch.tensor([0x1234_5678_9ABC, 99])
    draws = philox.dropout_draws(rng, 2, 3, 5, 10)
    seed, offset = 0x1234_5678_9ABC, 99
    b, h, i, c = 1, 2, 4, 1
    words = philox.philox4x32(*(torch.tensor([x]) for x in (c, i, b * 3 + h, offset)),
                              seed & 0xFFFFFFFF, seed >> 32)
    assert [int(draws[b, h, i, 4 * c + n]) for n in range(4)] == [int(w) for w in words]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_independence(p):
    """The keep rate is 1 - p within 5 standard deviations, per lane and per slice, and neighbouring
    scores are uncorrelated."""
    B, H, L, S = 2, 4, 64, 128
    kept = philox.dropout_multiplier(torch.tensor([7, 3]), p, B, H, L, S, F64) > 0
    n = kept.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sd
    for lane in range(4):  # each word of a Philox call
        sub = kept[..., lane::4]
        assert abs(sub.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / sub.numel())
    x = kept.double() - (1 - p)
    for a, b in ((x[..., 1:], x[..., :-1]), (x[..., 1:, :], x[..., :-1, :]), (x[:, 1:], x[:, :-1])):
        corr = (a * b).mean().item() / (p * (1 - p))
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_dropout_thresholds():
    assert philox.dropout_threshold(0.0) == 0
    assert philox.dropout_threshold(0.5) == 1 << 31
    assert philox.dropout_threshold(1.0) == (1 << 32) - 1
    assert philox.dropout_scale(0.25) == pytest.approx(4 / 3) and philox.dropout_scale(1.0) == 0.0


# ------------------------------------------------------------------------- the reference's math

def _inputs(B=2, H=3, L=9, S=13, E=8, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, E, generator=g, dtype=dtype) for n in (L, S, S)]


def test_reference_softcap_and_alibi_equal_handwritten_formulas():
    q, k, v = _inputs()
    L, S = q.shape[2], k.shape[2]
    slopes = torch.tensor([0.5, 0.25, 0.125])
    mask = torch.randn(L, S, dtype=F64)
    out, lse = reference_attention(q, k, v, mask, softcap=1.5, alibi_slopes=slopes, causal="bottom_right")
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = 1.5 * torch.tanh(s / 1.5)
    dist = torch.tensor([[abs(i + S - L - j) for j in range(S)] for i in range(L)], dtype=F64)
    s = s - slopes.double().view(3, 1, 1) * dist + mask
    s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril(S - L).logical_not(), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_reference_alibi_equals_sdpa_with_the_bias_as_a_mask():
    q, k, v = _inputs(L=17, S=5)  # Lq > Lk: the distance is bottom-right aligned
    L, S = 17, 5
    slopes = torch.rand(2, 3)  # per batch element
    i, j = torch.arange(L).view(L, 1), torch.arange(S).view(1, S)
    bias = -slopes.double().view(2, 3, 1, 1) * (i + S - L - j).abs().double()
    out, _ = reference_attention(q, k, v, alibi_slopes=slopes)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-12, atol=1e-12)


def test_reference_dropout_drops_the_philox_mask_and_rescales():
    q, k, v = _inputs()
    rng = torch.tensor([123, 4])
    out, lse = reference_attention(q, k, v, dropout_p=0.3, dropout_rng=rng)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    z = philox.dropout_multiplier(rng, 0.3, 2, 3, 9, 13, F64)
    torch.testing.assert_close(out, (p * z) @ v, rtol=1e-12, atol=1e-12)
    _, lse0 = reference_attention(q, k, v)
    assert torch.equal(lse, lse0), "the lse is the undropped softmax's"


# ----------------------------------------------------------------------------- through attention()

def test_gradcheck_with_every_variant_and_a_fixed_seed():
    """Forward and backward agree (finite differences) with softcap, ALiBi and dropout together: the
    backward regenerates the forward's mask from the same rng."""
    q, k, v = (t.requires_grad_() for t in _inputs(B=1, H=2, L=5, S=7, E=4))
    mask = torch.randn(5, 7, dtype=F64, requires_grad=True)
    slopes, rng = torch.tensor([0.3, 0.7]), torch.tensor([5, 6])

    def fn(q, k, v, mask):
        return attnkern.attention(q, k, v, attn_mask=mask, softcap=2.0, alibi_slopes=slopes, dropout_p=0.4,
                                  dropout_rng=rng, causal="bottom_right", backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_dropout_is_reproducible_under_manual_seed_and_advances_the_generator(backend):
    q, k, v = _inputs(B=1, H=2, L=8, S=8, E=16, dtype=torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    torch.manual_seed(0)
    a = attnkern.attention(q, k, v, dropout_p=0.5, backend=backend)[0]
    b = attnkern.attention(q, k, v, dropout_p=0.5, backend=backend)[0]
    torch.manual_seed(0)
    a2 = attnkern.attention(q, k, v, dropout_p=0.5, backend=backend)[0]
    assert torch.equal(a, a2), "the same seed gives the same mask"
    assert not torch.equal(a, b), "each call draws a new mask (the generator advances)"


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_dropout_is_unbiased(backend):
    """Averaged over many masks, the dropped output is the output without dropout (to a few standard
    errors)."""
    q, k, v = _inputs(B=1, H=1, L=4, S=32, E=8, dtype=torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    want = attnkern.attention(q, k, v, backend="reference")[0]
    torch.manual_seed(1)
    n = 400
    outs = torch.stack([attnkern.attention(q, k, v, dropout_p=0.25, backend=backend)[0] for _ in range(n)])
    err = (outs.mean(0) - want).abs()
    se = outs.std(0) / math.sqrt(n)
    assert torch.all(err < 5 * se + 1e-6), (err.max().item(), se.max().item())


def test_sdpa_dropout_runs_through_the_ops_like_attention():
    """scaled_dot_product_attention(dropout_p > 0) takes the custom ops like attention(): with the same
    seed both draw the same mask; explain names the variant and draws nothing."""
    q, k, v = _inputs(B=1, H=2, L=6, S=6, E=8, dtype=torch.float32)
    state = torch.get_rng_state()
    e = attnkern.explain(q, k, v, dropout_p=0.1)
    assert "dropout_p=0.1" in e.problem
    assert torch.equal(state, torch.get_rng_state()), "explain draws no dropout mask"
    with attnkern.use_backend("reference"):
        torch.manual_seed(3)
        a = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = attnkern.attention(q, k, v, dropout_p=0.3, backend="reference", return_lse=False)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw,match", [
    (dict(softcap=-1.0), "softcap must be None or a finite float >= 0"),
    (dict(softcap=float("inf")), "softcap must be"),
    (dict(alibi_slopes=torch.ones(5)), r"alibi_slopes must have shape \(Hq,\) = \(3,\)"),
    (dict(alibi_slopes=torch.ones(2, 4)), r"alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(3, dtype=F64)), "alibi_slopes must be float32"),
    (dict(alibi_slopes=[0.5, 0.5, 0.5]), "alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(3, requires_grad=True)), "alibi_slopes get no gradient"),
    (dict(dropout_p=0.5, dropout_rng=torch.zeros(3, dtype=torch.int64)), "dropout_rng must be an int64 tensor"),
    (dict(dropout_p=0.5, dropout_rng=(1, 2)), "dropout_rng must be a torch.Tensor"),
])
def test_bad_variant_arguments_are_clear_errors(kw, match):
    q, k, v = _inputs(B=2, H=3, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        attnkern.attention(q, k, v, **kw)


@pytest.mark.parametrize("backend", FUSED)
def test_explain_lists_the_variants_and_every_fused_backend_takes_them(backend):
    q, k, v = (t.to(DEVICE) for t in _inputs(dtype=torch.float32))
    e = attnkern.explain(q, k, v, softcap=30.0, alibi_slopes=torch.ones(3, device=DEVICE), dropout_p=0.1,
                         backend=backend)
    assert "softcap=30" in e.problem and "alibi_slopes(1, 3)" in e.problem and "dropout_p=0.1" in e.problem
    assert e.backend == backend and not e.fallback, e.reason
