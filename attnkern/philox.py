"""The dropout mask's random numbers: Philox4x32-10, the counter-based generator every backend uses.

A counter-based generator gives the number for any (row, column) directly from a key and a counter,
so the backward regenerates the forward's dropout mask instead of storing it. Every backend computes
the same mask from the same `rng` tensor, bit for bit (this module is the definition; the kernels in
csrc/philox.h and attnkern/triton/common.py follow it), so the reference checks kernels with dropout
exactly as without.

For the score of query row i and key j of batch b and query head h (B, Hq, L, S canonical, problem.py):

    key     = (seed mod 2^32, seed div 2^32 mod 2^32)         seed   = rng[0]
    counter = (j div 4, i, b * Hq + h, offset mod 2^32)         offset = rng[1]
    r       = lane (j mod 4) of Philox4x32-10(counter, key)    (one draw serves four columns)
    kept    = r >= dropout_threshold(p)                         kept scores are scaled by 1 / (1 - p)

`rng` is an int64 tensor (2,) = (seed, offset) on the problem's device, drawn from torch's generator
for that device (`draw_rng`), so a call is reproducible under torch.manual_seed and advances the
generator as torch's own random ops do.
"""
from __future__ import annotations

import math

import torch

ROUNDS = 10
# Philox4x32's multipliers and Weyl key increments (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC 2011).
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """The integer a draw must reach to keep its score: floor(p * 2^32), at most 2^32 - 1 (p = 1 keeps
    a 2^-32 sliver, which the zero scale of `dropout_scale(1)` removes)."""
    return min(int(math.floor(p * 4294967296.0)), _U32)


def dropout_scale(p: float) -> float:
    """What a kept probability is multiplied by: 1 / (1 - p), 0 for p = 1 (everything dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _mulhilo(a: int, b: torch.Tensor):
    """(high, low) 32-bit halves of a * b for a constant a < 2^32 and b holding uint32 values in int64,
    exact: b split into 16-bit halves keeps every product below 2^48."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * b_lo, a * b_hi
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _U32
    return hi & _U32, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 counters (broadcast together) and a 2-word key."""
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & _U32, (k1 + W1) & _U32
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_draws(rng: torch.Tensor, B: int, Hq: int, L: int, S: int) -> torch.Tensor:
    """The uint32 draws r (as int64) of every score, (B, Hq, L, S), on rng's device."""
    seed, offset = (int(x) for x in rng.tolist())
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    dev = rng.device
    j = torch.arange(S, device=dev, dtype=torch.int64).view(1, 1, 1, S)
    i = torch.arange(L, device=dev, dtype=torch.int64).view(1, 1, L, 1)
    bh = torch.arange(B * Hq, device=dev, dtype=torch.int64).view(B, Hq, 1, 1)
    c0 = (j >> 2).expand(B, Hq, L, S)
    lanes = philox4x32(c0, i.expand_as(c0), bh.expand_as(c0), torch.full_like(c0, offset & _U32), k0, k1)
    lane = (j & 3).expand_as(c0)
    r = torch.zeros_like(c0)
    for n, out in enumerate(lanes):
        r = torch.where(lane == n, out, r)
    return r


def dropout_multiplier(rng: torch.Tensor, p: float, B: int, Hq: int, L: int, S: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """(B, Hq, L, S) in `dtype`: 1 / (1 - p) where a score is kept, 0 where it is dropped."""
    kept = dropout_draws(rng, B, Hq, L, S) >= dropout_threshold(p)
    return kept.to(dtype) * dropout_scale(p)


def draw_rng(device: torch.device, generator=None) -> torch.Tensor:
    """A fresh (seed, offset) from torch's generator for `device` (advancing it), as an int64 tensor (2,)."""
    return torch.empty(2, dtype=torch.int64, device=device).random_(generator=generator)


def check_rng(rng, device: torch.device, name: str = "dropout_rng") -> torch.Tensor:
    """rng must be an int64 tensor of shape (2,) (seed, offset) on the problem's device."""
    if not isinstance(rng, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int64, shape (2,): seed, offset) or None, "
                        f"got {type(rng).__name__}")
    if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        raise ValueError(f"{name} must be an int64 tensor of shape (2,) (seed, offset), got "
                         f"{str(rng.dtype).replace('torch.', '')} of shape {tuple(rng.shape)}")
    if rng.device != device:
        raise ValueError(f"{name} must be on the query's device {device}, got {rng.device}")
    return rng
