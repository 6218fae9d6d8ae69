"""The forward/backward contract every backend implements.

Inputs are the canonical tensors of problem.py: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev),
mask None or (Bm, Hm, Lm, Sm) (each dim 1 or full; bool = attend, float = added to the scaled scores),
any strides. `band` (band.Band) says which keys each query row sees apart from the mask (causal,
sliding window). `scale` multiplies q·k (never q or k alone); for
non-float64 problems it is a float32 value (problem.kernel_scale). The ops check all of this on
metadata before a backend is called (op_checks.py), and send zero-sized problems to "reference".

    forward(q, k, v, mask, scale, band, mods, residual)
        -> (out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32, stats (B, Hq, L, 2) float32,
            out_lo: out's rounding residual, or an empty tensor)
    backward(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mods, mask_grad, deterministic)
        -> (dq, dk, dv, dmask or None)

`mods` (score_mods.ScoreMods): soft-capping, ALiBi and dropout, in the order and with the meaning that
score_mods.py states; lse and stats are those of the capped, biased, masked scores (before dropout).

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

Outputs are allocated with the helpers of buffers.py so that the fake (meta) implementations in ops.py
produce identical shapes and strides.
"""
from __future__ import annotations

from typing import Optional

import torch


class Backend:
    """Base class: subclasses set `name` and implement the methods below."""

    name: str = "?"
    #: Whether `auto` may choose this backend (the reference is only ever a fallback).
    fused: bool = True
    #: Whether it runs packed variable-length batches (varlen.py); those without decline them.
    varlen: bool = False
    #: Whether `backward` takes the probabilities from the `stats` and `out` it is given (the fused
    #: kernels) rather than recomputing its own softmax (the reference): ring attention's backward passes
    #: a block the merged result's statistics and relies on it (distributed/ring.py).
    backward_reads_stats: bool = True

    def availability(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on `device` in this process, else the reason it cannot."""
        raise NotImplementedError

    def unsupported_reason(self, problem) -> Optional[str]:
        """None if the backend computes `problem` (an AttentionProblem), else why not."""
        raise NotImplementedError

    def forward(self, q, k, v, mask, scale: float, band, mods, residual: bool):
        raise NotImplementedError

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale: float, band, mods,
                 mask_grad: bool, deterministic: bool = False):
        raise NotImplementedError

    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, band, mods,
                       residual: bool):
        """A packed batch (varlen.py): q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), cu_q/cu_k int32
        (B + 1,), band per sequence -> (out (Tq, Hq, Ev), lse (Hq, Tq), stats (Hq, Tq, 2), out_lo).
        By default one sequence at a time through `forward` (varlen_loop.py)."""
        from . import varlen_loop

        return varlen_loop.forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods, residual)

    def varlen_backward(self, dout, dlse, q, k, v, cu_q, cu_k, max_q: int, max_k: int, out, out_lo, stats,
                        scale: float, band, mods, deterministic: bool = False):
        """The backward of varlen_forward -> (dq, dk, dv) in the packed layouts."""
        from . import varlen_loop

        return varlen_loop.backward(self, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats,
                                    scale, band, mods, deterministic)

    def sequence_forward(self, q, k, v, scale, band, mods, residual, out, out_lo):
        """One sequence of a packed batch, canonical (1, H, L_b, E) views: writes the output into `out`
        (and the residual into `out_lo` unless None), views of the packed buffers; returns (lse, stats)."""
        o, lse, stats, lo = self.forward(q, k, v, None, scale, band, mods, residual)
        out.copy_(o)
        if out_lo is not None:
            out_lo.copy_(lo)
        return lse, stats

    def sequence_backward(self, dout, dlse, q, k, v, out, out_lo, stats, scale, band, mods, deterministic,
                          dq, dk, dv) -> None:
        """One sequence's gradients, written into the views dq, dk, dv of the packed gradients."""
        g = self.backward(dout, dlse, q, k, v, None, out, out_lo if out_lo is not None else out.new_empty((0,)),
                          stats, scale, band, mods, False, deterministic)
        for dst, src in zip((dq, dk, dv), g[:3]):
            dst.copy_(src)

    def backward_path(self, deterministic: bool) -> str:
        """Which backward kernels run, in words (for explain), given whether a deterministic one was
        asked for. Backends with a single, deterministic backward keep this default."""
        return "deterministic (no atomics): bitwise reproducible"

