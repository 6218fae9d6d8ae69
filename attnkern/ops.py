"""torch.library custom ops for the fused forward and backward, with fake (meta) implementations and
registered autograd, so that torch.compile(fullgraph=True) traces attnkern without graph breaks.

    attnkern::attention_forward_v4(q, k, v, mask?, scale, band, backend, residual, deterministic=False)
        -> (out, lse, stats, out_lo)
    attnkern::attention_backward_v4(dout, dlse?, q, k, v, mask?, out, out_lo, stats, scale, band,
                                    mask_grad, backend, deterministic=False) -> (dq, dk, dv, dmask)

`band` is [bottom_right, left, right] (band.py: which keys each query row sees; causal is right = 0).
        (dmask empty when mask_grad is False)

The suffix is the version of this contract, raised whenever a schema changes: torch's compile caches
(AOTAutograd, inductor) key on the traced graph, not on a custom op's schema, so a graph cached against
an older schema would otherwise be replayed against the new one.

`stats` (per-row softmax statistics) and `out_lo` (the half-precision output's rounding residual, empty
unless `residual` is set and the inputs are float16/bfloat16; see backends/base.py) are saved for the
backward and are not differentiable; callers expose out and lse. `residual` is set by callers when a
gradient will be needed, so inference pays nothing for it. `deterministic` asks for a bitwise
reproducible backward: the forward ignores it but carries it to the backward it registers; the backward
runs deterministic kernels when it is set or torch.are_deterministic_algorithms_enabled() is true when
the backward runs (config.deterministic_backward).

Tensors are the canonical ones of problem.py; `backend` names a registered backend. Both ops (and
their fake implementations) check their arguments on metadata first (op_checks.py), since anyone can
call them; problems with a zero-sized dim run on the "reference" backend whichever is named.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends, config, op_checks
from .band import Band
from .buffers import new_grad, new_lse, new_output, new_residual, new_stats


CONTRACT = "v4"


@torch.library.custom_op(f"attnkern::attention_forward_{CONTRACT}", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, band: List[int], backend: str,
    residual: bool, deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    op_checks.check_forward_args(q, k, v, mask, scale, band, backend, residual, deterministic)
    if op_checks.is_empty(q, k, v):
        backend = "reference"
    op_checks.check_backend_runs(q, k, v, mask, scale, band, backend)
    return backends.get(backend).forward(q, k, v, mask, scale, Band.from_op(band), residual)


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, mask, scale, band, backend, residual, deterministic=False):
    op_checks.check_forward_args(q, k, v, mask, scale, band, backend, residual, deterministic)
    Ev = v.shape[-1]
    return new_output(q, Ev), new_lse(q), new_stats(q), new_residual(q, Ev, residual)


@torch.library.custom_op(f"attnkern::attention_backward_{CONTRACT}", mutates_args=())
def attention_backward(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
    out: Tensor, out_lo: Tensor, stats: Tensor, scale: float, band: List[int], mask_grad: bool, backend: str,
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    op_checks.check_backward_args(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                                  backend, deterministic)
    if op_checks.is_empty(q, k, v):
        backend = "reference"
    op_checks.check_backend_runs(q, k, v, mask, scale, band, backend)
    dq, dk, dv, dmask = backends.get(backend).backward(
        dout, dlse, q, k, v, mask, out, out_lo, stats, scale, Band.from_op(band), mask_grad,
        config.deterministic_backward(deterministic),
    )
    if dmask is None:
        dmask = q.new_empty((0,))
    return dq, dk, dv, dmask


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                             backend, deterministic=False):
    op_checks.check_backward_args(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                                  backend, deterministic)
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty((0,))
    return new_grad(q), new_grad(k), new_grad(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, band, backend, _residual, deterministic = inputs
    out, lse, stats, out_lo = output
    ctx.save_for_backward(q, k, v, mask, out, out_lo, stats)
    ctx.scale, ctx.band, ctx.backend, ctx.deterministic = scale, list(band), backend, deterministic


def _backward(ctx, dout, dlse, _dstats, _dout_lo):
    q, k, v, mask, out, out_lo, stats = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = attention_backward(
        dout, dlse, q, k, v, mask, out, out_lo, stats, ctx.scale, ctx.band, mask_grad, ctx.backend,
        ctx.deterministic,
    )
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
