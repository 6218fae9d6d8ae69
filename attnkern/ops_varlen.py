"""torch.library custom ops for packed variable-length batches (varlen.py), beside the padded ones of
ops.py and with the same conventions (fake implementations, registered autograd, a versioned name):

    attnkern::varlen_forward_v1(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                band, softcap, alibi?, dropout_p, rng?, backend, residual,
                                deterministic=False) -> (out, lse, stats, out_lo)
    attnkern::varlen_backward_v1(dout, dlse?, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, out, out_lo, stats, scale, band, softcap, alibi?, dropout_p,
                                 rng?, backend, deterministic=False) -> (dq, dk, dv)

q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), cu_seqlens int32 (B + 1,); out (Tq, Hq, Ev), lse
(Hq, Tq), stats (Hq, Tq, 2) (backends/base.py's varlen_forward). `band` is applied per sequence
(band.py's [bottom_right, left, right], with each sequence's own L_b and S_b). alibi is None or float32
(1 or B, Hq). With dropout_p > 0, sequence b's mask is drawn with varlen.sequence_rng(rng, b).
A separate pair of ops rather than optional arguments on the padded ones: the padded contract and every
backend implementing it stay as they are. The checks on the offsets' values run in the real
implementations only (they read the device); the fakes check metadata.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends, config, op_checks
from .band import Band
from .buffers import new_varlen_lse, new_varlen_output, new_varlen_residual, new_varlen_stats
from .score_mods import ScoreMods
from .varlen import VarlenProblem, check_cu_seqlens, check_max_seqlen

CONTRACT = "v1"


def _check_args(q, k, v, cu_q, cu_k, max_q, max_k, scale, band, softcap, alibi, dropout_p, rng, backend):
    """Metadata checks of both ops (op_checks.py's, for the packed layouts)."""
    if not isinstance(backend, str) or backend not in backends.names() or backend == "auto":
        raise ValueError(f"attnkern op: backend must name a registered backend {backends.names()[1:]}, "
                         f"got {backend!r}")
    for name, t, dims in (("q", q, "(Tq, Hq, E)"), ("k", k, "(Tk, Hkv, E)"), ("v", v, "(Tk, Hkv, Ev)")):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"attnkern op: {name} must be a 3-D tensor {dims}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"attnkern op: {name} must have q's dtype and device")
    Tq, Hq, E = q.shape
    Tk, Hkv, _ = k.shape
    if tuple(k.shape) != (Tk, Hkv, E) or tuple(v.shape[:2]) != (Tk, Hkv) or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attnkern op: k (Tk, Hkv, E) and v (Tk, Hkv, Ev) must share Tk and Hkv, with q's E and "
                         f"Hq a multiple of Hkv; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B = check_cu_seqlens("cu_seqlens_q", cu_q, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_k, q.device, B)
    check_max_seqlen("max_seqlen_q", max_q)
    check_max_seqlen("max_seqlen_k", max_k)
    op_checks.check_band(band)
    op_checks.check_mods(softcap, None, dropout_p, rng, q)
    if alibi is not None and (alibi.dtype != torch.float32 or alibi.dim() != 2 or alibi.shape[1] != Hq
                              or alibi.shape[0] not in (1, B) or not alibi.is_contiguous()
                              or alibi.device != q.device):
        raise ValueError(f"attnkern op: alibi must be a contiguous float32 (1 or B, Hq) = (1 or {B}, {Hq}) "
                         f"tensor on {q.device}, got {tuple(alibi.shape)} {alibi.dtype}")


def _problem(q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods) -> VarlenProblem:
    return VarlenProblem(q, k, v, cu_q, cu_k, max_q, max_k, scale, Band.from_op(band), mods)


def _backend_for(problem: VarlenProblem, backend: str) -> str:
    if problem.is_empty:
        return "reference"
    why = backends.why_not(backend, problem)
    if why:
        raise backends.BackendUnavailableError(f"attnkern op: backend={backend!r} cannot run this call: {why}")
    return backend


@torch.library.custom_op(f"attnkern::varlen_forward_{CONTRACT}", mutates_args=())
def varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, scale: float, band: List[int], softcap: float, alibi: Optional[Tensor], dropout_p: float,
    rng: Optional[Tensor], backend: str, residual: bool, deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, softcap, alibi,
                dropout_p, rng, backend)
    mods = ScoreMods(float(softcap), alibi, float(dropout_p), rng if dropout_p > 0 else None)
    problem = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, mods)
    return backends.get(_backend_for(problem, backend)).varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, problem.band, mods, residual)


