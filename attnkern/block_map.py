"""Block maps: what a mask does to each tile of the scores, found once per mask and reused.

A kernel that streams (query tile × key tile) score blocks need not visit a tile the mask hides
entirely. The block map records, per sub-tile of TILE × TILE scores, two flags:

    SEES   some score of the sub-tile stays visible (a bool mask holds a True there; for float masks
           always set: a -inf entry added to a NaN or +inf score gives NaN, as torch's math path has
           it, so only a bool mask, which replaces scores, may hide a tile from a kernel)
    MASKS  some score is changed by the mask (a False; a float entry other than ±0.0)

so a sub-tile is empty (MASKS only), full (SEES only) or partial (both). Kernel tiles are whole
sub-tiles (every config's block sizes are multiples of TILE), so one map serves every autotune config.

The CUDA forward, dQ and dK/dV read the flags (their tiles are whole sub-tiles too): a key tile no sub-tile
of which SEES, for all the rows of a query block, is neither loaded nor computed (in dK/dV: a query tile,
for all the keys of a key block), and a tile no sub-tile of which MASKS is computed without reading the
mask. The Triton kernels use the spans derived from it
(BlockMap): a query block visits the keys from its rows' first to their last visible sub-tile, a key block the rows likewise, so that the tiles a bool
mask hides at the ends of a block's range (padding, block-diagonal document masks, bands) are never
visited. Two per-tile uses were compiled and measured with the compile report and left out, as Triton
3.9 compiles them: a branch around a hidden tile's loads (the K/V loads stop being pipelined, and
spills appear), and skipping the mask loads of full tiles by a branch or a predicated load (spills in
the float-mask forward and the dK/dV kernel). Hidden tiles between visible ones are computed as partial
tiles; full tiles load the mask.

The map has the mask's canonical shape (masks.py) at sub-tile grain: (Bm, Hm, ceil(Lm/TILE),
ceil(Sm/TILE)), a broadcast dim (1, or a stride-0 expanded one) staying 1, read with stride 0. It is
computed with a few torch reductions on the mask's device and cached by the mask's memory, version
counter (in-place changes bump it), shape, strides, dtype and the score lengths, while the tensor it
views is alive; so the backward, and every layer handed the same mask, reuse the forward's.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

TILE = 16  # the sub-tile edge: the smallest BLOCK_M / BLOCK_N of any kernel config
SEES = 1
MASKS = 2
CACHE_SIZE = 16  # masks remembered (a model typically has one or two per step)

_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_lock = threading.Lock()


def classify(mask: torch.Tensor) -> torch.Tensor:
    """The block map (int8 SEES | MASKS flags per TILE × TILE sub-tile) of a canonical 4-D bool or
    float mask (Bm, Hm, Lm, Sm); not cached (block_map caches)."""
    if mask.dim() != 4:
        raise ValueError(f"block map: the mask must be the canonical 4-D (Bm, Hm, Lm, Sm) view, got shape "
                         f"{tuple(mask.shape)}")
    # A stride-0 dim holds one value along it: classify that one (the map broadcasts it back).
    mask = mask[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(mask.shape, mask.stride()))]
    if mask.dtype == torch.bool:
        sees, masks = mask, ~mask
    elif mask.is_floating_point():
        masks = mask != 0  # NaN too
        sees = None
    else:
        raise ValueError(f"block map: the mask must be bool or floating point, got {mask.dtype}")
    flags = _any_per_tile(masks).to(torch.int8) * MASKS
    flags += _any_per_tile(sees).to(torch.int8) if sees is not None else SEES
    return flags


def _any_per_tile(x: torch.Tensor) -> torch.Tensor:
    """Per TILE × TILE sub-tile of the last two dims (a dim of 1 stays 1): whether any element is True.
    Padding past the edge is False, so it changes nothing."""
    Bm, Hm, Lm, Sm = x.shape
    tm, ts = (TILE if Lm > 1 else 1), (TILE if Sm > 1 else 1)
    nm, ns = -(-Lm // tm), -(-Sm // ts)
    x = torch.nn.functional.pad(x.to(torch.uint8), (0, ns * ts - Sm, 0, nm * tm - Lm))
    return x.view(Bm, Hm, nm, tm, ns, ts).amax(dim=(3, 5)).bool()


def kernel_strides(t: torch.Tensor):
    """A map's strides for the kernels: a dim of size 1 is read with stride 0."""
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: nothing proves the cache current
        return None


class BlockMap(NamedTuple):
    """A mask's block map and the spans derived from it, for scores of L rows and S keys.

    flags: int8 (Bm, Hm, R, C), SEES | MASKS per sub-tile (classify).
    key_spans: int32 (Bm, Hm, R, 2): per query sub-tile row, the keys [lo, hi) its visible sub-tiles
        cover (lo = S, hi = 0: none); a broadcast row dim (R = 1) stands for every row.
    query_spans: int32 (Bm, Hm, C, 2): per key sub-tile column, the rows [lo, hi) that see some of it.
    Kernels narrow their loops to the spans: the tiles a mask hides at either end of a block's range
    are never visited; hidden tiles between visible ones are computed (masked) like partial ones."""

    flags: torch.Tensor
    key_spans: torch.Tensor
    query_spans: torch.Tensor


def spans(flags: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """int32 (..., 2) [lo, hi) spans, in elements of a dim of `n`, of the SEES sub-tiles along `dim`
    (-1: keys per row, -2: rows per column) of a flags map; (n, 0) where none. A broadcast dim (size 1)
    spans all n."""
    sees = (flags & SEES) != 0
    cells = sees.shape[dim]
    any_ = sees.any(dim)
    as_int = sees.to(torch.int32)
    first = as_int.argmax(dim)
    last = cells - as_int.flip(dim).argmax(dim)  # one past the last SEES cell
    unit = TILE if cells > 1 else n
    lo = torch.where(any_, first * unit, n)
    hi = torch.where(any_, torch.clamp(last * unit, max=n), 0)
    return torch.stack((lo, hi), -1).to(torch.int32).contiguous()


def build(mask: torch.Tensor, L: int, S: int) -> BlockMap:
    """The BlockMap of a canonical mask for L × S scores; not cached (block_map caches)."""
    flags = classify(mask)
    return BlockMap(flags, spans(flags, S, -1), spans(flags, L, -2))


def block_map(mask: torch.Tensor, L: int, S: int) -> BlockMap:
    """build(mask, L, S), cached: a later call on the same memory with the same version counter, shape,
    strides, dtype and (L, S), while the tensor that owns the view is alive, returns the same maps. Not
    cached while a CUDA graph captures (the classification is then part of the graph, so each replay
    reclassifies whatever the mask buffer holds) nor for tensors without a version counter."""
    version = _version(mask)
    capturing = mask.is_cuda and torch.cuda.is_current_stream_capturing()
    if version is None or capturing:
        return build(mask, L, S)
    key = (mask.device, mask.data_ptr(), version, tuple(mask.shape), tuple(mask.stride()), mask.dtype, L, S)
    owner = mask._base if mask._base is not None else mask
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            ref, bmap = hit
            if ref() is owner:
                _cache.move_to_end(key)
                return bmap
            del _cache[key]  # the memory was freed and reused by another tensor
    bmap = build(mask, L, S)
    with _lock:
        _cache[key] = (weakref.ref(owner), bmap)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return bmap


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def cache_size() -> int:
    with _lock:
        return len(_cache)
