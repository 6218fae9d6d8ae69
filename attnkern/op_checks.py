"""Argument checks of the custom ops (ops.py), on metadata alone: shapes, dtypes, devices, codes.

The ops are public (`torch.ops.attnkern.attention_forward_v5(...)` is callable by anyone) and the
kernels trust their arguments: a key with too few heads would be read past its end. So every op body
and every fake (meta) implementation checks its arguments first and raises a ValueError/TypeError that
names the argument and says what was expected. Nothing here reads tensor data, so no check
synchronizes a device or breaks a torch.compile trace.

`problem.normalize` has already done these checks for calls through the public API, with messages in
the user's terms, so those calls skip them (ops.run_forward); these are the op contract's own (canonical
4-D tensors, see backends/base.py), made for every direct call of the ops.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import backends, masks
from .band import Band
from .problem import SUPPORTED_DTYPES, AttentionProblem, to_float32
from .score_mods import NONE, ScoreMods, check_op_mods


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensor(name: str, t, rank: int, names: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attnkern op: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"attnkern op: {name} must be {rank}-D {names}, got shape {tuple(t.shape)}")
    return t


def _shape(name: str, t: torch.Tensor, want: Sequence[int], names: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"attnkern op: {name} must have shape {names} = {tuple(want)}, got {tuple(t.shape)}")


def _dtype(name: str, t: torch.Tensor, want: torch.dtype, why: str) -> None:
    if t.dtype != want:
        raise TypeError(f"attnkern op: {name} must be {_dtype_name(want)} ({why}), got {_dtype_name(t.dtype)}")


def _device(name: str, t: torch.Tensor, want: torch.device) -> None:
    if t.device != want:
        raise ValueError(f"attnkern op: {name} must be on the query's device {want}, got {t.device}")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse, stats and dlse: float64 for float64 problems, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_forward_args(q, k, v, mask: Optional[torch.Tensor], scale, band, backend, residual=False,
                       deterministic=False) -> None:
    """The arguments of attention_forward: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) of one
    floating dtype and device, Hq a multiple of Hkv (both 0 for a zero-head problem), mask None or
    (Bm, Hm, Lm, Sm) with each dim 1 or full, a finite scale, a band [bottom_right, left, right]
    (band.py), a known backend name, and bools `residual` and `deterministic`."""
    if not isinstance(residual, bool):
        raise TypeError(f"attnkern op: residual must be a bool, got {type(residual).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"attnkern op: deterministic must be a bool, got {type(deterministic).__name__}")
    if not isinstance(backend, str) or backend not in backends.names() or backend == "auto":
        raise ValueError(
            f"attnkern op: backend must name a registered backend {backends.names()[1:]}, got {backend!r}"
        )
    q = _tensor("query", q, 4, "(B, Hq, L, E)")
    k = _tensor("key", k, 4, "(B, Hkv, S, E)")
    v = _tensor("value", v, 4, "(B, Hkv, S, Ev)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attnkern op: query must be float16, bfloat16, float32 or float64, got {_dtype_name(q.dtype)}")
    for name, t in (("key", k), ("value", v)):
        _dtype(name, t, q.dtype, "the query's dtype")
        _device(name, t, q.device)
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _shape("key", k, (B, Hkv, S, E), "(B, Hkv, S, E) with the query's B and E")
    _shape("value", v, (B, Hkv, S, v.shape[3]), "(B, Hkv, S, Ev) with the key's B, Hkv and S")
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):
        raise ValueError(
            f"attnkern op: the query's heads ({Hq}) must be a multiple of the key/value heads ({Hkv}); "
            f"got query {tuple(q.shape)}, key {tuple(k.shape)}"
        )
    if mask is not None:
        mask = _tensor("attn_mask", mask, 4, "(Bm, Hm, Lm, Sm)")
        _device("attn_mask", mask, q.device)
        if mask.dtype not in (torch.bool, torch.float32, q.dtype):
            raise TypeError(
                f"attnkern op: attn_mask must be bool, float32 or the query's dtype {_dtype_name(q.dtype)}, "
                f"got {_dtype_name(mask.dtype)}"
            )
        full = (B, Hq, L, S)
        if any(m != 1 and m != f for m, f in zip(mask.shape, full)):
            raise ValueError(
                f"attnkern op: attn_mask must have shape (Bm, Hm, Lm, Sm) with each dim 1 or the full "
                f"(B, Hq, L, S) = {full}, got {tuple(mask.shape)}"
            )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"attnkern op: scale must be a finite float, got {scale!r}")
    if q.dtype != torch.float64 and to_float32(scale) is None:
        raise ValueError(
            f"attnkern op: scale={scale!r} does not fit float32, in which {_dtype_name(q.dtype)} problems "
            "compute their scores"
        )
    check_band(band)


def check_band(band) -> None:
    """[bottom_right in {0, 1}, left >= -1, right >= -1] (band.Band.as_op)."""
    ok = isinstance(band, (list, tuple)) and len(band) == 3 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in band)
    if not ok or band[0] not in (0, 1) or band[1] < -1 or band[2] < -1:
        raise ValueError(
            f"attnkern op: band must be [bottom_right (0 or 1), left (>= -1), right (>= -1)], got {band!r}"
        )


def check_backward_args(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad, backend,
                        deterministic=False) -> None:
    """The arguments of attention_backward: those of the forward, plus out and dout (B, Hq, L, Ev) in
    the query's dtype, out_lo empty or (for float16/bfloat16) out's shape and dtype, stats (B, Hq, L, 2)
    and dlse None or (B, Hq, L) in the accumulator dtype, and mask_grad only with a float mask."""
    check_forward_args(q, k, v, mask, scale, band, backend, deterministic=deterministic)
    B, Hq, L, _ = q.shape
    Ev = v.shape[3]
    acc = accumulator_dtype(q.dtype)
    for name, t in (("out", out), ("grad_out", dout)):
        t = _tensor(name, t, 4, "(B, Hq, L, Ev)")
        _shape(name, t, (B, Hq, L, Ev), "(B, Hq, L, Ev)")
        _dtype(name, t, q.dtype, "the query's dtype")
        _device(name, t, q.device)
    if not isinstance(out_lo, torch.Tensor):
        raise TypeError(f"attnkern op: out_lo must be a torch.Tensor, got {type(out_lo).__name__}")
    if tuple(out_lo.shape) != (0,):  # (0,) when the forward saved no residual
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attnkern op: out_lo must be empty (shape (0,)) for {_dtype_name(q.dtype)} problems, "
                             f"got shape {tuple(out_lo.shape)}")
        out_lo = _tensor("out_lo", out_lo, 4, "(B, Hq, L, Ev)")
        _shape("out_lo", out_lo, (B, Hq, L, Ev), "(B, Hq, L, Ev), the output's")
        _dtype("out_lo", out_lo, q.dtype, "the query's dtype")
        _device("out_lo", out_lo, q.device)
    stats = _tensor("stats", stats, 4, "(B, Hq, L, 2)")
    _shape("stats", stats, (B, Hq, L, 2), "(B, Hq, L, 2)")
    _dtype("stats", stats, acc, "the forward's softmax statistics")
    _device("stats", stats, q.device)
    if not stats.is_contiguous():  # the kernels index it as a dense (B, Hq, L, 2) array
        raise ValueError(f"attnkern op: stats must be contiguous, got strides {tuple(stats.stride())}")
    if dlse is not None:
        dlse = _tensor("grad_lse", dlse, 3, "(B, Hq, L)")
        _shape("grad_lse", dlse, (B, Hq, L), "(B, Hq, L)")
        _dtype("grad_lse", dlse, acc, "the log-sum-exp's dtype")
        _device("grad_lse", dlse, q.device)
    if not isinstance(mask_grad, bool):
        raise TypeError(f"attnkern op: mask_grad must be a bool, got {type(mask_grad).__name__}")
    if mask_grad and (mask is None or mask.dtype == torch.bool):
        raise ValueError("attnkern op: mask_grad=True needs a float attn_mask (a bool mask has no gradient)")


def check_mods(softcap, alibi, dropout_p, rng, q) -> None:
    """softcap >= 0, alibi None or float32 (1 or B, Hq), dropout_p in [0, 1] with an rng when > 0."""
    check_op_mods(softcap, alibi, dropout_p, rng, q)


def check_backend_runs(q, k, v, mask, scale, band, backend, mods: ScoreMods = NONE) -> None:
    """The named backend runs this problem on q's device (its dtypes, head dims, ...), else the
    reason, as `attention(..., backend=...)` would say it. Only for real tensors (not the fake
    implementations: whether a device is usable is a property of the run, not of the trace)."""
    b = backends.get(backend)
    problem = AttentionProblem(q, k, v, mask, scale, masks.CAUSAL_NONE, band=Band.from_op(band), mods=mods,
                               dropout_p=mods.dropout_p)
    why = b.availability(q.device) or b.unsupported_reason(problem)
    if why:
        raise backends.BackendUnavailableError(f"attnkern op: backend={backend!r} cannot run this call: {why}")


def is_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """A problem with a zero-sized dim: the "reference" backend returns its (empty or all-zero) results,
    whichever backend was named, so that no kernel is launched on a zero-sized grid."""
    return q.numel() == 0 or k.shape[2] == 0 or v.shape[3] == 0
