"""FLOP counts of attention by the project's throughput convention (FlashAttention's benchmark).

    forward   2 · B · H · pairs · (E + Ev)      (= 4 · B · H · Lq · Lk · E when Ev = E and no mask)
    backward  2.5 × forward
    fwd+bwd   3.5 × forward

`pairs` is the number of (query, key) score entries that are computed: Lq · Lk without a causal mask.
With a causal mask, a square problem counts half (Lq · Lk / 2), exactly as FlashAttention's benchmark
does, so that figures compare with the published ones; a non-square problem counts its unmasked entries
exactly, and so does a sliding window (`window_pairs`). Only the two matmuls are counted (softmax and masking are free by this convention).
"""
from __future__ import annotations

from .. import masks

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def causal_pairs(Lq: int, Lk: int, causal=False) -> float:
    """The (query, key) pairs a causal mask leaves (all Lq · Lk without one); see the module docstring.

    `causal`: False/True/"top_left"/"bottom_right" (True = top-left, torch's `is_causal`).
    """
    if Lq < 0 or Lk < 0:
        raise ValueError(f"lengths must be >= 0, got Lq={Lq}, Lk={Lk}")
    code = masks.parse_causal(causal) if causal is not False else masks.CAUSAL_NONE
    if code == masks.CAUSAL_NONE:
        return float(Lq * Lk)
    if Lq == Lk:
        return Lq * Lk / 2.0
    # Row i sees keys j <= i + offset, clipped to [0, Lk): sum over rows of clamp(i + 1 + offset, 0, Lk).
    offset = masks.causal_offset(code, Lq, Lk)
    first_full = max(0, Lk - 1 - offset)  # rows i >= first_full see all Lk keys
    first_any = max(0, -offset)  # rows i < first_any see none
    total = 0
    lo, hi = first_any, min(Lq, first_full)
    if hi > lo:  # rows lo..hi-1 see i + 1 + offset keys: an arithmetic series
        total += (hi - lo) * (lo + hi - 1) // 2 + (hi - lo) * (1 + offset)
    total += max(0, Lq - max(first_full, first_any)) * Lk
    return float(total)


def window_pairs(Lq: int, Lk: int, band) -> float:
    """The (query, key) pairs a band.Band leaves visible, counted exactly."""
    off = band.offset(Lq, Lk)
    total = 0
    for i in range(Lq):
        lo = max(0, i + off - band.left) if band.left >= 0 else 0
        hi = min(Lk - 1, i + off + band.right) if band.right >= 0 else Lk - 1
        total += max(0, hi - lo + 1)
    return float(total)


def attention_flops(B: int, H: int, Lq: int, Lk: int, E: int, Ev=None, causal=False, mode: str = "fwd",
                    window=None) -> float:
    """FLOPs of one attention call of `mode` ("fwd", "bwd" or "fwd+bwd") by the convention above.

    H is the number of query heads (GQA does not change the work: every query head attends). With a
    sliding `window` ((left, right), as `attnkern.attention` takes it) the visible pairs are counted.
    """
    if mode not in MODE_FACTORS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    Ev = E if Ev is None else Ev
    if window is not None:
        from ..band import make_band, parse_window

        code = masks.parse_causal(causal) if causal is not False else masks.CAUSAL_NONE
        pairs = window_pairs(Lq, Lk, make_band(code, parse_window(window)))
    else:
        pairs = causal_pairs(Lq, Lk, causal)
    forward = 2.0 * B * H * pairs * (E + Ev)
    return MODE_FACTORS[mode] * forward
