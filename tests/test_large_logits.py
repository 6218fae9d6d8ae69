"""Large logits (|score| up to ~3e6): the backward's probabilities are the forward's, and the gradients
stay within the tolerance rule wherever the float64 reference is finite.

At |score| ~ 3e6 one float32 rounding step of a score is 0.25, which moves P by 28%. So the backward
must recompute exactly the forward's scores (same operands, same order, scale applied the same way)
and subtract exactly the forward's row maxima; it cannot rely on the scores being close.

Two kinds of check:
- P consistency on random (inexactly rounded) scores: with V = I (Ev = S) the output *is* the forward's
  P, so dV = Pᵀ dO must equal outᵀ dO computed from the forward's own output, whatever the rounding.
- the tolerance rule against the float64 reference, on inputs whose scores are exact in float32
  (integers and quarters below 2^22), so that the reference and the kernels see the same scores.
"""
import pytest
import torch

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from matrix import DEVICE, pair_id, pairs

F32, F64 = torch.float32, torch.float64
# dV against outᵀ dO: both sides round P once to the input dtype (out is stored in it; the kernels
# multiply dO by P cast to it), so the bound is a few roundings of that dtype; a backward whose P
# drifted by one score rounding step at these magnitudes is off by 10% or more.
P_CONSISTENCY_BOUND = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _random_large_logits(how: str, magnitude: float, dtype, B=2, Hq=4, Hkv=2, L=45, S=37, E=16):
    """q, k, scale, mask with |scores| about `magnitude` and differences within a row of order 1 (so the
    softmax is not one-hot), from large q/k, a large scale or a large float mask."""
    g = torch.Generator().manual_seed(hash((how, magnitude)) % 2**31)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    k0 = rn(1, 1, 1, E)
    mask, scale = None, 1.0 / E**0.5
    if how == "qk":  # s = q.k0 (huge) + q.delta (order 1)
        a = magnitude / 4.0
        q, k = rn(B, Hq, L, E) * a, k0 + rn(B, Hkv, S, E) / a
    elif how == "scale":
        a = magnitude / 4.0
        q, k, scale = rn(B, Hq, L, E), k0 + rn(B, Hkv, S, E) / a, a
    else:  # "mask": a row offset of +-magnitude plus order-1 differences
        q, k = rn(B, Hq, L, E), rn(B, Hkv, S, E)
        mask = (torch.sign(rn(1, Hq, L, 1)) * magnitude + rn(1, Hq, L, S)).to(F32)
    return q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), scale, (mask.to(DEVICE) if mask is not None else None)


CASES = [("qk", 3e3), ("qk", 3e5), ("qk", 3e6), ("scale", 3e3), ("scale", 3e5), ("scale", 3e6),
         ("mask", 3e3), ("mask", 3e5), ("mask", 3e6)]


