"""Packed variable-length batches ("varlen", FlashAttention's flash_attn_varlen_func layout).

B sequences of different lengths are packed along one token dim, with no padding:

    q (total_q, Hq, E)   k (total_k, Hkv, E)   v (total_k, Hkv, Ev)   out (total_q, Hq, Ev)   lse (Hq, total_q)
    cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), the sequences' start offsets plus the total
    (sequence b holds query tokens cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1, and likewise keys)

Sequence b attends only to its own keys; causal and window bands are aligned per sequence, bottom-right
as FlashAttention aligns them (the last query of a sequence sees its last key). max_seqlen_q/k bound the
sequences' lengths (as FlashAttention takes them; kernels may size their grids by them).

This module holds the problem (`VarlenProblem`), its checks, and the per-sequence views the backends
iterate over; api.py's `varlen_attention` is the entry point and ops_varlen.py the custom ops.
Checks that need the offsets' values (non-decreasing, ending at the total, within max_seqlen) read
them from the device, so they run inside the ops' real implementations, never while tracing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import masks
from .band import Band, make_band, parse_window
from .problem import SUPPORTED_DTYPES, kernel_scale
from .score_mods import NONE, ScoreMods, check_softcap, make_mods


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_cu_seqlens(name: str, cu, device: torch.device, batch: Optional[int] = None) -> int:
    """cu_seqlens_q/k on metadata: an int32 1-D tensor (B + 1,) on the query's device; returns B."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int32 (B + 1,)), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as FlashAttention takes it), got {_name(cu.dtype)}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (B + 1,) (the start offsets and the total), got shape "
                         f"{tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the query's device {device}, got {cu.device}")
    B = cu.shape[0] - 1
    if batch is not None and B != batch:
        raise ValueError(f"{name} must have the same length as cu_seqlens_q: (B + 1,) = ({batch + 1},), "
                         f"got {tuple(cu.shape)}")
    return B


