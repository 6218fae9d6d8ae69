"""Half-precision mask gradients are float32-accurate: the backward's delta = rowsum(dO·O) is formed from
the output and its rounding residual (out_lo, saved by the forward when a gradient will be needed), not
from the rounded float16/bfloat16 output alone, which left rounding noise of order 1e-2 in gradients
that are exactly 0 (a per-query bias's) and failed the tolerance rule on random mask-gradient cases."""
import random

import pytest
import torch

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import check
from matrix import DEVICE, pair_id, pairs

HALF_PAIRS = [p for p in pairs() if p[1] in (torch.float16, torch.bfloat16)]


def _grads(q, k, v, mask, dtype, do, backend=None, causal=False):
    """(out, [dq, dk, dv, dmask]) of attnkern (backend given) or of the reference run in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, mask)]
    if backend is None:
        out = reference_attention(*leaves, causal=causal, enable_gqa=True)[0]
    else:
        out = attnkern.attention(*leaves[:3], attn_mask=leaves[3], causal=causal, enable_gqa=True,
                                 backend=backend, return_lse=False)
    out.backward(do.to(dtype))
    return out, [t.grad for t in leaves]


def _compare(backend, dtype, q, k, v, mask, do, causal=False):
    out, grads = _grads(q, k, v, mask, dtype, do, backend, causal)
    out64, grads64 = _grads(q, k, v, mask, torch.float64, do, None, causal)
    out_lp, grads_lp = _grads(q, k, v, mask, dtype, do, None, causal)
    failures = [check("out", out, out64, out_lp, dtype)]
    failures += [check(n, g, g64, glp, dtype, factor=3.0)
                 for n, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp)]
    return [f for f in failures if f], grads[3], grads64[3]


@pytest.mark.parametrize("bias", ["per_query", "per_key"])
@pytest.mark.parametrize("pair", HALF_PAIRS, ids=pair_id)
def test_half_precision_bias_gradient_is_float32_accurate(pair, bias):
    backend, dtype = pair
    gen = torch.Generator().manual_seed(11)
    B, H, L, S, E = 2, 3, 45, 37, 32
    q, k, v = (torch.randn(B, H, n, E, generator=gen, dtype=torch.float64).to(DEVICE) for n in (L, S, S))
    shape = (L, 1) if bias == "per_query" else (1, S)
    mask = torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)
    do = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64).to(DEVICE)
    failures, dmask, dmask64 = _compare(backend, dtype, q, k, v, mask, do)
    assert not failures, failures
    if bias == "per_query":
        # Softmax is shift invariant per row: the exact gradient is 0. From the rounded output alone the
        # kernels gave ~1e-2 here; the fused fp16 Triton forward multiplies V by float16-rounded
        # probabilities, which leaves ~1e-3 of its own. Unit-scale inputs.
        assert dmask64.abs().max() < 1e-12
        bound = 2e-3 if backend == "triton" else 1e-4
        assert dmask.abs().max().item() < bound, f"per-query bias gradient {dmask.abs().max().item():.2e}"


def _random_case(seed):
    """Shapes, GQA, causal alignment and a float mask of a random broadcast shape, all drawn from `seed`."""
    rnd = random.Random(seed)
    B, Hkv = rnd.randint(1, 2), rnd.randint(1, 2)
    Hq = Hkv * rnd.randint(1, 2)
    L, S, E = rnd.randint(1, 40), rnd.randint(1, 40), rnd.choice([8, 16, 24, 32])
    full = {"b": B, "h": Hq, "l": L, "s": S}
    mask_shape = tuple(full[d] if rnd.random() < 0.5 else 1 for d in "bhls")
    causal = rnd.choice([False, False, "top_left", "bottom_right"])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, E, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.randn(*mask_shape, generator=gen, dtype=torch.float64)
    do = torch.randn(B, Hq, L, E, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, mask, do)], causal


@pytest.mark.parametrize("pair", HALF_PAIRS, ids=pair_id)
def test_random_half_precision_mask_gradients_pass_the_tolerance_rule(pair):
    backend, dtype = pair
    seeds = range(32) if backend != "triton" or DEVICE != "cpu" else range(12)  # the interpreter is slow
    failed = {}
    for seed in seeds:
        (q, k, v, mask, do), causal = _random_case(1000 + seed)
        failures, _, _ = _compare(backend, dtype, q, k, v, mask, do, causal)
        if failures:
            failed[seed] = failures
    assert not failed, f"{len(failed)} of {len(seeds)} cases fail: {failed}"
