"""Attention sinks (`attention(sinks=...)`, gpt-oss): one logit per query head that joins every row's
softmax denominator. Every backend serves them through its log-sum-exp (attnkern/sinks.py); checked
here against the naive form (reference_attention(sinks=...): the sink as an extra score column), output,
lse and every gradient including the sinks', by the tolerance rule, on the backend x dtype matrix."""
import pytest
import torch

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from cases import Case, as_kwargs, detached, grad_leaves, make_inputs
from matrix import DEVICE, pair_id, pairs

CASES = [
    Case("sinks_plain", L=17, S=40, E=16, Hq=4, Hkv=2),
    Case("sinks_causal_br_masked_rows", L=40, S=17, E=32, causal="bottom_right", mask="float_grad",
         mask_dims="hls", masked_rows=(3,)),
    Case("sinks_window_bool", L=33, S=33, E=16, B=2, causal="top_left", window=(5, -1), mask="bool",
         mask_dims="ls", masked_rows=(7,)),
    Case("sinks_rank3", L=9, S=23, E=40, rank=3, Hq=3),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_sinks_match_the_naive_form(pair, case):
    backend, dtype = pair
    q, k, v, mask = make_inputs(case, dtype, DEVICE, seed=11)
    sinks = (torch.randn(case.Hq, generator=torch.Generator().manual_seed(4)) * 2).to(DEVICE).requires_grad_()
    out, lse = attnkern.attention(q, k, v, attn_mask=mask, sinks=sinks, backend=backend, **as_kwargs(case, q.device))
    gen = torch.Generator().manual_seed(5)
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    dl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(DEVICE, lse.dtype)
    leaves = grad_leaves(q, k, v, mask) + [sinks]
    grads = torch.autograd.grad([out, lse], leaves, [do, dl])

    def ref(dt):
        rq, rk, rv, rm = detached(q, k, v, mask, dt)
        rs = sinks.detach().to(dt if dt == torch.float64 else torch.float32).requires_grad_()
        ls = grad_leaves(rq, rk, rv, rm) + [rs]
        o, l = reference_attention(rq, rk, rv, rm, sinks=rs, **as_kwargs(case, q.device))
        return o, l, torch.autograd.grad([o, l], ls, [do.to(o.dtype), dl.to(l.dtype)])

    o64, l64, g64 = ref(torch.float64)
    olp, llp, glp = ref(dtype)
    names = ["dq", "dk", "dv"] + (["dmask"] if len(leaves) == 5 else []) + ["dsinks"]
    assert_all([check("out", out, o64, olp, dtype), check("lse", lse, l64, llp, dtype),
                *[check(n, g, a, b, dtype, factor=3.0) for n, g, a, b in zip(names, grads, g64, glp)]])
    for r in case.masked_rows:  # the sink takes the whole row: output 0, lse = the sink
        assert torch.all(out[..., r, :] == 0)
        torch.testing.assert_close(lse[..., r], sinks.detach().to(lse.dtype).expand_as(lse[..., r]))


def test_bad_sinks_are_clear_errors():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\) \(one logit per query head\), got \(2,\)"):
        attnkern.attention(q, q, q, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="sinks must be a float tensor"):
        attnkern.attention(q, q, q, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"sinks must be a torch.Tensor of shape \(4,\) or None"):
        attnkern.attention(q, q, q, sinks=[0.0] * 4)
