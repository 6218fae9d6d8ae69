"""Ulysses (all-to-all) attention: trade sequence shards for head shards, attend locally, trade back.

Each rank starts with all H heads of its sequence shard (B, H, L_r, E). One all_to_all gives it H/P heads
of the whole sequence (B, H/P, L, E), any attnkern backend attends them with the ordinary causal flag (the
gathered sequence is put into natural order first, whatever the layout), and a second all_to_all returns
the output to sequence shards. The backward is the same two exchanges reversed.

The exchanges of q, k and v are issued together (all_to_all_single with async_op=True) and waited for
together, so k's and v's transfers overlap q's rather than following it; the same holds for out and lse
on the way back and for the three gradients in the backward. Every wait is bounded by the process
group's timeout (comm.py): a rank that never joins makes the others raise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..api import attention
from . import comm
from .sharding import SequenceLayout, group_info, layout_from_shards, unshard_sequence


def _start_all_to_all(x: torch.Tensor, send_sizes, recv_sizes, group):
    """Start all_to_all_single of a flat tensor with per-rank element counts -> (work, output buffer)."""
    out = x.new_empty(sum(recv_sizes))
    work = dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group, async_op=True)
    return work, out


def _wait_all(started):
    """Wait for the started exchanges (bounded by the group's timeout) -> their output buffers."""
    comm.wait([work for work, _ in started])
    return [out for _, out in started]


def _shard_lengths(seq: SequenceLayout):
    return [seq.shard_length(r) for r in range(seq.world_size)]


def _start_seq_to_heads(x: torch.Tensor, seq: SequenceLayout, group):
    """Start sending (B, H, L_r, E) sequence-shard head groups to their ranks: head group j goes to rank j."""
    B, H, Lr, E = x.shape
    P = seq.world_size
    h = H // P
    parts = x.reshape(B, P, h, Lr, E).transpose(0, 1)  # (P, B, h, L_r, E): part j goes to rank j
    return _start_all_to_all(parts.reshape(-1), [B * h * Lr * E] * P,
                             [B * h * n * E for n in _shard_lengths(seq)], group)


def _finish_seq_to_heads(got: torch.Tensor, like: torch.Tensor, seq: SequenceLayout) -> torch.Tensor:
    """The received pieces -> (B, H/P, L, E) head shard of the full sequence in natural order."""
    B, H, _, E = like.shape
    h = H // seq.world_size
    lengths = _shard_lengths(seq)
    pieces = [p.view(B, h, n, E) for p, n in zip(got.split([B * h * n * E for n in lengths]), lengths)]
    return torch.cat(pieces, dim=2).index_select(2, seq.natural_order(got.device))  # sharded -> natural order


def _start_heads_to_seq(y: torch.Tensor, seq: SequenceLayout, rank: int, group):
    """Start sending a (B, H/P, L, E) head shard in natural order back to sequence shards."""
    B, h, L, E = y.shape
    P = seq.world_size
    y = y.index_select(2, seq.sharded_order(y.device))  # rank order: rank j's rows together
    lengths = _shard_lengths(seq)
    return _start_all_to_all(torch.cat([p.reshape(-1) for p in y.split(lengths, dim=2)]),
                             [B * h * n * E for n in lengths], [B * h * lengths[rank] * E] * P, group)


def _finish_heads_to_seq(got: torch.Tensor, like: torch.Tensor, seq: SequenceLayout, rank: int) -> torch.Tensor:
    """The received pieces -> (B, H, L_r, E) sequence shard (the inverse of the seq-to-heads exchange)."""
    B, h, _, E = like.shape
    P, Lr = seq.world_size, seq.shard_length(rank)
    return got.view(P, B, h, Lr, E).transpose(0, 1).reshape(B, P * h, Lr, E)


def _seq_to_heads(xs, seq, rank, group):
    """Sequence shards -> head shards, all exchanges in flight together."""
    got = _wait_all([_start_seq_to_heads(x, seq, group) for x in xs])
    return tuple(_finish_seq_to_heads(g, x, seq) for g, x in zip(got, xs))


def _heads_to_seq(ys, seq, rank, group):
    """Head shards -> sequence shards, all exchanges in flight together."""
    got = _wait_all([_start_heads_to_seq(y, seq, rank, group) for y in ys])
    return tuple(_finish_heads_to_seq(g, y, seq, rank) for g, y in zip(got, ys))


class _SeqToHeads(torch.autograd.Function):
    """(x_1, ..., x_n) sequence shards -> head shards; the backward sends the gradients back together."""

    @staticmethod
    def forward(ctx, seq, rank, group, *xs):
        ctx.args = (seq, rank, group)
        return _seq_to_heads(xs, seq, rank, group)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None) + _heads_to_seq(grads, *ctx.args)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq, rank, group, *ys):
        ctx.args = (seq, rank, group)
        return _heads_to_seq(ys, seq, rank, group)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None) + _seq_to_heads(grads, *ctx.args)


def ulysses_attention(q, k, v, *, group=None, causal=False, key_padding_mask=None, scale=None,
                      enable_gqa=False, layout: str = "zigzag", backend: Optional[str] = None,
                      return_lse: bool = False):
    """Attention over a sequence sharded across the ranks of `group` by all-to-all head exchange.

    q (B, Hq, L_r, E), k (B, H, L_r, E), v (B, H, L_r, Ev): this rank's shard in `layout` (as for
    ring_attention). Hq must be divisible by the number of ranks P. Key/value heads: if H is divisible by
    P they are split like the query heads; with enable_gqa and fewer (or not divisible) key/value heads,
    each is replicated so that every rank gets whole groups (H*r heads, r = lcm(H, P) / H; dK/dV sum the
    replicas). causal: False or True (global top-left). Returns the output shard (and the lse shard with
    return_lse=True). key_padding_mask: bool (B, L_r) as for ring_attention (gathered whole: B*L bools).
    window, attn_mask, dropout: not taken (use ring_attention for window).
    """
    from .ring import _check_inputs, check_key_padding

    if causal not in (False, True):
        raise ValueError(f"causal must be False or True (global top-left causal), got {causal!r}")
    _check_inputs(q, k, v, enable_gqa)
    rank, P = group_info(group)
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % P:
        raise ValueError(f"ulysses_attention splits the {Hq} query heads over {P} ranks: the number of query "
                         "heads must be divisible by the number of ranks (use ring_attention otherwise)")
    if Hkv % P:  # (only with enable_gqa: otherwise Hkv == Hq, checked above)
        k = k.repeat_interleave(math.lcm(Hkv, P) // Hkv, dim=1)  # whole kv groups per rank
        v = v.repeat_interleave(math.lcm(Hkv, P) // Hkv, dim=1)
    seq = layout_from_shards(q.shape[-2], group, layout, q.device)
    mask = None
    if key_padding_mask is not None:
        check_key_padding(key_padding_mask, k)
        keep = unshard_sequence(key_padding_mask.to(torch.uint8), 1, group=group, layout=layout)  # gloo: no bool
        mask = keep.bool()[:, None, None, :]
    qh, kh, vh = _SeqToHeads.apply(seq, rank, group, q, k, v)
    out, lse = attention(qh, kh, vh, causal=bool(causal), attn_mask=mask, scale=scale, enable_gqa=enable_gqa,
                         return_lse=True, backend=backend)
    if not return_lse:
        return _HeadsToSeq.apply(seq, rank, group, out)[0]
    out, lse = _HeadsToSeq.apply(seq, rank, group, out, lse.unsqueeze(-1))
    return out, lse.squeeze(-1)
