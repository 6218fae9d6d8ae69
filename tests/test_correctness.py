"""Every backend × dtype × shared case: the output, the log-sum-exp and every gradient (dq, dk, dv and
the mask's) against the float64 reference by the tolerance rule; then parity with torch's own SDPA."""
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern.reference import reference_attention
from cases import as_kwargs, cases, make_inputs, upstream_grads
from cases import detached as _detached, grad_leaves as _leaves, run_reference as _run_reference
from matrix import DEVICE, pair_id, pairs
from attnkern.tolerance import assert_all, check

CASES = cases(DEVICE)
# torch's SDPA has no soft-capping and draws its own dropout masks: those cases are checked against
# hand-written float64 math in test_score_mods.py instead.
SDPA_CASES = [c for c in CASES if not (c.softcap or c.alibi != "none" or c.dropout)]
# Inputs are fresh random draws per case; ATTNKERN_TEST_SEED shifts them all to re-run on new data.
SEED = int(os.environ.get("ATTNKERN_TEST_SEED", "0"))


def seed_for(name: str) -> int:
    return SEED + zlib.crc32(name.encode()) % 100_000


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_matches_float64_reference(pair, case):
    backend, dtype = pair
    q, k, v, mask = make_inputs(case, dtype, DEVICE, seed=seed_for(case.name))
    out, lse = attnkern.attention(q, k, v, attn_mask=mask, backend=backend, **as_kwargs(case, q.device))
    do, dlse = upstream_grads(out, lse)
    torch.autograd.backward([out, lse], [do, dlse])
    grads = [t.grad for t in _leaves(q, k, v, mask)]

    out64, lse64, grads64 = _run_reference(q, k, v, mask, case, torch.float64, do, dlse)
    out_lp, lse_lp, grads_lp = _run_reference(q, k, v, mask, case, dtype, do, dlse)

    names = ["dq", "dk", "dv", "dmask"]
    assert_all([
        check("out", out, out64, out_lp, dtype),
        check("lse", lse, lse64, lse_lp, dtype),
        *[check(n, g, g64, glp, dtype, factor=3.0) for n, g, g64, glp in zip(names, grads, grads64, grads_lp)],
    ])
    assert out.dtype == dtype and lse.dtype == torch.float32

    if case.masked_rows or case.causal == "bottom_right" and case.L > case.S:
        rows = list(case.masked_rows) or list(range(case.L - case.S))
        assert torch.all(out[..., rows, :] == 0), "fully masked rows must give exactly 0"
        assert torch.all(torch.isneginf(lse[..., rows])), "fully masked rows have lse = -inf"
        assert torch.all(q.grad[..., rows, :] == 0), "fully masked rows must get exactly 0 gradient"


def _torch_equivalent_mask(case, mask, L, S, device):
    """A mask that makes torch's SDPA compute `case` on every torch backend: torch has no bottom-right
    is_causal and no window, and its math backend (float64) refuses attn_mask together with is_causal.
    The allowed pairs are built by hand here, independently of band.py."""
    if case.window is None and (case.causal == "none" or (mask is None and case.causal == "top_left")):
        return mask
    offset = 0 if case.causal == "top_left" else S - L
    rows = torch.arange(L, device=device)[:, None] + offset
    cols = torch.arange(S, device=device)[None, :]
    left, right = case.window if case.window is not None else (-1, -1)
    if case.causal != "none":
        right = 0
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= cols <= rows + right
    if left >= 0:
        allowed &= cols >= rows - left
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask + torch.zeros(L, S, dtype=mask.dtype, device=device).masked_fill(~allowed, float("-inf"))


def _run_torch(q, k, v, mask, case, dtype, do):
    q, k, v, mask = _detached(q, k, v, mask, dtype)
    tmask = _torch_equivalent_mask(case, mask, case.L, case.S, q.device)
    is_causal = case.causal == "top_left" and mask is None and case.window is None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tmask, is_causal=is_causal, enable_gqa=case.enable_gqa)
    out.backward(do.to(dtype))
    return out, [t.grad for t in _leaves(q, k, v, mask)]


@pytest.mark.parametrize("case", SDPA_CASES, ids=str)
def test_reference_oracle_is_torch_sdpa_in_float64(case):
    """The oracle itself: reference.py in float64 computes exactly torch's SDPA semantics (masks,
    broadcasting, GQA, causal alignments, fully masked rows), output and every gradient."""
    q, k, v, mask = make_inputs(case, torch.float64, DEVICE, seed=seed_for("oracle" + case.name))
    do = torch.randn(q.shape[:-1] + (case.ev,), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours, ours_grads = _run_reference_sdpa(q, k, v, mask, case, do.to(DEVICE))
    theirs, their_grads = _run_torch(q, k, v, mask, case, torch.float64, do.to(DEVICE))
    for name, a, b in zip(["out", "dq", "dk", "dv", "dmask"], [ours, *ours_grads], [theirs, *their_grads]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _run_reference_sdpa(q, k, v, mask, case, do):
    q, k, v, mask = _detached(q, k, v, mask, torch.float64)
    out, _ = reference_attention(q, k, v, mask, **as_kwargs(case, q.device))
    out.backward(do)
    return out, [t.grad for t in _leaves(q, k, v, mask)]


@pytest.mark.parametrize("case", SDPA_CASES, ids=str)
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_sdpa_parity_with_torch(pair, case):
    """attnkern.scaled_dot_product_attention against torch's: torch's float64 SDPA is the oracle, and the
    error budget is the tolerance rule's (reference.py in the input dtype; reference.py is pinned to torch's
    float64 SDPA by the test above). torch's own low-precision CPU path is no budget for a flash-style
    backward: it differentiates the rounded softmax exactly, where every fused kernel recomputes the
    probabilities and forms delta = rowsum(dO·O) from the output (and its rounding residual)."""
    backend, dtype = pair
    q, k, v, mask = make_inputs(case, dtype, DEVICE, seed=seed_for("parity" + case.name))
    with attnkern.use_backend(backend):
        if case.causal == "bottom_right" or case.window is not None:  # not expressible through SDPA's signature
            out = attnkern.attention(q, k, v, attn_mask=mask, return_lse=False, **as_kwargs(case, q.device))
        else:
            out = attnkern.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=case.causal == "top_left", enable_gqa=case.enable_gqa)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    do = do.to(out.device, out.dtype)
    out.backward(do)
    grads = [t.grad for t in _leaves(q, k, v, mask)]
    out64, grads64 = _run_torch(q, k, v, mask, case, torch.float64, do)
    out_lp, _, grads_lp = _run_reference(q, k, v, mask, case, dtype, do, None)
    names = ["dq", "dk", "dv", "dmask"]
    assert_all([
        check("out", out, out64, out_lp, dtype),
        *[check(n, g, g64, glp, dtype, factor=3.0) for n, g, g64, glp in zip(names, grads, grads64, grads_lp)],
    ])
