"""The naive attention math: the oracle for every test and the fallback path.

`reference_attention` works on SDPA-style tensors of any dtype (float64 included) using torch's own
broadcasting, independently of the normalization in problem.py, and is differentiable by autograd.
It materializes the (…, L, S) score matrix: O(L·S) memory, by design.

`reference_attention_backward` is the same math's backward written out (the formulas every kernel
implements), used by the "reference" backend so that it honours the same forward/backward contract.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import masks
from .band import Band, make_band, parse_window
from .philox import dropout_multiplier
from .score_mods import NONE, ScoreMods, alibi_bias, cap

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    if t.dim() < 3 or t.shape[-3] == heads:
        return t
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def _band_of(causal, window, band: Optional[Band]) -> Band:
    return band if band is not None else make_band(masks.parse_causal(causal), parse_window(window))


def _raw_scores(query, key, scale, enable_gqa, dtype) -> torch.Tensor:
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:
        key = _expand_heads(key, query.shape[-3])
    return (query.to(dtype) @ key.to(dtype).transpose(-2, -1)) * scale


def reference_scores(
    query, key, attn_mask=None, *, causal=0, window=None, band: Optional[Band] = None, scale=None,
    enable_gqa=False, compute_dtype=None, softcap: float = 0.0, alibi_slopes=None, raw=None,
) -> torch.Tensor:
    """Scaled, masked scores `s` (−inf where masked) in `compute_dtype` (default: the query's dtype).
    The visible keys: `band` (band.py), or the band of `causal` and `window` as `attention` takes them.
    `softcap` and `alibi_slopes` ((H,) or (..., H)) as score_mods.py defines them; `raw`: the scaled
    scores q.k * scale when the caller has them already."""
    band = _band_of(causal, window, band)
    dtype = compute_dtype or query.dtype
    s = _raw_scores(query, key, scale, enable_gqa, dtype) if raw is None else raw
    s = cap(s, softcap or 0.0)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, s.shape[-2], s.shape[-1], dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(dtype)
    allowed = band.allowed(s.shape[-2], s.shape[-1], s.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    *,
    causal=masks.CAUSAL_NONE,
    window=None,
    band: Optional[Band] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_rng: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Naive attention. Returns (out in query's dtype, natural-log row log-sum-exp).

    `causal`: an int code from masks.py or anything `masks.parse_causal` takes; `window`: as
    `attnkern.attention` takes it; or `band` (band.py) for both. Fully masked rows give
    output 0, log-sum-exp −inf, and zero gradients. NaN and Inf propagate as in torch's math path: a
    row whose scores hold NaN or +inf has NaN output, log-sum-exp and probabilities. `compute_dtype`
    runs the math in another dtype (e.g. float32 for half inputs); the log-sum-exp is float32, or
    float64 for float64 math. `sinks` ((Hq,), one logit per query head): an extra score column that
    joins every row's softmax and attends to nothing (the naive form of attnkern/sinks.py).
    `softcap`, `alibi_slopes`: as `attnkern.attention` takes them (score_mods.py). `dropout_p` > 0 with
    `dropout_rng` (int64 (2,): seed, offset) drops the probabilities the kernels drop for that rng
    (philox.py; the leading dims count as one batch dim); without it, torch's dropout draws a mask.
    """
    dtype = compute_dtype or query.dtype
    s = reference_scores(
        query, key, attn_mask, band=_band_of(causal, window, band), scale=scale, enable_gqa=enable_gqa,
        compute_dtype=dtype, softcap=softcap or 0.0, alibi_slopes=alibi_slopes,
    )
    # Softmax with a detached row max: exact (softmax is shift invariant), and a fully masked row gives
    # e = 0 everywhere, hence output 0 and zero gradients instead of NaN. NaN (or +inf) scores make their
    # whole row NaN, as in torch's math path.
    if sinks is not None:  # one more column, the sink's logit, dropped again after the softmax
        col = sinks.to(dtype).view((-1, 1, 1) if s.dim() >= 3 else (1, 1)).expand(*s.shape[:-1], 1)
        s = torch.cat([s, col], dim=-1)
    m, _, _ = _softmax_parts(s.detach())
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    p = e / denom_safe
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), torch.log(denom_safe) + m).squeeze(-1)
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0.0 and dropout_rng is not None:
        p = p * _dropout_multiplier(dropout_rng, dropout_p, p)
    elif dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    if enable_gqa:
        value = _expand_heads(value, query.shape[-3])
    out = p @ value.to(dtype)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return out.to(query.dtype), lse.to(lse_dtype)


