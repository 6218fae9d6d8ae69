"""Attention functions with torch's SDPA signature, right and deliberately wrong, for the gradient
validator's tests (also importable as `--fn attention_fns:NAME` by `attnkern check-grads`).

Each runs the naive reference forward exactly; the backward is written out in a custom autograd.Function
so that a specific mistake can be planted in it.
"""
import math

import torch

from attnkern.reference import reference_attention


def _grads(q, k, v, mask, is_causal, scale, enable_gqa, do):
    """The exact gradients of reference attention (autograd through the naive math)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        m = None if mask is None else (mask.detach().requires_grad_() if mask.is_floating_point() else mask)
        out = reference_attention(*leaves, m, causal=is_causal, scale=scale, enable_gqa=enable_gqa)[0]
        wrt = leaves + ([m] if m is not None and m.is_floating_point() else [])
        grads = torch.autograd.grad(out, wrt, do)
    return list(grads) + [None] * (4 - len(grads))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, enable_gqa, mistake):
        ctx.save_for_backward(q, k, v, mask)
        ctx.options = (is_causal, scale, enable_gqa, mistake)
        return reference_attention(q, k, v, mask, causal=is_causal, scale=scale, enable_gqa=enable_gqa)[0]

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask = ctx.saved_tensors
        is_causal, scale, enable_gqa, mistake = ctx.options
        if mistake == "scale":  # the backward recomputes the scores with 1.25x the forward's scale
            scale = 1.25 * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        dq, dk, dv, dmask = _grads(q, k, v, mask, is_causal, scale, enable_gqa, do)
        if mistake == "nan":
            dq = dq.clone()
            dq.view(-1)[7] = float("nan")
        if mistake == "zero_dmask" and dmask is not None:
            dmask = torch.zeros_like(dmask)
        if mask is None or not mask.is_floating_point():
            dmask = None
        return dq, dk, dv, dmask, None, None, None, None


def _sdpa(mistake):
    def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _Attention.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa, mistake)

    fn.__name__ = fn.__qualname__ = f"sdpa_{mistake or 'right'}"
    return fn


right_sdpa = _sdpa(None)
wrong_scale_sdpa = _sdpa("scale")
nan_grad_sdpa = _sdpa("nan")
zero_dmask_sdpa = _sdpa("zero_dmask")


def detached_key_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False):
    """Forgets to let the gradient reach the key."""
    return reference_attention(query, key.detach(), value, attn_mask, causal=is_causal, scale=scale,
                               enable_gqa=enable_gqa)[0]


# With attnkern.attention's variants (softcap=, alibi_slopes=, dropout_rng=), for `check-grads --softcap/--alibi/
# --dropout`: right, and with a planted mistake each.
def _variant_fn(mistake):
    def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
           softcap=None, alibi_slopes=None, dropout_rng=None):
        kw = dict(attn_mask=attn_mask, causal=is_causal, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
                  alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_rng=dropout_rng)
        if mistake == "no_softcap":  # forgets the cap
            kw["softcap"] = None
        out = reference_attention(query, key, value, **kw)[0]
        if mistake == "backward_redraws_dropout" and dropout_rng is not None:
            # the output is right, the gradient is that of another dropout mask (the rng's offset moved)
            other = reference_attention(query, key, value, **{**kw, "dropout_rng": dropout_rng + torch.tensor(
                [0, 1], dtype=dropout_rng.dtype, device=dropout_rng.device)})[0]
            out = out.detach() + (other - other.detach())
        return out

    fn.__name__ = fn.__qualname__ = f"variants_{mistake or 'right'}"
    return fn


right_variants = _variant_fn(None)
no_softcap_variants = _variant_fn("no_softcap")
backward_redraws_dropout_variants = _variant_fn("backward_redraws_dropout")
