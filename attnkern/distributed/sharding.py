"""Which part of the sequence each rank holds, and helpers to shard and unshard a batch that way.

Layouts (P ranks, a sequence of length L cut into pieces whose sizes differ by at most one, larger first,
as torch.tensor_split cuts):
- "contiguous": L in P pieces; rank i holds piece i.
- "zigzag": L in 2P chunks; rank i holds chunks i and 2P-1-i, in that order. Under causal attention every
  rank then has the same amount of visible work (an early chunk sees little, its partner late chunk much).

A rank's shard is the concatenation of its segments along the sequence dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _piece_bounds(length: int, pieces: int) -> List[Tuple[int, int]]:
    """(start, length) of `pieces` pieces of `length` cut as torch.tensor_split does."""
    base, extra = divmod(length, pieces)
    bounds, start = [], 0
    for i in range(pieces):
        n = base + (1 if i < extra else 0)
        bounds.append((start, n))
        start += n
    return bounds


@dataclass(frozen=True)
class SequenceLayout:
    """The segments (global start, length) of every rank's shard of a length-`length` sequence."""

    length: int
    world_size: int
    layout: str

    def segments(self, rank: int) -> List[Tuple[int, int]]:
        if self.layout == "contiguous":
            return [_piece_bounds(self.length, self.world_size)[rank]]
        chunks = _piece_bounds(self.length, 2 * self.world_size)
        return [chunks[rank], chunks[2 * self.world_size - 1 - rank]]

    def shard_length(self, rank: int) -> int:
        return sum(n for _, n in self.segments(rank))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global positions of the shard's elements, in shard order."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.segments(rank)])

    def sharded_order(self, device=None) -> torch.Tensor:
        """Global positions of the concatenation of all shards in rank order (the gathered order)."""
        return torch.cat([self.positions(r, device) for r in range(self.world_size)])

    def natural_order(self, device=None) -> torch.Tensor:
        """Indices that put the gathered (sharded-order) sequence back in natural order."""
        inverse = torch.empty(self.length, dtype=torch.long, device=device)
        inverse[self.sharded_order(device)] = torch.arange(self.length, device=device)
        return inverse


def group_info(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnkern.distributed needs torch.distributed initialized (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def layout_from_shards(local_length: int, group, layout: str, device) -> SequenceLayout:
    """Gather every rank's shard length (one small all_gather) and check they form `layout`."""
    check_layout(layout)
    rank, world = group_info(group)
    mine = torch.tensor([local_length], dtype=torch.int64, device=device)
    lengths = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(lengths, mine, group=group)
    lengths = [int(t.item()) for t in lengths]
    result = SequenceLayout(sum(lengths), world, layout)
    expected = [result.shard_length(r) for r in range(world)]
    if lengths != expected:
        raise ValueError(
            f"the ranks' sequence shards have lengths {lengths}, but a {layout!r} layout of length "
            f"{result.length} over {world} ranks has {expected}; shard with attnkern.distributed.shard_sequence")
    return result


def shard_sequence(x: torch.Tensor, dim: int = -2, *, group=None, layout: str = "zigzag",
                   rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's shard of the full-sequence tensor `x` along `dim` (-2 for (B, H, L, E), 1 for (B, L)
    token ids). `rank`/`world_size` default to the group's; pass them to shard without a process group."""
    check_layout(layout)
    if rank is None or world_size is None:
        rank, world_size = group_info(group)
    seq = SequenceLayout(x.shape[dim], world_size, layout)
    return torch.cat([x.narrow(dim, s, n) for s, n in seq.segments(rank)], dim=dim)


def unshard_sequence(x: torch.Tensor, dim: int = -2, *, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The full sequence from every rank's shard `x` (all_gather; every rank gets the result). Not
    differentiable; for checks and for gathering results, not inside a training step."""
    dim = dim % x.dim()
    seq = layout_from_shards(x.shape[dim], group, layout, x.device)
    rank, world = group_info(group)
    longest = max(seq.shard_length(r) for r in range(world))
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()  # all_gather wants equal shapes
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p.narrow(dim, 0, seq.shard_length(r)) for r, p in enumerate(parts)], dim=dim)
    return gathered.index_select(dim, seq.natural_order(x.device))  # every element at its global position
