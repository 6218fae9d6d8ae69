"""Attention sinks (gpt-oss style): one learnable logit per query head that joins every row's softmax
denominator and attends to nothing, so a row may put part of its weight nowhere.

With lse the row's log-sum-exp over its keys (what every backend returns, differentiably), the sink
changes the softmax by one exact identity:

    lse' = logaddexp(lse, sink)        out' = out · exp(lse − lse')

so sinks run on every backend at the cost of one elementwise pass over the output (O(L·Ev), no second
pass over the keys), and autograd forms d(sink) = −Σ_rows exp(sink − lse') · rowsum(dO'·out') from the
same identity while the kernel backward receives dO and dlse as usual. A fully masked row (lse = −inf)
gives output 0 and lse' = sink. reference.reference_attention(sinks=...) computes the same thing the
naive way (the sink as an extra score column), which is what the tests compare against.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def check_sinks(sinks, heads: int, device: torch.device) -> Optional[torch.Tensor]:
    """`sinks`: None or a float tensor of shape (heads,) (one logit per query head) on the inputs' device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape ({heads},) or None, got {type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a float tensor (one logit per query head), got dtype {sinks.dtype}")
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape ({heads},) (one logit per query head), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks must be on the query's device {device}, got {sinks.device}")
    return sinks


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor,
                out_lo: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, L, Ev) and lse (B, H, L) of attention without sinks -> the same with them (see above).
    The rescale is computed in lse's dtype (float32, or float64 for float64 problems). `out_lo`, the
    forward's rounding residual of a half-precision output (backends/base.py), when there is one, is
    added first (not differentiated: it is a constant of the forward), so that d(sink), which sums
    dO'·out' over every row, sees the float32 output rather than its rounding noise."""
    s = sinks.to(lse.dtype).view(1, -1, 1)
    lse_s = torch.logaddexp(lse, s)
    factor = torch.exp(lse - lse_s)  # 0 on fully masked rows (lse = -inf), NaN stays NaN
    full = out.to(lse.dtype)
    if out_lo is not None and out_lo.numel():
        full = full + out_lo.detach().to(lse.dtype)
    out_s = (full * factor.unsqueeze(-1)).to(out.dtype)
    return out_s, lse_s
