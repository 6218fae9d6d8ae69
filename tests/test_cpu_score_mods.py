"""The C++ CPU kernels drop exactly the scores attnkern/philox.py drops: their vectorized Philox (eight
counters per AVX2 register, csrc/cpu/philox_avx2.h) against the Python definition, bit for bit.

The output exposes the mask: with q = 0 every visible key gets the same probability 1/n, and with v the
identity (Ev = S) output column j is that probability times key j's dropout multiplier, so out != 0
exactly where key j is kept. (q = 0 is the construction, not a lazy input: the mods' arithmetic is checked
on random inputs by the shared cases of test_correctness.py.) On an AVX-512 processor the kernels draw with
csrc/cpu/philox_avx512.h; the AVX2 generator is checked too, in a process with ATTNKERN_CPU_PHILOX=avx2."""
import os

import pytest
import torch

import attnkern
from attnkern.backends import extension
from attnkern.philox import dropout_draws, dropout_multiplier, dropout_threshold
from isolated import run_isolated
from matrix import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cpu" or extension.EXTENSION_ERROR is not None,
                                reason="the C++ CPU kernels run on CPU tensors")

# (B, Hq, L, S, window, seed, offset): columns not a multiple of 32 (a partial Philox batch), seeds with
# both key words set (negative int64 included), offsets past 2^31, windows whose key tiles start past 0.
CASES = {
    "small_odd_columns": (2, 3, 37, 45, None, 1234, 7),
    "negative_seed_big_offset": (1, 2, 70, 130, None, -987654321987, 3_000_000_000),
    "window_tiles_past_zero": (1, 2, 600, 600, (40, 0), 2**40 + 5, 11),
}


def _kept_by_kernel(B, Hq, L, S, window, rng, p, dtype):
    q = torch.zeros(B, Hq, L, S, dtype=dtype)
    k = torch.randn(B, Hq, S, S, dtype=dtype)
    v = torch.eye(S, dtype=dtype).expand(B, Hq, S, S)
    with torch.no_grad():
        out, _ = attnkern.attention(q, k, v, causal=window is not None, window=window, dropout_p=p,
                                    dropout_rng=rng, backend="cpu")
    return out != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # the AVX2 path and the generic one
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_dropout_mask_is_philox_py(case, dtype):
    B, Hq, L, S, window, seed, offset = CASES[case]
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    p = 0.5
    kept = dropout_multiplier(rng, p, B, Hq, L, S, torch.float32) != 0
    if window is not None:  # keys outside the causal window show 0 whatever their draw
        i = torch.arange(L).view(L, 1)
        j = torch.arange(S).view(1, S)
        kept &= (j <= i) & (j >= i - window[0])
    got = _kept_by_kernel(B, Hq, L, S, window, rng, p, dtype)
    mismatch = (got != kept).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} scores dropped differently, first at {mismatch[0].tolist()}"


def test_kernel_keep_rate_and_threshold_edges():
    rng = torch.tensor([42, 0], dtype=torch.int64)
    B, Hq, L, S = 1, 2, 64, 256
    for p in (0.1, 0.9):
        kept = _kept_by_kernel(B, Hq, L, S, None, rng, p, torch.float32)
        n = kept.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma, f"keep rate at p={p}"
        # exactly the draws at or above the threshold, including the ones nearest it
        draws = dropout_draws(rng, B, Hq, L, S)
        assert torch.equal(kept, draws >= dropout_threshold(p))


@pytest.mark.parametrize("mods", [
    dict(softcap=0.7),
    dict(alibi=True),
    dict(dropout_p=0.3),
    dict(softcap=1.5, alibi=True, dropout_p=0.4),
], ids=lambda m: "+".join(m))
def test_gradcheck_float64_with_mods(mods):
    """Forward and backward agree (the backward regenerates the forward's dropout mask, and the
    softcap's and ALiBi's derivatives are the forward's): float64 gradcheck with a fixed rng, a float
    mask (its gradient included) and GQA."""
    gen = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()

    q, k, v, mask = r(2, 2, 6, 5), r(2, 1, 9, 5), r(2, 1, 9, 4), r(2, 6, 9)
    slopes = torch.tensor([0.3, 0.05], dtype=torch.float32) if mods.get("alibi") else None
    rng = torch.tensor([77, 5], dtype=torch.int64)

    def fn(q, k, v, mask):
        out, lse = attnkern.attention(q, k, v, attn_mask=mask, causal="bottom_right", enable_gqa=True,
                                      softcap=mods.get("softcap"), alibi_slopes=slopes,
                                      dropout_p=mods.get("dropout_p", 0.0), dropout_rng=rng, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, mask), atol=1e-7, rtol=1e-6)


@pytest.mark.skipif(os.environ.get("ATTNKERN_CPU_PHILOX") == "avx2", reason="this run is the AVX2 one")
def test_the_avx2_generator_where_avx512_would_run(monkeypatch):
    """The kernels pick their generator once per process (AVX-512 where the processor has it,
    csrc/cpu/philox_avx512.h); ATTNKERN_CPU_PHILOX=avx2 keeps the AVX2 one. A fresh process with it set
    runs the mask checks above, so both generators are held to attnkern/philox.py on such a processor."""
    monkeypatch.setenv("ATTNKERN_CPU_PHILOX", "avx2")
    res = run_isolated(f"""
        import sys, pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", {__file__!r},
                              "-k", "mask_is_philox_py or keep_rate"]))
    """)
    assert " passed" in res.stdout and "failed" not in res.stdout, res.stdout