@varlen_forward.register_fake
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, softcap,
                         alibi, dropout_p, rng, backend, residual, deterministic=False):
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, softcap, alibi,
                dropout_p, rng, backend)
    Ev = v.shape[2]
    return new_varlen_output(q, Ev), new_varlen_lse(q), new_varlen_stats(q), new_varlen_residual(q, Ev, residual)


@torch.library.custom_op(f"attnkern::varlen_backward_{CONTRACT}", mutates_args=())
def varlen_backward(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, out: Tensor, out_lo: Tensor, stats: Tensor,
    scale: float, band: List[int], softcap: float, alibi: Optional[Tensor], dropout_p: float,
    rng: Optional[Tensor], backend: str, deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, softcap, alibi,
                dropout_p, rng, backend)
    _check_saved(dout, dlse, q, v, out, out_lo, stats)
    mods = ScoreMods(float(softcap), alibi, float(dropout_p), rng if dropout_p > 0 else None)
    problem = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, mods)
    dq, dk, dv = backends.get(_backend_for(problem, backend)).varlen_backward(
        dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, out_lo, stats, scale,
        problem.band, mods, config.deterministic_backward(deterministic))
    return dq, dk, dv


def _check_saved(dout, dlse, q, v, out, out_lo, stats) -> None:
    Tq, Hq, _ = q.shape
    want_out = (Tq, Hq, v.shape[2])
    acc = op_checks.accumulator_dtype(q.dtype)
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != want_out or t.dtype != q.dtype:
            raise ValueError(f"attnkern op: {name} must be (Tq, Hq, Ev) = {want_out} in q's dtype, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if out_lo.numel() and (tuple(out_lo.shape) != want_out or out_lo.dtype != q.dtype):
        raise ValueError(f"attnkern op: out_lo must be empty or (Tq, Hq, Ev) = {want_out}")
    if tuple(stats.shape) != (Hq, Tq, 2) or stats.dtype != acc:
        raise ValueError(f"attnkern op: stats must be (Hq, Tq, 2) = {(Hq, Tq, 2)} {acc}, got {tuple(stats.shape)}")
    if dlse is not None and (tuple(dlse.shape) != (Hq, Tq) or dlse.dtype != acc):
        raise ValueError(f"attnkern op: dlse must be (Hq, Tq) = {(Hq, Tq)} {acc}, got {tuple(dlse.shape)}")


@varlen_backward.register_fake
def _varlen_backward_fake(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out,
                          out_lo, stats, scale, band, softcap, alibi, dropout_p, rng, backend, deterministic=False):
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, band, softcap, alibi,
                dropout_p, rng, backend)
    _check_saved(dout, dlse, q, v, out, out_lo, stats)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, scale, band, softcap, alibi, dropout_p, rng, backend, _residual,
     deterministic) = inputs
    out, _lse, stats, out_lo = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, alibi, rng, out, out_lo, stats)
    ctx.args = (max_q, max_k, scale, list(band), softcap, dropout_p, backend, deterministic)


def _backward(ctx, dout, dlse, _dstats, _dout_lo):
    q, k, v, cu_q, cu_k, alibi, rng, out, out_lo, stats = ctx.saved_tensors
    max_q, max_k, scale, band, softcap, dropout_p, backend, deterministic = ctx.args
    dq, dk, dv = varlen_backward(dout.contiguous(), dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats,
                                 scale, band, softcap, alibi, dropout_p, rng, backend, deterministic)
    return (dq, dk, dv) + (None,) * 13


varlen_forward.register_autograd(_backward, setup_context=_setup_context)
