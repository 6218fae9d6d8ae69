"""Output, statistics and gradient buffers of the kernels, allocated one way for every backend and for
the fake (meta) implementations of the custom ops, so that shapes, dtypes and strides agree. The
kernel launchers (triton/, backends/) and ops.py import them from here; backends/base.py states the
contract they serve."""
from __future__ import annotations

import os

import torch

#: ATTNKERN_POISON=1 fills every buffer a kernel must write with NaN first, so that an element a kernel
#: forgets to write fails the tests instead of passing on whatever memory held. A debugging aid.
POISON = os.environ.get("ATTNKERN_POISON", "0") == "1"


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if POISON and t.is_floating_point() else t


def new_output(q: torch.Tensor, Ev: int) -> torch.Tensor:
    """Output (B, H, L, Ev) laid out like q: if q is a (B, L, H, E) buffer viewed as (B, H, L, E), so is
    the output, so that the usual `out.transpose(1, 2).reshape(B, L, H * Ev)` needs no copy."""
    B, H, L, _ = q.shape
    if H > 1 and L > 1 and q.stride(1) < q.stride(2):
        return _poisoned(q.new_empty((B, L, H, Ev)).transpose(1, 2))
    return _poisoned(q.new_empty((B, H, L, Ev)))


def new_residual(q: torch.Tensor, Ev: int, residual: bool) -> torch.Tensor:
    """The output's rounding residual out_lo (laid out like the output) when `residual` is set and q is
    float16/bfloat16; else an empty tensor (float32/float64 outputs are the accumulator's own precision)."""
    if residual and q.dtype in (torch.float16, torch.bfloat16):
        return new_output(q, Ev)
    return q.new_empty((0,))


def new_lse(q: torch.Tensor) -> torch.Tensor:
    B, H, L, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _poisoned(q.new_empty((B, H, L), dtype=dtype))


def new_stats(q: torch.Tensor) -> torch.Tensor:
    """Per-row softmax statistics (B, H, L, 2): [..., 0] = row max, [..., 1] = log2 of the denominator."""
    B, H, L, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _poisoned(q.new_empty((B, H, L, 2), dtype=dtype))


def forward_buffers(q: torch.Tensor, Ev: int, residual: bool):
    """(out, lse, stats, out_lo) of a forward: new_output, new_lse, new_stats and new_residual, with the
    accumulator dtype decided once (every backend's forward and the ops' fake take them from here)."""
    B, H, L, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = new_output(q, Ev)
    lse = _poisoned(q.new_empty((B, H, L), dtype=dtype))
    stats = _poisoned(q.new_empty((B, H, L, 2), dtype=dtype))
    return out, lse, stats, new_residual(q, Ev, residual)


def new_grad(t: torch.Tensor) -> torch.Tensor:
    """A gradient buffer for input t: t's layout when t is dense, else contiguous."""
    return _poisoned(torch.empty_like(t))


def new_mask_grad(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The accumulation buffer of a mask gradient, (Bm, Hm, Lm, Sm) contiguous (float32, or float64
    for float64 problems)."""
    return _poisoned(torch.empty(mask.shape, dtype=dtype, device=mask.device))


# Packed variable-length batches (varlen.py): q (total_q, Hq, E).

def new_varlen_output(q: torch.Tensor, Ev: int) -> torch.Tensor:
    """Output (total_q, Hq, Ev), contiguous."""
    return _poisoned(q.new_empty((q.shape[0], q.shape[1], Ev)))


def new_varlen_residual(q: torch.Tensor, Ev: int, residual: bool) -> torch.Tensor:
    """new_residual's packed form: (total_q, Hq, Ev) for float16/bfloat16 when `residual`, else empty."""
    if residual and q.dtype in (torch.float16, torch.bfloat16):
        return new_varlen_output(q, Ev)
    return q.new_empty((0,))


def new_varlen_lse(q: torch.Tensor) -> torch.Tensor:
    """(Hq, total_q), as FlashAttention's varlen functions return it; float32 (float64 for float64)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _poisoned(q.new_empty((q.shape[1], q.shape[0]), dtype=dtype))


def new_varlen_stats(q: torch.Tensor) -> torch.Tensor:
    """(Hq, total_q, 2): new_stats' per-row statistics, packed."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _poisoned(q.new_empty((q.shape[1], q.shape[0], 2), dtype=dtype))