def _dropout_multiplier(rng: torch.Tensor, p: float, probs: torch.Tensor) -> torch.Tensor:
    """The dropout multiplier for probabilities of shape (..., H, L, S) (leading dims flattened to B)."""
    H, L, S = (1,) * max(0, 3 - probs.dim()) + tuple(probs.shape[-3:])
    B = probs.numel() // max(1, H * L * S) if probs.numel() else 0
    return dropout_multiplier(rng, p, B, H, L, S, probs.dtype).view(probs.shape)


def reduce_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum `t` over the dims where `shape` (same rank) has size 1 and `t` does not."""
    dims = [d for d, (have, want) in enumerate(zip(t.shape, shape)) if want == 1 and have != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _softmax_parts(s: torch.Tensor):
    """(row max m; e = exp(s - m); denominator) of scores s, robust to fully masked rows: their max -inf
    is replaced by 0, so e = 0 there. A row max of NaN or +inf is kept, so that row's e, and with it its
    probabilities, are all NaN, as torch's softmax makes them (exp(inf - inf) = NaN)."""
    if s.shape[-1] == 0:
        m = s.new_zeros(s.shape[:-1] + (1,))
    else:
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    return m, e, e.sum(dim=-1, keepdim=True)


def reference_softmax_stats(q, k, mask, scale, band: Band, compute_dtype=None, mods: ScoreMods = NONE,
                            ) -> torch.Tensor:
    """The per-row statistics of the backend contract, (B, H, L, 2): the row max and log2 of the softmax
    denominator relative to it; -inf for both on fully masked rows."""
    s = reference_scores(q, k, mask, band=band, scale=scale, enable_gqa=True, compute_dtype=compute_dtype,
                         softcap=mods.softcap, alibi_slopes=mods.alibi)
    m, _, denom = _softmax_parts(s)
    empty = denom == 0
    m = torch.where(empty, torch.full_like(m, float("-inf")), m)
    return torch.cat([m, torch.log2(denom)], dim=-1)


