"""Gradients of float masks that broadcast over the key dim (scalar, per-head, per-query, per-(batch, head)
biases) pass the tolerance rule in every dtype, with and without a gradient of the returned lse.

Such a gradient is Σ_j dS_ij = Σ_j P_ij (dP_ij − delta_i), which is exactly dlse_i: summed naively it is a
cancellation of large terms, and delta's float32 rounding (it is formed from O) came out as noise far
above the rule (issue 10). The kernels form it as A (1 − B) + dlse B with A = Σ_j P dP, B = Σ_j P.
The cases include fully masked rows (a −inf per-query bias entry; bottom-right causal alignment with more
queries than keys), whose gradient is 0.
"""
import pytest
import torch

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import check
from matrix import DEVICE, pair_id, pairs

B, H, L, S, E = 2, 3, 29, 21, 16
BIAS_SHAPES = {"scalar": (1, 1), "per_head": (H, 1, 1), "per_query": (L, 1), "per_batch_head": (B, H, 1, 1)}


def _grads(q, k, v, mask, do, dlse, dtype, backend, causal):
    """(out, lse, [dq, dk, dv, dmask]) of attnkern (backend given) or of the reference run in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, mask)]
    if backend is None:
        out, lse = reference_attention(*leaves, causal=causal, enable_gqa=True)
    else:
        out, lse = attnkern.attention(*leaves[:3], attn_mask=leaves[3], causal=causal, enable_gqa=True,
                                      backend=backend, return_lse=True)
    if dlse is None:
        out.backward(do.to(dtype))
    else:
        torch.autograd.backward([out, lse], [do.to(dtype), dlse.to(lse.dtype)])
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("bias", list(BIAS_SHAPES))
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_key_broadcast_mask_gradient_passes_the_tolerance_rule(pair, bias, with_dlse, causal):
    backend, dtype = pair
    gen = torch.Generator().manual_seed(23)
    # Bottom-right alignment with L > S leaves the first L - S query rows without a key.
    q = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H, S, E, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.randn(*BIAS_SHAPES[bias], generator=gen, dtype=torch.float64)
    if bias == "per_query":
        mask[[3, 17]] = float("-inf")  # rows masked whole by the bias itself
    do = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64)
    dlse = torch.randn(B, H, L, generator=gen, dtype=torch.float64) if with_dlse else None
    q, k, v, mask, do = (t.to(DEVICE) for t in (q, k, v, mask, do))
    dlse = dlse.to(DEVICE) if dlse is not None else None

    out, grads = _grads(q, k, v, mask, do, dlse, dtype, backend, causal)
    out64, grads64 = _grads(q, k, v, mask, do, dlse, torch.float64, None, causal)
    out_lp, grads_lp = _grads(q, k, v, mask, do, dlse, dtype, None, causal)
    failures = [check("out", out, out64, out_lp, dtype)]
    failures += [check(n, g, g64, glp, dtype, factor=3.0)
                 for n, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp)]
    failures = [f for f in failures if f]
    assert not failures, failures
    dmask, dmask64 = grads[3], grads64[3]
    assert torch.isfinite(dmask).all(), dmask
    if bias == "per_query":
        assert dmask64[[3, 17]].abs().max() == 0
        assert dmask[[3, 17]].abs().max() == 0, "a fully masked row's bias gradient is exactly 0"
        if causal:
            assert dmask[: L - S].abs().max() == 0, "rows that see no key have a bias gradient of exactly 0"
