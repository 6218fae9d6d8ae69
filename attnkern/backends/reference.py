"""The "reference" backend: the naive math of reference.py behind the backend contract.

Runs anywhere and takes every problem; materializes (B, H, L, S) scores. Half inputs are computed in
float32 (float64 stays float64). It is what `auto` falls back to when no fused kernel covers a call.
"""
from __future__ import annotations

import torch

from .. import reference
from ..buffers import forward_buffers, new_grad
from .base import Backend


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ReferenceBackend(Backend):
    name = "reference"
    fused = False
    varlen = True  # one sequence at a time (base.py's varlen_forward)
    backward_reads_stats = False  # recomputes P (and delta) from the scores

    def availability(self, device):
        return None

    def unsupported_reason(self, problem):
        return None

    def forward(self, q, k, v, mask, scale, band, mods, residual):
        cd = _compute_dtype(q.dtype)
        # The output in the compute dtype (inputs upcast first), so the rounding residual can be taken.
        o, l = reference.reference_attention(
            q.to(cd), k.to(cd), v.to(cd), mask, band=band, scale=scale, enable_gqa=True, compute_dtype=cd,
            softcap=mods.softcap, alibi_slopes=mods.alibi, dropout_p=mods.dropout_p, dropout_rng=mods.rng,
        )
        Ev = v.shape[-1]
        out, lse, stats, out_lo = forward_buffers(q, Ev, residual)
        out.copy_(o)
        if out_lo.numel():
            out_lo.copy_(o - out.to(cd))
        lse.copy_(l)
        stats.copy_(reference.reference_softmax_stats(q, k, mask, scale, band, cd, mods))
        return out, lse, stats, out_lo

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mods, mask_grad,
                 deterministic=False):  # always deterministic
        # Recomputes the softmax outright: the stats are not needed at the naive path's O(L*S) cost.
        grads = reference.reference_attention_backward(
            dout, dlse, q, k, v, mask, out, scale, band, mask_grad,
            compute_dtype=_compute_dtype(q.dtype), out_lo=out_lo, mods=mods,
        )
        dq, dk, dv = (new_grad(t).copy_(g) for t, g in zip((q, k, v), grads[:3]))
        return dq, dk, dv, grads[3]
