"""The "cuda" backend: the CUDA C++ kernels of csrc/cuda (mma.sync, ldmatrix, cp.async; sm80+).

Compiled into attnkern._C when setup.py finds a CUDA torch and nvcc. `auto` does not pick it yet:
it is chosen by name (backend="cuda", use_backend("cuda")) until GPU measurements show where it beats
the Triton kernels (see the closing notes of the CUDA issue). The reasons below mirror the checks of
csrc/cuda/ops_cuda.cpp, so explain() can say why a call is refused before the op would raise. Inputs
the kernels cannot read in place (a strided head dim, a view not 16-byte aligned) are copied first;
(B, L, H, E) views and the like are read as they are. Head dims that are not multiples of 8 are
zero-padded to one (a copy), so every head dim up to 256 runs. Packed variable-length batches
(varlen.py) run through the varlen ops: one launch per kernel pass over all sequences (csrc/cuda/varlen.h).
"""
from __future__ import annotations

import torch

from .. import block_map
from . import extension
from ..buffers import (new_grad, new_lse, new_mask_grad, new_output, new_residual, new_stats, new_varlen_lse,
                       new_varlen_output, new_varlen_residual, new_varlen_stats)
from ..varlen import sequence_bounds
from .base import Backend

MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8  # the kernels copy rows in 16-byte (8-element) chunks
MAX_GRID_YZ = 65535  # CUDA's limit on grid y and z


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t with its head dim zero-padded to a multiple of 8 (a fresh contiguous tensor), or t itself.
    Zero columns change no score (q·k) and only add zero output columns (p·v), which are cut off."""
    extra = -t.shape[-1] % HEAD_DIM_MULTIPLE
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def _cut(t: torch.Tensor, make_buffer, width: int) -> torch.Tensor:
    """t itself when it is `width` wide, else its first `width` head-dim columns copied into
    make_buffer() (a buffer laid out like the unpadded input)."""
    if t.shape[-1] == width:
        return t
    return make_buffer().copy_(t[..., :width])


def _ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it in place (views such as (B, L, H, E) -> (B, H, L, E)
    included), else a fresh contiguous copy (a strided head dim, a misaligned view)."""
    if _layout_problem(t, "") is None:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _layout_problem(t: torch.Tensor, name: str):
    """Why the kernels' 16-byte cp.async copies cannot read `t` in place, or None."""
    if t.stride(3) != 1 and t.shape[3] != 1:
        return f"{name} needs a unit-stride head dim (last dim), got strides {tuple(t.stride())}"
    if t.data_ptr() % 16:
        return f"{name} must start at a 16-byte aligned address"
    elem = t.element_size()
    for d in range(3):
        if t.shape[d] != 1 and (t.stride(d) * elem) % 16:
            return f"{name}'s stride of dim {d} must be a multiple of 16 bytes, got strides {tuple(t.stride())}"
    return None


def _ready_packed(t: torch.Tensor) -> torch.Tensor:
    """_ready for a packed (T, H, D) tensor (varlen.py), judged on its canonical (1, H, T, D) view."""
    if _layout_problem(t.permute(1, 0, 2).unsqueeze(0), "") is None:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _mask_map(mask, mods, q, k):
    """The mask's block map (attnkern/block_map.py, cached per mask): the forward, dQ and dK/dV skip the
    tiles it hides whole and the mask reads of the tiles it leaves unchanged. None without a
    mask, and with score modifications (their kernels read every tile)."""
    if mask is None or mods.any:
        return None
    return block_map.block_map(mask, q.shape[2], k.shape[2]).flags


