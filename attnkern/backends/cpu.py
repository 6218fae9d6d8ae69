"""The "cpu" backend: the fused C++ kernels of csrc/cpu behind the backend contract.

The extension (attnkern._C, built by setup.py; see extension.py) registers the torch ops
attnkern_ext::forward and attnkern_ext::backward. When it is missing this backend says why.
"""
from __future__ import annotations

import torch

from . import extension
from ..buffers import (forward_buffers, new_grad, new_lse, new_mask_grad, new_stats, new_varlen_lse,
                       new_varlen_output, new_varlen_residual, new_varlen_stats)
from ..varlen import sequence_bounds
from .base import Backend

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _has_varlen_ops(dropout: bool = False) -> bool:
    """Whether the extension registers the varlen ops (with their dropout arguments, if `dropout`: an
    extension built before those were added runs dropout through the loop over sequences)."""
    if not hasattr(torch.ops.attnkern_ext, "varlen_forward"):
        return False
    args = torch.ops.attnkern_ext.varlen_forward.default._schema.arguments
    return not dropout or any(a.name == "dropout_p" for a in args)


class CpuBackend(Backend):
    name = "cpu"
    varlen = True  # packed batches: varlen_forward/backward below

    def availability(self, device):
        if extension.EXTENSION_ERROR:
            return extension.EXTENSION_ERROR
        if device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, not {device.type}"
        return None

    def unsupported_reason(self, problem):
        if problem.dtype not in KERNEL_DTYPES:
            return f"the CPU kernels take float16, bfloat16, float32 and float64, not {problem.dtype}"
        return None  # softcap, ALiBi and dropout are fused (csrc/cpu/score_mods.h)

    def forward(self, q, k, v, mask, scale, band, mods, residual):
        Ev = v.shape[-1]
        out, lse, stats, out_lo = forward_buffers(q, Ev, residual)
        torch.ops.attnkern_ext.forward(q, k, v, mask, scale, band.as_op(), *mods.op_args(), out, lse, stats,
                                       out_lo if out_lo.numel() else None)
        return out, lse, stats, out_lo

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mods, mask_grad,
                 deterministic=False):  # always deterministic
        dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
        dmask = new_mask_grad(mask, stats.dtype) if mask_grad else None
        torch.ops.attnkern_ext.backward(dout, dlse, q, k, v, mask, out, out_lo if out_lo.numel() else None, stats,
                                        scale, band.as_op(), *mods.op_args(), dq, dk, dv, dmask)
        return dq, dk, dv, (dmask.to(mask.dtype) if dmask is not None else None)

    # Packed batches: attnkern_ext::varlen_forward/backward (csrc/cpu/varlen_cpu.cpp) run every sequence
    # in one parallel region, each on views of the packed tensors (dropout with each sequence's own rng). An
    # extension built before those ops take base.py's loop over sequences, for which the hooks below write
    # each sequence straight into its rows of the packed output and gradients.
    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods, residual):
        if not _has_varlen_ops(mods.dropout_p > 0.0):
            return super().varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods, residual)
        bounds = sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)  # checks the offsets
        Ev = v.shape[2]
        out, lse = new_varlen_output(q, Ev), new_varlen_lse(q)
        stats, out_lo = new_varlen_stats(q), new_varlen_residual(q, Ev, residual)
        torch.ops.attnkern_ext.varlen_forward(q, k, v, cu_q, cu_k, scale, band.as_op(), mods.softcap, mods.alibi,
                                              out, lse, stats, out_lo if out_lo.numel() else None,
                                              *self._varlen_dropout(mods))
        for q0, q1, k0, k1 in bounds:
            if q1 > q0 and k1 == k0:  # rows that see no key: 0, lse -inf (base.py)
                out[q0:q1].zero_()
                if out_lo.numel():
                    out_lo[q0:q1].zero_()
                lse[:, q0:q1].fill_(float("-inf"))
                stats[:, q0:q1].fill_(float("-inf"))
        return out, lse, stats, out_lo

    def varlen_backward(self, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats, scale, band,
                        mods, deterministic=False):
        if not _has_varlen_ops(mods.dropout_p > 0.0):
            return super().varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats,
                                           scale, band, mods, deterministic)
        sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
        # Zeros where no sequence's rows reach (keys of sequences without queries, rows that see no key).
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        torch.ops.attnkern_ext.varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, out,
                                               out_lo if out_lo.numel() else None, stats, scale, band.as_op(),
                                               mods.softcap, mods.alibi, dq, dk, dv, *self._varlen_dropout(mods))
        return dq, dk, dv

    @staticmethod
    def _varlen_dropout(mods):
        """The varlen ops' trailing (dropout_p, rng), or nothing (an extension whose ops lack them)."""
        return (mods.dropout_p, mods.rng) if mods.dropout_p > 0.0 else ()

    def sequence_forward(self, q, k, v, scale, band, mods, residual, out, out_lo):
        lse, stats = new_lse(q), new_stats(q)
        torch.ops.attnkern_ext.forward(q, k, v, None, scale, band.as_op(), *mods.op_args(), out, lse, stats, out_lo)
        return lse, stats

    def sequence_backward(self, dout, dlse, q, k, v, out, out_lo, stats, scale, band, mods, deterministic,
                          dq, dk, dv):
        torch.ops.attnkern_ext.backward(dout, dlse, q, k, v, None, out, out_lo, stats, scale, band.as_op(),
                                        *mods.op_args(), dq, dk, dv, None)
