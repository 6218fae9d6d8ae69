"""Ring attention: every rank keeps its queries and passes key/value blocks around the ring.

Step s of P: rank r attends its query shard to the key/value shard of rank (r - s) mod P, while the next
block is already in flight (batch_isend_irecv), and merges the partial result into its running output by
the log-sum-exp of each row. The backward walks the ring again and calls the backend's own backward
(the attention_backward op) for each block with the merged result: the global output, its row
log-sum-exp (as the softmax statistics) and dout, as FlashAttention's backward would for the whole
sequence, so each block's dQ/dK/dV are its exact share with no recomputed forward. The block's dK/dV
join an accumulator that travels with the block (its exchange overlapping the next block's compute), and
one last hop hands every rank the finished dK/dV of its own shard. Memory per rank stays O(L/P * E): a
rank holds its own shard, one block in use and one in flight, never the full sequence.

Masks at the ring level: causal and a sliding window (FlashAttention's window_size on the full sequence,
parsed by band.py) are decided per pair of segments (see sharding.py): a pair entirely outside is
skipped, one entirely inside runs unmasked, the causal diagonal runs with the kernel's top-left (or
bottom-right) causal flag, and any other partial pair gets a bool band mask of the pair's size only. A
key padding mask travels around the ring with its keys and joins the block's mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import backends, masks, ops
from ..api import _requested, attention
from ..band import make_band, parse_window
from ..problem import normalize
from .comm import wait as _wait
from .sharding import SequenceLayout, group_info, layout_from_shards

_INF = float("inf")
_TAG_KV, _TAG_DKV = 17, 18  # distinct tags: the kv and dkv exchanges of a step may be in flight together


def visible_offsets(window, causal: bool) -> Tuple[float, float]:
    """The band of visible key-minus-query offsets [lo, hi] on the full sequence for `causal` and `window`.

    window: None or (left, right), FlashAttention's window_size as attnkern.attention takes it (band.py's
    parse_window; -1: unbounded on that side): the query at position p sees keys p-left .. p+right. On the
    full sequence queries and keys have the same length, so bottom-right and top-left alignment agree.
    With causal the right bound is 0."""
    band = make_band(masks.CAUSAL_TOP_LEFT if causal else masks.CAUSAL_NONE, parse_window(window))
    return (-_INF if band.left < 0 else -band.left), (_INF if band.right < 0 else band.right)


@dataclass(frozen=True)
class BlockCall:
    """One attention call of a step: local query rows [q0, q0+ql) against block key rows [k0, k0+kl)."""

    q0: int
    ql: int
    k0: int
    kl: int
    causal: object  # False, "top_left" or "bottom_right"
    band: Optional[Tuple[int, int, float, float]]  # (global q start, global k start, lo, hi) for a bool mask

    def mask(self, device) -> Optional[torch.Tensor]:
        if self.band is None:
            return None
        qs, ks, lo, hi = self.band
        d = (torch.arange(ks, ks + self.kl, device=device).unsqueeze(0)
             - torch.arange(qs, qs + self.ql, device=device).unsqueeze(1))
        return (d >= lo) & (d <= hi)


def plan_block(q_segments, k_segments, lo: float, hi: float) -> List[BlockCall]:
    """The attention calls between a query shard and a key shard (segments of global positions); pairs
    that see nothing are left out."""
    calls = []
    q_off = 0
    for qa, ql in q_segments:
        k_off = 0
        for ka, kl in k_segments:
            if ql and kl:
                dmin, dmax = ka - (qa + ql - 1), (ka + kl - 1) - qa  # key-minus-query offsets in the pair
                if not (dmax < lo or dmin > hi):
                    causal, band = False, None
                    if dmin < lo or dmax > hi:  # partially visible
                        if lo == -_INF and hi == 0 and qa == ka:
                            causal = "top_left"
                        elif lo == -_INF and hi == 0 and qa + ql == ka + kl:
                            causal = "bottom_right"
                        else:
                            band = (qa, ka, lo, hi)
                    calls.append(BlockCall(q_off, ql, k_off, kl, causal, band))
            k_off += kl
        q_off += ql
    return calls


def _rows(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    return t.narrow(-2, start, length)


def _call_inputs(call: BlockCall, q, block):
    """(q rows, k rows, v rows, mask) of one call; block = (k, v) or (k, v, keep) with keep (B, S, 1)
    uint8, 1 = key attended."""
    mask = call.mask(q.device)
    if len(block) > 2:
        keep = _rows(block[2], call.k0, call.kl).squeeze(-1).bool()[:, None, None, :]  # (B, 1, 1, kl)
        mask = keep if mask is None else mask & keep
    k, v = block[0], block[1]
    return _rows(q, call.q0, call.ql), _rows(k, call.k0, call.kl), _rows(v, call.k0, call.kl), mask


def _run_call(call: BlockCall, q, block, scale, enable_gqa, backend):
    """One call of a step -> (out, lse) of the block alone."""
    qc, kc, vc, mask = _call_inputs(call, q, block)
    return attention(qc, kc, vc, causal=call.causal, attn_mask=mask, scale=scale, enable_gqa=enable_gqa,
                     return_lse=True, backend=backend)


def _global_stats(lse: torch.Tensor) -> torch.Tensor:
    """The backward's softmax statistics (row max m, log2 of the denominator; backends/base.py) that make
    a block's probabilities its share of the merged softmax: m = the global lse, log2 l = 0, so P =
    exp(s - lse). Rows that see nothing keep m = log2 l = -inf, as the kernels write them."""
    return torch.stack([lse, torch.where(torch.isinf(lse), lse, torch.zeros_like(lse))], dim=-1)


@dataclass
class _Merged:
    """The merged result of this rank's rows as the backward op takes it: out in q's dtype with its rounding
    residual (half inputs; else empty), dout in q's dtype, dlse (or None) and the statistics in the
    accumulator dtype; lse and delta = rowsum(dout * out) for backends that recompute their own softmax."""

    out: torch.Tensor
    out_lo: torch.Tensor
    dout: torch.Tensor
    dlse: Optional[torch.Tensor]
    stats: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor

    def rows(self, call: BlockCall):
        r = slice(call.q0, call.q0 + call.ql)
        return (_rows(self.dout, call.q0, call.ql), None if self.dlse is None else self.dlse[..., r],
                _rows(self.out, call.q0, call.ql),
                self.out_lo if self.out_lo.numel() == 0 else _rows(self.out_lo, call.q0, call.ql),
                self.stats[..., r, :].contiguous(), self.lse[..., r], self.delta[..., r])


def _call_backward(call: BlockCall, q, block, scale, enable_gqa, backend, merged: _Merged):
    """(dq rows, dk rows, dv rows) of one call, by the backend's backward op.

    A fused backend gets the merged result's rows (dout, dlse, out and the global statistics): its
    probabilities are then the block's share of the full softmax, and its gradients the block's exact
    share, with no forward recomputed. A backend that recomputes its own softmax (the reference) gets the
    block's own result, recomputed, and the gradient of the merged result with respect to it: the block's
    weight in a row is w = exp(lse_b - lse), so d/d(out_b) = w * dout and d/d(lse_b) = w * (rowsum(dout *
    out_b) - delta + dlse)."""
    qc, kc, vc, mask = _call_inputs(call, q, block)
    problem = normalize(qc, kc, vc, mask, 0.0, masks.parse_causal(call.causal), scale, enable_gqa)
    name = backends.select(problem, _requested(backend)).backend
    mods = problem.mods.op_args()
    dout, dlse, out, out_lo, stats, lse, delta = merged.rows(call)
    if not backends.get(name).backward_reads_stats:
        out_b, lse_b, stats, out_lo = ops.attention_forward(problem.q, problem.k, problem.v, problem.mask,
                                                            problem.scale, problem.band.as_op(), *mods, name,
                                                            True)
        lse_ref = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        w = torch.exp(lse_b - lse_ref)
        g_lse = w * (torch.einsum("...e,...e->...", dout.to(w.dtype), out_b.to(w.dtype)) - delta)
        dlse = g_lse if dlse is None else g_lse + w * dlse
        dout, out = (w.unsqueeze(-1) * dout.to(w.dtype)).to(dout.dtype), out_b
    dq, dk, dv, _ = ops.attention_backward(dout, dlse, problem.q, problem.k, problem.v, problem.mask, out, out_lo,
                                           stats, problem.scale, problem.band.as_op(), *mods, False, name, False)
    return dq, dk, dv


def _merge(acc_out, acc_lse, out_b, lse_b) -> None:
    """In place: (acc_out, acc_lse) <- the softmax-weighted union of the two partial results."""
    new = torch.logaddexp(acc_lse, lse_b)
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # rows that see nothing so far
    acc_out.mul_(torch.exp(acc_lse - ref).unsqueeze(-1)).addcmul_(out_b.to(acc_out.dtype),
                                                                  torch.exp(lse_b - ref).unsqueeze(-1))
    acc_lse.copy_(new)


class _Ring:
    """The ring's neighbours and the block sizes that arrive at each step."""

    def __init__(self, group, seq: SequenceLayout):
        self.group = group
        self.rank, self.world = group_info(group)
        self.seq = seq
        # batch_isend_irecv takes ranks in the default group.
        self.next = self._global((self.rank + 1) % self.world)
        self.prev = self._global((self.rank - 1) % self.world)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def owner(self, step: int) -> int:
        """Whose key/value shard this rank holds at `step`."""
        return (self.rank - step) % self.world

    def exchange(self, tensors, recv_length: int, tag: int):
        """Start sending `tensors` to the next rank and receiving same-shaped ones (with `recv_length`
        rows) from the previous; returns (requests, receive buffers)."""
        bufs, ops = [], []
        for t in tensors:
            shape = list(t.shape)
            shape[-2] = recv_length
            buf = t.new_empty(shape)
            bufs.append(buf)
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group, tag))
        return dist.batch_isend_irecv(ops), bufs


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, group, seq, lo, hi, scale, enable_gqa, backend):
        ring = _Ring(group, seq)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=acc_dtype, device=q.device)
        lse = torch.full(q.shape[:-1], -_INF, dtype=acc_dtype, device=q.device)
        q_segments = seq.segments(ring.rank)
        block = (k, v) if keep is None else (k, v, keep)
        for step in range(ring.world):
            pending = None
            if step < ring.world - 1:  # the next block travels while this one computes
                pending = ring.exchange(block, seq.shard_length(ring.owner(step + 1)), _TAG_KV)
            for call in plan_block(q_segments, seq.segments(ring.owner(step)), lo, hi):
                out_b, lse_b = _run_call(call, q, block, scale, enable_gqa, backend)
                _merge(_rows(out, call.q0, call.ql), lse[..., call.q0:call.q0 + call.ql], out_b, lse_b)
            if pending is not None:
                _wait(pending[0])
                block = tuple(pending[1])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = (keep, group, seq, lo, hi, scale, enable_gqa, backend)
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse.to(acc_dtype)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        keep, group, seq, lo, hi, scale, enable_gqa, backend = ctx.ring
        ring = _Ring(group, seq)
        acc = out.dtype
        out_q = out.to(q.dtype)
        out_lo = (out - out_q.to(acc)).to(q.dtype) if q.dtype in (torch.float16, torch.bfloat16) \
            else out.new_empty((0,), dtype=q.dtype)
        dout = torch.zeros_like(out_q) if dout is None else dout.to(q.dtype).contiguous()
        merged = _Merged(out_q, out_lo, dout, dlse, _global_stats(lse), lse,
                         torch.einsum("...e,...e->...", dout.to(acc), out))
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        q_segments = seq.segments(ring.rank)
        block = (k, v) if keep is None else (k, v, keep)
        dkv_pending = None
        for step in range(ring.world):
            kv_pending = None
            if step < ring.world - 1:
                kv_pending = ring.exchange(block, seq.shard_length(ring.owner(step + 1)), _TAG_KV)
            # This rank's share of the block's dK/dV, summed over the block's calls.
            dk_b = torch.zeros(block[0].shape, dtype=acc, device=q.device)
            dv_b = torch.zeros(block[1].shape, dtype=acc, device=q.device)
            for call in plan_block(q_segments, seq.segments(ring.owner(step)), lo, hi):
                gq, gk, gv = _call_backward(call, q, block, scale, enable_gqa, backend, merged)
                _rows(dq, call.q0, call.ql).add_(gq)
                _rows(dk_b, call.k0, call.kl).add_(gk)
                _rows(dv_b, call.k0, call.kl).add_(gv)
            if dkv_pending is not None:  # the accumulator of this block, from the previous rank
                _wait(dkv_pending[0])
                dk_b.add_(dkv_pending[1][0])
                dv_b.add_(dkv_pending[1][1])
            # Pass the accumulator on; the one that arrives belongs to the next block (after the last step:
            # this rank's own block, complete). A ring of one has nothing to pass.
            if ring.world == 1:
                return (dq.to(q.dtype), dk_b.to(k.dtype), dv_b.to(v.dtype)) + (None,) * 8
            dkv_pending = ring.exchange((dk_b, dv_b), seq.shard_length(ring.owner(step + 1)), _TAG_DKV)
            if kv_pending is not None:
                _wait(kv_pending[0])
                block = tuple(kv_pending[1])
        _wait(dkv_pending[0])
        dk, dv = dkv_pending[1]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 8