@pytest.mark.parametrize("how,magnitude", CASES, ids=[f"{h}-{m:g}" for h, m in CASES])
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_backward_probabilities_are_the_forwards(pair, how, magnitude):
    backend, dtype = pair
    if how == "qk" and dtype != F32 and magnitude > 3e3:
        pytest.skip("q entries of |score|/4 overflow float16 and lose all digits in bfloat16")
    q, k, scale, mask = _random_large_logits(how, magnitude, dtype)
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    v = torch.eye(S, device=DEVICE, dtype=dtype).expand(B, Hkv, S, S).contiguous()
    do = torch.randn(B, Hq, L, S, device=DEVICE).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnkern.attention(*leaves, attn_mask=mask, scale=scale, enable_gqa=True, backend=backend,
                             return_lse=False)
    dq, dk, dv = torch.autograd.grad(out, leaves, do)
    P = out.detach().to(F64)
    assert torch.isfinite(P).all()
    want = (P.transpose(-1, -2) @ do.to(F64)).view(B, Hkv, Hq // Hkv, S, S).sum(2)
    err = ((dv.to(F64) - want).norm() / want.norm()).item()
    assert err <= P_CONSISTENCY_BOUND[dtype], f"{backend} {dtype}: dV differs from P_fwdᵀ dO by {err:.2e}"
    # (dQ and dK scale with the scale and the inputs: here they may exceed half precision's range.)
    if dtype == F32:
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def _exact_large_logits(how: str, B=1, Hq=2, Hkv=1, L=29, S=23, E=8):
    """q, k, mask, scale whose scores are exact in float32 (and float16) arithmetic: integers, or quarters
    near 3e6 (float32's spacing there), with row differences of a few units; or, for "scale", small
    integer dots times 2^18 (rows one-hot or split between tied keys). Returns also the per-row offset
    that, subtracted from the mask, gives the same softmax with small scores."""
    g = torch.Generator().manual_seed(7)
    small = lambda *s: torch.randint(-1, 2, s, generator=g).to(F32)  # noqa: E731
    q, k = small(B, Hq, L, E), small(B, Hkv, S, E)
    offset = torch.zeros(1, Hq, L, 1)
    mask, scale = None, 1.0
    if how == "scale":
        scale = 2.0**18
    elif how == "qk":  # first column: 1000 + i times 3000, about 3e6
        q[..., 0] = 1000 + torch.arange(L, dtype=F32)
        k[..., 0] = 3000
    else:  # mask: +-3e6 + small integer per row, plus quarters
        offset = torch.sign(torch.randn(1, Hq, L, 1, generator=g)) * 3e6 + torch.randint(-50, 50, (1, Hq, L, 1),
                                                                                        generator=g)
        mask = offset + torch.randint(-8, 9, (1, Hq, L, S), generator=g) / 4.0
    return q, k, mask, scale, offset


@pytest.mark.parametrize("how", ["qk", "scale", "mask"])
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_gradients_at_large_exact_logits_meet_the_tolerance_rule(pair, how):
    backend, dtype = pair
    if how == "qk" and dtype != F32:
        pytest.skip("the half-precision reference (ref_lp) cannot hold q.k of 3e6, and no shift removes it")
    if how == "scale" and dtype != F32:
        pytest.skip("dQ and dK of scale 2^18 exceed half precision's range")
    q, k, mask, scale, offset = _exact_large_logits(how)
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    v = torch.randn(B, Hkv, S, 16)
    do = torch.randn(B, Hq, L, 16)
    q, k, v, do = (t.to(dtype).to(DEVICE) for t in (q, k, v, do))
    mask = mask.to(DEVICE) if mask is not None else None

    def run(dtype_, mask_, **kw):
        leaves = [t.detach().to(dtype_).requires_grad_() for t in (q, k, v)]
        if kw.get("backend"):
            out = attnkern.attention(*leaves, attn_mask=mask_, scale=scale, enable_gqa=True, return_lse=False, **kw)
        else:
            out = reference_attention(*leaves, mask_, scale=scale, enable_gqa=True)[0]
        return (out, *torch.autograd.grad(out, leaves, do.to(dtype_)))

    got = run(dtype, mask, backend=backend)
    ref64 = run(F64, mask.to(F64) if mask is not None else None)
    # The half-precision error budget: the same softmax with the row offsets removed from the mask
    # (softmax is shift invariant), since half precision cannot hold scores of 3e6 at all.
    ref_lp = run(dtype, (mask - offset.to(DEVICE)).to(dtype) if mask is not None else None)
    assert torch.isfinite(torch.cat([t.flatten().to(F64) for t in ref64])).all()
    names = ("out", "dq", "dk", "dv")
    # With large q·k every key shares one huge component k[..., 0] = 3000, and dQ = dS K sums it against
    # a dS whose rows sum to 0: the exact dQ[..., 0] is 0, any float32 evaluation leaves 3000 × rounding
    # there (the reference run in float32 too), so the relative norm measures cancellation, not the
    # kernel. dQ at these scores is checked by the mask cases, whose scores are as large.
    skip = {"dq"} if how == "qk" else set()
    assert_all([check(f"{backend} {n}", g_, r64, rlp, dtype, 2.0 if n == "out" else 3.0)
                for n, g_, r64, rlp in zip(names, got, ref64, ref_lp) if n not in skip])
