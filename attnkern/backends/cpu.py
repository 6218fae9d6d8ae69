"""The "cpu" backend: the fused C++ kernels of csrc/cpu behind the backend contract.

The extension (attnkern._C, built by setup.py; see extension.py) registers the torch ops
attnkern_ext::forward and attnkern_ext::backward. When it is missing this backend says why.
"""
from __future__ import annotations

import torch

from . import extension
from ..buffers import new_grad, new_lse, new_mask_grad, new_output, new_residual, new_stats
from .base import Backend

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CpuBackend(Backend):
    name = "cpu"

    def availability(self, device):
        if extension.EXTENSION_ERROR:
            return extension.EXTENSION_ERROR
        if device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, not {device.type}"
        return None

    def unsupported_reason(self, problem):
        if problem.dtype not in KERNEL_DTYPES:
            return f"the CPU kernels take float16, bfloat16, float32 and float64, not {problem.dtype}"
        if problem.dropout_p > 0.0:
            return "dropout is not fused yet (dropout_p > 0)"
        return None

    def forward(self, q, k, v, mask, scale, band, residual):
        Ev = v.shape[-1]
        out, lse, stats, out_lo = new_output(q, Ev), new_lse(q), new_stats(q), new_residual(q, Ev, residual)
        torch.ops.attnkern_ext.forward(q, k, v, mask, scale, band.as_op(), out, lse, stats,
                                       out_lo if out_lo.numel() else None)
        return out, lse, stats, out_lo

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                 deterministic=False):  # always deterministic
        dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
        dmask = new_mask_grad(mask, stats.dtype) if mask_grad else None
        torch.ops.attnkern_ext.backward(dout, dlse, q, k, v, mask, out, out_lo if out_lo.numel() else None, stats,
                                        scale, band.as_op(), dq, dk, dv, dmask)
        return dq, dk, dv, (dmask.to(mask.dtype) if dmask is not None else None)
