"""torch.library custom ops for the fused forward and backward, with fake (meta) implementations and
registered autograd, so that torch.compile(fullgraph=True) traces attnkern without graph breaks.

    attnkern::attention_forward_v5(q, k, v, mask?, scale, band, softcap, alibi?, dropout_p, rng?,
                                   backend, residual, deterministic=False) -> (out, lse, stats, out_lo)
    attnkern::attention_backward_v5(dout, dlse?, q, k, v, mask?, out, out_lo, stats, scale, band,
                                    softcap, alibi?, dropout_p, rng?, mask_grad, backend,
                                    deterministic=False) -> (dq, dk, dv, dmask)
        (dmask empty when mask_grad is False)

`band` is [bottom_right, left, right] (band.py: which keys each query row sees; causal is right = 0).
`softcap` (0: none), `alibi` (None or float32 (1 or B, Hq)), `dropout_p` and `rng` (None or int64 (2,):
the dropout mask's seed and offset, the same tensor in the forward and its backward) are the fields of
score_mods.ScoreMods.

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
call them; problems with a zero-sized dim run on the "reference" backend whichever is named. The public
API, which made those checks already, calls the forward through `run_forward` (bottom of this file):
marked as checked, and in eager mode, where nothing watches ops, as the op's body (under the op's own
autograd functions when a gradient is recorded) without the dispatcher's round trips.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends, config, op_checks
from .band import Band
from .score_mods import ScoreMods
from .buffers import forward_buffers, new_grad


CONTRACT = "v5"


@torch.library.custom_op(f"attnkern::attention_forward_{CONTRACT}", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, band: List[int], softcap: float,
    alibi: Optional[Tensor], dropout_p: float, rng: Optional[Tensor], backend: str, residual: bool,
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    checked = _take_checked(q, k, v, mask, backend)
    return _forward(q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual, deterministic,
                    checked)


def _forward(q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual, deterministic,
             checked: bool):
    """The forward op's body; `checked`: the caller made the op's checks already (see run_forward)."""
    if not checked:
        op_checks.check_forward_args(q, k, v, mask, scale, band, backend, residual, deterministic)
        op_checks.check_mods(softcap, alibi, dropout_p, rng, q)
    mods = ScoreMods(float(softcap), alibi, float(dropout_p), rng if dropout_p > 0 else None)
    if op_checks.is_empty(q, k, v):
        backend = "reference"
    if not checked:
        op_checks.check_backend_runs(q, k, v, mask, scale, band, backend, mods)
    return backends.get(backend).forward(q, k, v, mask, scale, Band.from_op(band), mods, residual)


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual,
                            deterministic=False):
    op_checks.check_forward_args(q, k, v, mask, scale, band, backend, residual, deterministic)
    op_checks.check_mods(softcap, alibi, dropout_p, rng, q)
    Ev = v.shape[-1]
    return forward_buffers(q, Ev, residual)


@torch.library.custom_op(f"attnkern::attention_backward_{CONTRACT}", mutates_args=())
def attention_backward(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
    out: Tensor, out_lo: Tensor, stats: Tensor, scale: float, band: List[int], softcap: float,
    alibi: Optional[Tensor], dropout_p: float, rng: Optional[Tensor], mask_grad: bool, backend: str,
    deterministic: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    op_checks.check_backward_args(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                                  backend, deterministic)
    op_checks.check_mods(softcap, alibi, dropout_p, rng, q)
    mods = ScoreMods(float(softcap), alibi, float(dropout_p), rng if dropout_p > 0 else None)
    if op_checks.is_empty(q, k, v):
        backend = "reference"
    op_checks.check_backend_runs(q, k, v, mask, scale, band, backend, mods)
    dq, dk, dv, dmask = backends.get(backend).backward(
        dout, dlse, q, k, v, mask, out, out_lo, stats, scale, Band.from_op(band), mods, mask_grad,
        config.deterministic_backward(deterministic),
    )
    if dmask is None:
        dmask = q.new_empty((0,))
    return dq, dk, dv, dmask


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, softcap, alibi,
                             dropout_p, rng, mask_grad, backend, deterministic=False):
    op_checks.check_backward_args(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, band, mask_grad,
                                  backend, deterministic)
    op_checks.check_mods(softcap, alibi, dropout_p, rng, q)
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty((0,))
    return new_grad(q), new_grad(k), new_grad(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, _residual, deterministic = inputs
    out, lse, stats, out_lo = output
    ctx.save_for_backward(q, k, v, mask, alibi, rng, out, out_lo, stats)
    ctx.scale, ctx.band, ctx.backend, ctx.deterministic = scale, list(band), backend, deterministic
    ctx.softcap, ctx.dropout_p = softcap, dropout_p


def _backward(ctx, dout, dlse, _dstats, _dout_lo):
    q, k, v, mask, alibi, rng, out, out_lo, stats = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = attention_backward(
        dout, dlse, q, k, v, mask, out, out_lo, stats, ctx.scale, ctx.band, ctx.softcap, alibi, ctx.dropout_p,
        rng, mask_grad, ctx.backend, ctx.deterministic,
    )
    return (dq, dk, dv, (dmask if mask_grad else None)) + (None,) * 9


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Calls from the public API (api._run) arrive checked: problem.normalize and backends.select have made
# every check of the forward op on these very tensors, with messages in the caller's terms. Repeating
# them cost about a tenth of a small call's time, so such a call is marked for the op body (a thread-local
# record of its arguments, taken by the first op body that receives exactly them); a direct call of the
# op is never marked and is checked in full.
_marked = threading.local()


def _take_checked(q, k, v, mask, backend) -> bool:
    marked = getattr(_marked, "args", None)
    if marked is None or marked[0] is not q or marked[1] is not k or marked[2] is not v or marked[3] is not mask \
            or marked[4] != backend:
        return False
    _marked.args = None
    return True


def _plain(t) -> bool:
    return t is None or type(t) is torch.Tensor


def _nothing_intercepts(q, k, v, mask) -> bool:
    """Whether calling the op would only pass the call through to its body: eager mode, plain tensors, and
    nothing that watches or transforms ops (torch function or dispatch modes, functorch transforms such
    as vmap, the profiler, torch.jit.trace)."""
    return (not torch.compiler.is_compiling() and _plain(q) and _plain(k) and _plain(v) and _plain(mask)
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None and not torch._C._autograd._profiler_enabled()
            and torch._C._get_tracing_state() is None)


class _EagerForward(torch.autograd.Function):
    """The forward op's body under the op's own registered autograd (_setup_context, _backward), for
    eager calls that nothing intercepts: what the op's autograd wrapper does, without the dispatcher
    round trips and the generic wrapper's per-call schema work (torch's fill_defaults)."""

    @staticmethod
    def forward(ctx, *args):
        output = _forward(*args, True)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


def run_forward(q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual, deterministic,
                records_grad: bool):
    """attention_forward for a caller that checked its arguments as the op would (api._run).
    `records_grad`: autograd will record the call (grad mode on and q, k, v or mask requiring grad).

    Where calling the op would only pass the call through (`_nothing_intercepts`), its body runs
    directly: as it is when no gradient is recorded, else under the op's autograd (_EagerForward).
    Otherwise the op runs, marked as checked."""
    if _nothing_intercepts(q, k, v, mask):
        args = (q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual, deterministic)
        return _EagerForward.apply(*args) if records_grad else _forward(*args, True)
    if torch.compiler.is_compiling():  # a traced graph replays the op on its own: nothing to mark
        return attention_forward(q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual,
                                 deterministic)
    _marked.args = (q, k, v, mask, backend)
    try:
        return attention_forward(q, k, v, mask, scale, band, softcap, alibi, dropout_p, rng, backend, residual,
                                 deterministic)
    finally:
        _marked.args = None
