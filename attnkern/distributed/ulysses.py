"""Ulysses (all-to-all) attention: trade sequence shards for head shards, attend locally, trade back.

Each rank starts with all H heads of its sequence shard (B, H, L_r, E). One all_to_all gives it H/P heads
of the whole sequence (B, H/P, L, E), any attnkern backend attends them with the ordinary causal flag (the
gathered sequence is put into natural order first, whatever the layout), and a second all_to_all returns
the output to sequence shards. The backward is the same two exchanges reversed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..api import attention
from .sharding import SequenceLayout, group_info, layout_from_shards, unshard_sequence


def _all_to_all(x: torch.Tensor, send_sizes, recv_sizes, group) -> torch.Tensor:
    """all_to_all_single of a flat tensor with per-rank element counts."""
    out = x.new_empty(sum(recv_sizes))
    dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, seq: SequenceLayout, rank: int, group) -> torch.Tensor:
    """(B, H, L_r, E) sequence shard -> (B, H/P, L, E) head shard of the full sequence in natural order."""
    B, H, Lr, E = x.shape
    P = seq.world_size
    h = H // P
    parts = x.reshape(B, P, h, Lr, E).transpose(0, 1)  # (P, B, h, L_r, E): part j goes to rank j
    lengths = [seq.shard_length(r) for r in range(P)]
    got = _all_to_all(parts.reshape(-1), [B * h * Lr * E] * P, [B * h * n * E for n in lengths], group)
    pieces = [p.view(B, h, n, E) for p, n in zip(got.split([B * h * n * E for n in lengths]), lengths)]
    return torch.cat(pieces, dim=2).index_select(2, seq.natural_order(x.device))  # sharded -> natural order


def _heads_to_seq(y: torch.Tensor, seq: SequenceLayout, rank: int, group) -> torch.Tensor:
    """(B, H/P, L, E) head shard in natural order -> (B, H, L_r, E) sequence shard (_seq_to_heads's
    inverse)."""
    B, h, L, E = y.shape
    P = seq.world_size
    y = y.index_select(2, seq.sharded_order(y.device))  # rank order: rank j's rows together
    lengths = [seq.shard_length(r) for r in range(P)]
    Lr = lengths[rank]
    got = _all_to_all(torch.cat([p.reshape(-1) for p in y.split(lengths, dim=2)]),
                      [B * h * n * E for n in lengths], [B * h * Lr * E] * P, group)
    return got.view(P, B, h, Lr, E).transpose(0, 1).reshape(B, P * h, Lr, E)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seq, rank, group):
        ctx.args = (seq, rank, group)
        return _seq_to_heads(x, seq, rank, group)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, *ctx.args), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, seq, rank, group):
        ctx.args = (seq, rank, group)
        return _heads_to_seq(y, seq, rank, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, *ctx.args), None, None, None


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
    qh, kh, vh = (_SeqToHeads.apply(t, seq, rank, group) for t in (q, k, v))
    out, lse = attention(qh, kh, vh, causal=bool(causal), attn_mask=mask, scale=scale, enable_gqa=enable_gqa,
                         return_lse=True, backend=backend)
    out = _HeadsToSeq.apply(out, seq, rank, group)
    if not return_lse:
        return out
    lse = _HeadsToSeq.apply(lse.unsqueeze(-1), seq, rank, group).squeeze(-1)
    return out, lse