class CudaBackend(Backend):
    name = "cuda"
    # Packed batches: the varlen ops run every sequence in one launch per pass (csrc/cuda/varlen.h).
    varlen = True

    def _ops(self):
        """The op namespace the glue below calls (cuda_emu.py's subclass swaps in the emulated kernels)."""
        return torch.ops.attnkern_ext

    def availability(self, device):
        if extension.EXTENSION_ERROR:
            return extension.EXTENSION_ERROR
        if not extension.has_kernels_for("CUDA"):
            return "attnkern._C was built without its CUDA kernels (no CUDA torch or nvcc at build time)"
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors, not {device.type}"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA kernels need compute capability 8.0 or newer"
        return None

    def unsupported_reason(self, problem):
        if problem.dtype not in (torch.float16, torch.bfloat16):
            return f"the CUDA kernels take float16 and bfloat16, not {problem.dtype}"
        if max(problem.E, problem.Ev) > MAX_HEAD_DIM:
            return f"head dims up to {MAX_HEAD_DIM} (got E={problem.E}, Ev={problem.Ev})"
        # Grid y holds the heads (at most MAX_GRID_YZ); batches beyond grid z's limit run as several
        # launches (csrc/cuda/launch.h), so the batch size is not limited.
        if problem.Hq > MAX_GRID_YZ:
            return f"at most {MAX_GRID_YZ} query heads (grid y), got {problem.Hq}"
        if problem.mask_requires_grad and -(-problem.mask.shape[3] // 16) > MAX_GRID_YZ:
            # The mask-gradient launch puts its key tiles (16 keys or more each) on grid y.
            return f"a mask gradient over {problem.mask.shape[3]} keys (grid y allows {MAX_GRID_YZ} tiles of 16)"
        return None

    # Head dims that are not multiples of 8 run zero-padded to the next multiple (then on the next
    # instantiated size, like every head dim); `scale` is always passed explicitly, so padding does
    # not change it.
    def forward(self, q, k, v, mask, scale, band, mods, residual):
        q0, Ev = q, v.shape[-1]
        q, k, v = _ready(_padded(q)), _ready(_padded(k)), _ready(_padded(v))
        # The output (and its residual) is laid out like the caller's query, padded or not.
        Evp = v.shape[-1]
        out, lse, stats, out_lo = new_output(q0, Evp), new_lse(q), new_stats(q), new_residual(q0, Evp, residual)
        mask_map = _mask_map(mask, mods, q, k)
        self._ops().forward(q, k, v, mask, scale, band.as_op(), *mods.op_args(), out, lse, stats,
                            out_lo if out_lo.numel() else None, mask_map)
        if out_lo.numel():
            out_lo = _cut(out_lo, lambda: new_output(q0, Ev), Ev)
        return _cut(out, lambda: new_output(q0, Ev), Ev), lse, stats, out_lo

    def backward(self, dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mods, mask_grad,
                 deterministic=False):  # always deterministic
        # The kernels read with 16-byte copies; autograd may hand over an expanded or strided dO.
        q0, k0, v0 = q, k, v
        q, k, v = _ready(_padded(q)), _ready(_padded(k)), _ready(_padded(v))
        dout, out = _ready(_padded(dout)), _ready(_padded(out))
        out_lo = _ready(_padded(out_lo)) if out_lo.numel() else None
        dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
        dmask = new_mask_grad(mask, stats.dtype) if mask_grad else None
        self._ops().backward(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band.as_op(), *mods.op_args(),
                             dq, dk, dv, dmask, _mask_map(mask, mods, q, k))
        dq, dk, dv = (_cut(g, lambda t=t: new_grad(t), t.shape[-1]) for g, t in ((dq, q0), (dk, k0), (dv, v0)))
        return dq, dk, dv, (dmask.to(mask.dtype) if dmask is not None else None)

    # Packed batches (varlen.py), with the padded path's head-dim padding and layout copies. The op reads
    # and checks the offsets itself; sequence_bounds checks them against max_seqlen, as every backend does.
    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, band, mods, residual):
        sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
        q0, Ev = q, v.shape[2]
        q, k, v = _ready_packed(_padded(q)), _ready_packed(_padded(k)), _ready_packed(_padded(v))
        Evp = v.shape[2]
        out, lse = new_varlen_output(q0, Evp), new_varlen_lse(q)
        stats, out_lo = new_varlen_stats(q), new_varlen_residual(q0, Evp, residual)
        self._ops().varlen_forward(q, k, v, cu_q, cu_k, scale, band.as_op(), mods.softcap, mods.alibi, out, lse,
                                   stats, out_lo if out_lo.numel() else None, mods.dropout_p, mods.rng)
        if out_lo.numel():
            out_lo = _cut(out_lo, lambda: new_varlen_output(q0, Ev), Ev)
        return _cut(out, lambda: new_varlen_output(q0, Ev), Ev), lse, stats, out_lo

    def varlen_backward(self, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, out_lo, stats, scale, band,
                        mods, deterministic=False):  # always deterministic
        sequence_bounds(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
        q0, k0, v0 = q, k, v
        q, k, v = _ready_packed(_padded(q)), _ready_packed(_padded(k)), _ready_packed(_padded(v))
        dout, out = _ready_packed(_padded(dout)), _ready_packed(_padded(out))
        out_lo = _ready_packed(_padded(out_lo)) if out_lo.numel() else None
        # Every row and key belongs to a sequence, whose blocks write all of its gradients (zeros where it
        # has no keys or no queries).
        dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
        self._ops().varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, out, out_lo, stats, scale, band.as_op(),
                                    mods.softcap, mods.alibi, dq, dk, dv, mods.dropout_p, mods.rng)
        return tuple(_cut(g, lambda t=t: new_grad(t), t.shape[-1]) for g, t in ((dq, q0), (dk, k0), (dv, v0)))