def check_max_seqlen(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an int >= 0 (the longest sequence's length), got {n!r}")
    return int(n)


def sequence_bounds(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_q: int,
                    max_k: int) -> List[Tuple[int, int, int, int]]:
    """[(q0, q1, k0, k1)] per sequence, checking the offsets' values (this reads them from the device):
    they start at 0, never decrease, end at the packed totals and no sequence exceeds max_seqlen."""
    bounds = []
    for name, cu, total, most in (("cu_seqlens_q", cu_q, total_q, max_q), ("cu_seqlens_k", cu_k, total_k, max_k)):
        offs = cu.tolist()
        if offs[0] != 0:
            raise ValueError(f"{name}[0] must be 0 (the first sequence's start), got {offs[0]}")
        lens = [b - a for a, b in zip(offs[:-1], offs[1:])]
        if any(n < 0 for n in lens):
            bad = next(i for i, n in enumerate(lens) if n < 0)
            raise ValueError(f"{name} must be non-decreasing: {name}[{bad}] = {offs[bad]} > "
                             f"{name}[{bad + 1}] = {offs[bad + 1]}")
        if offs[-1] != total:
            which = "query" if name.endswith("q") else "key/value"
            raise ValueError(f"{name}[-1] must equal the packed {which} token count {total} (dim 0), "
                             f"got {offs[-1]}")
        if lens and max(lens) > most:
            raise ValueError(f"max_seqlen_{name[-1]} must be at least the longest sequence's length "
                             f"{max(lens)} (from {name}), got {most}")
        bounds.append(offs)
    oq, ok = bounds
    return [(oq[b], oq[b + 1], ok[b], ok[b + 1]) for b in range(len(oq) - 1)]


@dataclass
class VarlenProblem:
    """A packed batch, canonical: q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev) (Hq a multiple of
    Hkv), cu_seqlens int32 (B + 1,), scale as the kernels use it, the per-sequence band, score mods."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    scale: float
    band: Band
    mods: ScoreMods = NONE
    deterministic: bool = False
    causal: int = masks.CAUSAL_NONE
    window: Optional[Tuple[int, int]] = None

    is_varlen = True  # backends/__init__.py: only backends with varlen kernels take it
    mask = None  # a packed batch has no attn_mask
    mask_requires_grad = False

    @property
    def B(self) -> int:
        return self.cu_q.shape[0] - 1

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def E(self) -> int:
        return self.q.shape[2]

    @property
    def Ev(self) -> int:
        return self.v.shape[2]

    @property
    def L(self) -> int:  # the longest sequence, as the padded problem's L would be
        return self.max_q

    @property
    def S(self) -> int:
        return self.max_k

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    @property
    def is_empty(self) -> bool:
        return self.q.numel() == 0 or self.Ev == 0

    def summary(self) -> str:
        return (f"varlen B={self.B} Hq={self.Hq} Hkv={self.Hkv} total_q={self.q.shape[0]} "
                f"total_k={self.k.shape[0]} max_seqlen_q={self.max_q} max_seqlen_k={self.max_k} E={self.E} "
                f"Ev={self.Ev} dtype={_name(self.dtype)} device={self.device.type} "
                f"band={self.band.describe()} (per sequence)"
                + "".join(f" {part}" for part in self.mods.describe().split()))


def normalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     window=None, scale=None, enable_gqa=False, softcap=None, alibi_slopes=None,
                     dropout_p=0.0, dropout_rng=None, deterministic=False) -> VarlenProblem:
    """Check a varlen call's arguments on metadata (no device reads) and build the VarlenProblem."""
    for name, t, dims in (("q", q, "(total_q, Hq, E)"), ("k", k, "(total_k, Hkv, E)"),
                          ("v", v, "(total_k, Hkv, Ev)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D {dims} (packed tokens, heads, head dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {_name(t.dtype)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype; got {_name(q.dtype)}, {_name(k.dtype)}, "
                        f"{_name(v.dtype)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device; got {q.device}, {k.device}, {v.device}")
    Tq, Hq, E = q.shape
    Tk, Hkv, Ek = k.shape
    if Ek != E:
        raise ValueError(f"k's head dim must equal q's: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (Tk, Hkv):
        raise ValueError(f"v must be (total_k, Hkv, Ev) with k's total_k and Hkv: k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if Hkv != Hq and not (enable_gqa and Hkv > 0 and Hq % Hkv == 0):
        raise ValueError(f"q has {Hq} heads and k/v {Hkv}: they must match, or pass enable_gqa=True with "
                         "Hq a multiple of Hkv")
    B = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, B)
    max_q = check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (aligned bottom-right per sequence), got {causal!r}")
    window = parse_window(window)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    scale = kernel_scale(scale, q.dtype)
    from .score_mods import check_alibi  # (Hq,) or (B, Hq)

    alibi = check_alibi(alibi_slopes, (B,), B, Hq, q.device)
    mods = make_mods(check_softcap(softcap), alibi, float(dropout_p), dropout_rng, q.device)
    code = masks.CAUSAL_BOTTOM_RIGHT if causal else masks.CAUSAL_NONE
    return VarlenProblem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, float(scale), make_band(code, window),
                         mods, deterministic, code, window)


def sequence_view(t: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """Tokens [t0, t1) of a packed (T, H, D) tensor as the canonical (1, H, t1 - t0, D) view (no copy)."""
    return t[t0:t1].permute(1, 0, 2).unsqueeze(0)


def sequence_rng(rng: torch.Tensor, b: int) -> torch.Tensor:
    """The dropout rng of sequence b: (seed, (offset mod 2^32) + b). Sequence b's mask is that of its
    own (1, Hq, L_b, S_b) problem (philox.py) drawn with this rng, so every sequence has its own stream
    (the offset is the Philox counter's last word) and the mask does not depend on the packing."""
    return torch.stack([rng[0], rng[1] % (1 << 32) + b])


def sequence_mods(mods: ScoreMods, b: int) -> ScoreMods:
    """Sequence b's score mods: its row of per-sequence ALiBi slopes, its dropout rng."""
    alibi = mods.alibi[b:b + 1] if mods.alibi is not None and mods.alibi.shape[0] > 1 else mods.alibi
    rng = sequence_rng(mods.rng, b) if mods.dropout_p > 0.0 else mods.rng
    return ScoreMods(mods.softcap, alibi, mods.dropout_p, rng)