def reference_attention_backward(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    out: torch.Tensor,
    scale: float,
    band: Band,
    mask_grad: bool,
    compute_dtype: Optional[torch.dtype] = None,
    out_lo: Optional[torch.Tensor] = None,
    mods: ScoreMods = NONE,
):
    """The backward every kernel implements, on canonical 4-D tensors (see problem.py):

        S = cap(scale QKᵀ) + alibi + mask   (score_mods.py; T = tanh(scale QKᵀ / c) with softcap c)
        P = softmax(S)                (recomputed; 0 on fully masked rows)
        Z = dropout multiplier        (0 or 1/(1-p), regenerated from mods.rng; 1 without dropout)
        dV = (P ∘ Z)ᵀ dO              dP = (dO Vᵀ) ∘ Z
        delta = rowsum(P ∘ dP) − dlse (= rowsum(dO ∘ O) − dlse, the kernels' form from O = out + out_lo;
                                      taken from P here, in every dtype; out and out_lo are not read;
                                      dlse counts as 0 on fully masked rows: their lse = -inf is
                                      constant, and an inf/NaN dlse there must not turn P = 0 into NaN)
        dS = P ∘ (dP − delta)         (the gradient of the masked, scaled scores = the float mask's)
        dR = dS ∘ (1 − T²)            (the raw scores' gradient; dR = dS without softcap)
        dQ = scale · dR K             dK = scale · dRᵀ Q
    dK/dV are summed over each kv head's query-head group; dMask over the mask's broadcast dims. A mask
    that broadcasts over keys takes each row's Σ_j dS as rowsum(P ∘ dP)(1 − rowsum P) + dlse · rowsum P,
    the same value without the cancellation of large terms that Σ_j dS (≈ dlse) is; a row that sees no
    key gives 0.
    Returns (dq, dk, dv, dmask or None) in the inputs' dtypes.
    """
    dtype = compute_dtype or q.dtype
    Hq, Hkv = q.shape[1], k.shape[1]
    group = Hq // Hkv if Hkv else 1  # zero heads (an empty problem): nothing to sum
    kx, vx = _expand_heads(k, Hq).to(dtype), _expand_heads(v, Hq).to(dtype)
    raw = _raw_scores(q, k, scale, True, dtype)
    s = reference_scores(q, k, mask, band=band, compute_dtype=dtype, softcap=mods.softcap,
                         alibi_slopes=mods.alibi, raw=raw)
    _, e, denom = _softmax_parts(s)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    do = dout.to(dtype)
    dp = do @ vx.transpose(-2, -1)
    if mods.dropout_p > 0.0:
        z = _dropout_multiplier(mods.rng, mods.dropout_p, p)
        dv = (p * z).transpose(-2, -1) @ do
        dp = dp * z
    else:
        dv = p.transpose(-2, -1) @ do
    delta = (p * dp).sum(-1, keepdim=True)
    if dlse is not None:
        dl = dlse.to(dtype).unsqueeze(-1)
        delta = delta - torch.where(denom == 0, torch.zeros_like(dl), dl)
    ds = p * (dp - delta)
    dr = ds * (1 - torch.tanh(raw / mods.softcap) ** 2) if mods.softcap > 0.0 else ds
    dq = scale * (dr @ kx)
    dk = scale * (dr.transpose(-2, -1) @ q.to(dtype))
    B, _, S, E = k.shape
    dk = dk.view(B, Hkv, group, S, E).sum(2)
    dv = dv.view(B, Hkv, group, S, v.shape[-1]).sum(2)
    dmask = None
    if mask_grad:
        if mask.shape[-1] == 1 and S > 1:
            # Summed over keys, a row's Σ_j dS = A (1 − B) + dlse B with A = rowsum(P ∘ dP), B = rowsum P:
            # the same value, with no large terms cancelling (Σ_j dS ≈ dlse while each term is not small).
            # A row that sees no key has B = 0 and gives 0, whatever its dlse.
            # rowsum P is taken as rowsum(e) / denominator (1 exactly on a row that sees a key, where
            # P's own float sum would leave rounding that A (1 − B) turns into noise).
            pdp = (p * dp).sum(-1, keepdim=True)
            psum = e.sum(-1, keepdim=True) / torch.where(denom == 0, torch.ones_like(denom), denom)
            rows = pdp * (1 - psum)
            if dlse is not None:
                dl = dlse.to(dtype).unsqueeze(-1)
                rows = rows + torch.where(psum == 0, torch.zeros_like(dl), dl) * psum
            dmask = reduce_to_shape(rows, mask.shape).to(mask.dtype)
        else:
            dmask = reduce_to_shape(ds, mask.shape).to(mask.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
    causal: bool = False, window=None, scale: Optional[float] = None, softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
    dropout_p: float = 0.0, dropout_rng: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The naive math of a packed variable-length batch (attnkern.varlen_attention's semantics), one
    sequence at a time through `reference_attention`: q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev),
    cu_seqlens (B + 1,) -> (out (Tq, Hq, Ev) in q's dtype, lse (Hq, Tq)). causal/window bottom-right per
    sequence; alibi_slopes (Hq,) or (B, Hq); dropout with sequence b's mask drawn from
    varlen.sequence_rng(dropout_rng, b). Differentiable by autograd."""
    from .varlen import sequence_rng

    band = make_band(masks.CAUSAL_BOTTOM_RIGHT if causal else masks.CAUSAL_NONE, parse_window(window))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lse_dtype = torch.float64 if (compute_dtype or q.dtype) == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb, kb, vb = (t[a:e].transpose(0, 1) for t, a, e in ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]),
                                                             (v, ck[b], ck[b + 1])))
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        if kb.shape[1] == 0:  # no keys: every row sees nothing
            outs.append(qb.new_zeros(qb.shape[:2] + (v.shape[2],)))
            lses.append(torch.full(qb.shape[:2], float("-inf"), dtype=lse_dtype))
            continue
        o, l = reference_attention(qb, kb, vb, band=band, scale=scale, enable_gqa=True, compute_dtype=compute_dtype,
                                   softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p,
                                   dropout_rng=None if dropout_rng is None else sequence_rng(dropout_rng, b))
        outs.append(o)
        lses.append(l.to(lse_dtype))
    out = torch.cat(outs, dim=1).transpose(0, 1) if outs else q.new_zeros((0, q.shape[1], v.shape[2]))
    lse = torch.cat(lses, dim=1) if lses else torch.zeros((q.shape[1], 0), dtype=lse_dtype)
    return out, lse
