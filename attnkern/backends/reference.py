"""The "reference" backend: the naive math of reference.py behind the backend contract.

Runs anywhere and takes every problem; materializes (B, H, L, S) scores. Half inputs are computed in
float32 (float64 stays float64). It is what `auto` falls back to when no fused kernel covers a call.
"""
from __future__ import annotations

import torch

from .. import reference
from .base import Backend, new_grad, new_lse, new_output, new_stats


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ReferenceBackend(Backend):
    name = "reference"
    fused = False

    def availability(self, device):
        return None

    def unsupported_reason(self, problem):
        return None

    def forward(self, q, k, v, mask, scale, causal):
        o, l = reference.reference_attention(
            q, k, v, mask, causal=causal, scale=scale, enable_gqa=True,
            compute_dtype=_compute_dtype(q.dtype),
        )
        out, lse, stats = new_output(q, v.shape[-1]), new_lse(q), new_stats(q)
        out.copy_(o)
        lse.copy_(l)
        stats.copy_(reference.reference_softmax_stats(q, k, mask, scale, causal, _compute_dtype(q.dtype)))
        return out, lse, stats

    def backward(self, dout, dlse, q, k, v, mask, out, stats, scale, causal, mask_grad):
        # Recomputes the softmax outright: the stats are not needed at the naive path's O(L*S) cost.
        grads = reference.reference_attention_backward(
            dout, dlse, q, k, v, mask, out, scale, causal, mask_grad,
            compute_dtype=_compute_dtype(q.dtype),
        )
        dq, dk, dv = (new_grad(t).copy_(g) for t, g in zip((q, k, v), grads[:3]))
        return dq, dk, dv, grads[3]
