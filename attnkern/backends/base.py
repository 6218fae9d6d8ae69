"""The forward/backward contract every backend implements.

Inputs are the canonical tensors of problem.py: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev),
mask None or (Bm, Hm, Lm, Sm) (each dim 1 or full; bool = attend, float = added to the scaled scores),
any strides. `causal` is a masks.CAUSAL_* code. `scale` multiplies q·k (never q or k alone); for
non-float64 problems it is a float32 value (problem.kernel_scale). The ops check all of this on
metadata before a backend is called (op_checks.py), and send zero-sized problems to "reference".

    forward(q, k, v, mask, scale, causal, residual)
        -> (out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32, stats (B, Hq, L, 2) float32,
            out_lo: out's rounding residual, or an empty tensor)
    backward(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, causal, mask_grad, deterministic)
        -> (dq, dk, dv, dmask or None)

`deterministic` asks for a backward that is bitwise reproducible run to run; a backend whose only
backward is (cpu, cuda, reference) ignores it, the Triton one switches from its single-pass kernel
(dQ summed with atomics) to its two-pass kernels.

A fully masked row has out = 0, lse = -inf and zero gradients. `dlse` (may be None) is the gradient of
the returned log-sum-exp. `stats` is what the backward needs to recompute the probabilities: per row,
the maximum m of the scaled, masked scores (natural units) and log2 of the softmax denominator, so
that P = 2^((s - m) log2 e - log2 l). Keeping the two apart (rather than recomputing from
lse = m + ln l) keeps P exact when scores are huge: a row whose mask is all -3.4e38 has an lse that
cannot hold ln l beside it. Fully masked rows have m = log2 l = -inf. (float64 problems use float64 for lse and
stats.)

`out_lo` carries the bits of the float32 output that rounding to float16/bfloat16 dropped:
out_lo = round(O32 - float(out)), in out's dtype and layout, so that out + out_lo holds O to about 22
(float16) / 16 (bfloat16) bits. The backward needs delta = rowsum(dO · O) to float32 accuracy: formed
from the rounded output alone, a gradient that is exactly 0 (a per-query bias's) comes out as rounding
noise of order 1e-2. The forward writes it only when asked (`residual`: a gradient will be needed) and
only for half inputs; otherwise out_lo is an empty tensor and the backward uses out alone (exact for
float32/float64).

Outputs are allocated with the helpers below so that the fake (meta) implementations in ops.py produce
identical shapes and strides.
"""
from __future__ import annotations

import os
from typing import Optional

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


def new_grad(t: torch.Tensor) -> torch.Tensor:
    """A gradient buffer for input t: t's layout when t is dense, else contiguous."""
    return _poisoned(torch.empty_like(t))


def new_mask_grad(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The accumulation buffer of a mask gradient, (Bm, Hm, Lm, Sm) contiguous (float32, or float64
    for float64 problems)."""
    return _poisoned(torch.empty(mask.shape, dtype=dtype, device=mask.device))


class Backend:
    """Base class: subclasses set `name` and implement the methods below."""

    name: str = "?"
    #: Whether `auto` may choose this backend (the reference is only ever a fallback).
    fused: bool = True

    def availability(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on `device` in this process, else the reason it cannot."""
        raise NotImplementedError

    def unsupported_reason(self, problem) -> Optional[str]:
        """None if the backend computes `problem` (an AttentionProblem), else why not."""
        raise NotImplementedError

    def forward(self, q, k, v, mask, scale: float, causal: int, residual: bool):
        raise NotImplementedError

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale: float, causal: int,
                 mask_grad: bool, deterministic: bool = False):
        raise NotImplementedError

    def backward_path(self, deterministic: bool) -> str:
        """Which backward kernels run, in words (for explain), given whether a deterministic one was
        asked for. Backends with a single, deterministic backward keep this default."""
        return "deterministic (no atomics): bitwise reproducible"
