"""Packed variable-length batches run one sequence at a time through a backend's padded-problem
kernels: each sequence's tokens are viewed (no copy) as a (1, H, L_b, E) problem, so no sequence reads
another's keys and nothing is padded. The generic varlen path of backends/base.py: a backend supplies
`sequence_forward` / `sequence_backward` (base.py's defaults copy the results of its forward/backward
into the packed buffers; one whose kernels take strided outputs writes them in place)."""
from __future__ import annotations

import torch

from ..buffers import (new_varlen_lse, new_varlen_output, new_varlen_residual, new_varlen_stats)
from ..varlen import sequence_bounds, sequence_mods, sequence_view


def forward(backend, q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods, residual):
    Ev = v.shape[2]
    out, lse = new_varlen_output(q, Ev), new_varlen_lse(q)
    stats, out_lo = new_varlen_stats(q), new_varlen_residual(q, Ev, residual)
    for b, (q0, q1, k0, k1) in enumerate(sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)):
        if q1 == q0:
            continue
        if k1 == k0 or Ev == 0 or q.shape[1] == 0:  # rows that see no key: 0, lse -inf (base.py)
            out[q0:q1].zero_()
            if out_lo.numel():
                out_lo[q0:q1].zero_()
            lse[:, q0:q1].fill_(float("-inf"))
            stats[:, q0:q1].fill_(float("-inf"))
            continue
        lse_b, stats_b = backend.sequence_forward(
            sequence_view(q, q0, q1), sequence_view(k, k0, k1), sequence_view(v, k0, k1), scale, band,
            sequence_mods(mods, b), residual, sequence_view(out, q0, q1),
            sequence_view(out_lo, q0, q1) if out_lo.numel() else None)
        lse[:, q0:q1].copy_(lse_b[0])
        stats[:, q0:q1].copy_(stats_b[0])
    return out, lse, stats, out_lo


def backward(backend, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats, scale, band, mods,
             deterministic):
    # Zeros where no sequence's rows reach (keys of sequences without queries, rows that see no key).
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, (q0, q1, k0, k1) in enumerate(sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)):
        if q1 == q0 or k1 == k0 or v.shape[2] == 0 or q.shape[1] == 0:
            continue
        rows = lambda t: sequence_view(t, q0, q1)  # noqa: E731
        keys = lambda t: sequence_view(t, k0, k1)  # noqa: E731
        backend.sequence_backward(
            rows(dout), None if dlse is None else dlse[:, q0:q1].unsqueeze(0), rows(q), keys(k), keys(v), rows(out),
            rows(out_lo) if out_lo.numel() else None, stats[:, q0:q1].unsqueeze(0).contiguous(), scale, band,
            sequence_mods(mods, b), deterministic, rows(dq), keys(dk), keys(dv))
    return dq, dk, dv