def _check_inputs(q, k, v, enable_gqa):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, local sequence, head dim), got "
                             f"{getattr(t, 'shape', type(t))}")
    if not (q.shape[-2] == k.shape[-2] == v.shape[-2]):
        raise ValueError(f"q, k and v must hold the same sequence shard (dim -2), got lengths "
                         f"{q.shape[-2]}, {k.shape[-2]}, {v.shape[-2]}; context parallelism shards one "
                         "sequence for queries and keys")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and key/value "
                         "heads must agree")
    if q.shape[1] != k.shape[1] and not (enable_gqa and q.shape[1] % k.shape[1] == 0):
        raise ValueError(f"q has {q.shape[1]} heads and k/v {k.shape[1]}: pass enable_gqa=True with a "
                         "number of query heads divisible by the key/value heads")


def check_key_padding(mask, k) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (k.shape[0], k.shape[-2]):
        raise ValueError(f"key_padding_mask must be a bool tensor (batch, local sequence) = "
                         f"{(k.shape[0], k.shape[-2])} marking the keys to attend, got "
                         f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device}, k on {k.device}")


def ring_attention(q, k, v, *, group=None, causal=False, window=None, key_padding_mask=None, scale=None,
                   enable_gqa=False, layout: str = "zigzag", backend: Optional[str] = None,
                   return_lse: bool = False):
    """Attention over a sequence sharded across the ranks of `group`, by passing key/value blocks around
    the ring. Forward and backward (dQ, dK, dV).

    q (B, Hq, L_r, E), k (B, H, L_r, E), v (B, H, L_r, Ev): this rank's shard of one sequence in `layout`
    ("zigzag" or "contiguous", see attnkern.distributed.shard_sequence; shard lengths may differ by one).
    causal: False or True (global top-left causal: position p sees keys <= p). window: None or
    (left, right), FlashAttention's window_size on the full sequence exactly as attnkern.attention takes
    it (-1: unbounded on that side; with causal the right bound is 0), see visible_offsets. key_padding_mask: bool
    (B, L_r), this rank's shard of which keys may be attended (True, as SDPA's bool masks); it travels
    with its keys, and a query that sees no key gets output 0 and lse -inf. scale, enable_gqa,
    backend: as in attnkern.attention, used for every block. Returns this rank's output shard
    (B, Hq, L_r, Ev), and with return_lse=True also its log-sum-exp (B, Hq, L_r), float32, differentiable.
    Other masks (attn_mask, dropout) are not taken. Like any collective, every rank of the group must
    make the same calls, forward and backward, in the same order.
    """
    if causal not in (False, True):
        raise ValueError(f"causal must be False or True (global top-left causal over the full sequence), "
                         f"got {causal!r}")
    _check_inputs(q, k, v, enable_gqa)
    lo, hi = visible_offsets(window, bool(causal))
    seq = layout_from_shards(q.shape[-2], group, layout, q.device)
    keep = None
    if key_padding_mask is not None:
        check_key_padding(key_padding_mask, k)
        keep = key_padding_mask.to(torch.uint8).unsqueeze(-1).contiguous()  # sequence at dim -2, like k/v
    out, lse = _RingAttention.apply(q, k, v, keep, group, seq, lo, hi, scale, enable_gqa, backend)
    return (out, lse) if return_lse else out
