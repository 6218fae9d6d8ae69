"""The "triton" backend: the fused kernels of attnkern/triton behind the backend contract.

Runs on CUDA GPUs, and on the CPU under the Triton interpreter (TRITON_INTERPRET=1 set before attnkern
is imported), which is how the CPU test suite exercises the very same kernels.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ..varlen import sequence_bounds
from .base import Backend

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Triton decides interpreted vs compiled when the kernels are decorated, so the variable counts only if
# it was set before attnkern was imported; read it once, here, to stay consistent with the kernels.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Found, not imported: importing triton costs about a second, paid on the first kernel call instead.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
MAX_GRID_YZ = 65535  # the launches' grid axes 1 and 2 (triton/common.py)


class TritonBackend(Backend):
    name = "triton"
    varlen = True  # packed batches: one launch per kernel over every sequence (the kernels' VARLEN)

    def availability(self, device):
        if not _TRITON_FOUND:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available in this torch build"
            return None
        if device.type == "cpu":
            if INTERPRETING:
                return None
            return ("CPU tensors run Triton kernels only under the interpreter: set TRITON_INTERPRET=1 "
                    "before importing attnkern")
        return f"Triton kernels run on CUDA devices, not {device.type}"

    def unsupported_reason(self, problem):
        if problem.dtype not in KERNEL_DTYPES:
            return f"the Triton kernels take float16, bfloat16 and float32, not {problem.dtype}"
        if max(problem.E, problem.Ev) > MAX_HEAD_DIM:
            return f"head dims up to {MAX_HEAD_DIM} (got E={problem.E}, Ev={problem.Ev})"
        if problem.dtype == torch.bfloat16:
            if problem.device.type == "cpu":
                return "the Triton CPU interpreter computes bfloat16 dots wrongly; bfloat16 runs on a GPU"
            if torch.cuda.get_device_capability(problem.device) < (8, 0):
                return "bfloat16 kernels need a GPU of compute capability 8.0 or newer"
        # Grid axis 1 holds the heads (or the dMask launch's key tiles, 16 keys or more each); batches
        # beyond axis 2's limit run as several launches (triton/common.py batch_slices).
        if problem.Hq > MAX_GRID_YZ:
            return f"at most {MAX_GRID_YZ} query heads (grid axis 1), got {problem.Hq}"
        if getattr(problem, "is_varlen", False) and not problem.band.bottom_right:
            return "packed batches align their bands bottom-right in the Triton kernels (got a top-left band)"
        if problem.mask_requires_grad and -(-problem.mask.shape[3] // 16) > MAX_GRID_YZ:
            return (f"a mask gradient over {problem.mask.shape[3]} keys (grid axis 1 allows {MAX_GRID_YZ} "
                    "tiles of 16)")
        return None

    def forward(self, q, k, v, mask, scale, band, mods, residual):
        from ..triton import attention_forward

        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return attention_forward(q, k, v, mask, scale, band, residual, mods)

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mods, mask_grad,
                 deterministic=False):
        from ..triton import attention_backward

        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return attention_backward(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                                      deterministic, mods)

    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods, residual):
        from ..triton import varlen_forward

        sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)  # checks the offsets' values
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, band, residual, mods)

    def varlen_backward(self, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats, scale, band, mods,
                        deterministic=False):
        from ..triton import varlen_backward

        sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats, scale, band,
                                   deterministic, mods)

    def backward_path(self, deterministic):
        from ..config import SINGLE_PASS_ENV, single_pass_backward

        if deterministic or not single_pass_backward():
            return "two-pass (dK/dV, then dQ; no atomics): bitwise reproducible"
        return ("single-pass (dK, dV and dQ in one sweep, dQ summed with float32 atomics: its last bits may "
                f"vary run to run on a GPU; opted into with {SINGLE_PASS_ENV}=1; deterministic=True or "
                "torch.use_deterministic_algorithms(True) selects the two-pass one)")

