"""The torch.library custom op of KV-cache decoding (kvcache.py), with a fake implementation, so that
attention_with_kvcache traces under torch.compile(fullgraph=True):

    attnkern::kvcache_decode_v1(q, k_cache!, v_cache!, k_new?, v_new?, cache_seqlens, block_table?, scale,
                                band, softcap, alibi?, num_splits, backend) -> (out, lse)

It appends k_new/v_new into the caches in place (declared in mutates_args, so the compiler keeps the
write and orders it before any later read of the caches), then attends on `backend` (a name kvcache.
choose_backend gave). Shapes and arguments as in kvcache.DecodeProblem: q (B, Lq, Hq, E), out (B, Lq, Hq, Ev)
in q's dtype, lse (B, Hq, Lq) float32 (float64 for float64 inputs); `band` is band.py's
[bottom_right, left, right]; `scale` as the kernels use it.

Only traced calls go through the op: attention_with_kvcache checks the arguments' metadata while
tracing, and the checks that read values on the host (lengths within the cache, pages in use within it:
kvcache.check_lengths) run here when the op runs. Eager calls run the same body (kvcache.decode_step)
without the dispatcher. Forward only: the op registers no autograd.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import kvcache
from .band import Band

CONTRACT = "v1"


@torch.library.custom_op(f"attnkern::kvcache_decode_{CONTRACT}", mutates_args=("k_cache", "v_cache"))
def kvcache_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Optional[Tensor], v_new: Optional[Tensor],
    cache_seqlens: Tensor, block_table: Optional[Tensor], scale: float, band: List[int], softcap: float,
    alibi: Optional[Tensor], num_splits: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    Lnew = 0 if k_new is None else k_new.shape[1]
    kvcache.check_lengths(k_cache, cache_seqlens, Lnew, block_table)
    seqlens = (cache_seqlens.to(torch.int64) + Lnew).to(torch.int32)
    problem = kvcache.DecodeProblem(q, k_cache, v_cache, seqlens, block_table, Band.from_op(band), scale, softcap,
                                    alibi, num_splits)
    out, lse = kvcache.decode_step(problem, k_new, v_new, cache_seqlens, backend)
    return out, lse


@kvcache_decode.register_fake
def _(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, scale, band, softcap, alibi, num_splits,
      backend):
    B, Lq, Hq, _ = q.shape
    out = q.new_empty((B, Lq, Hq, v_cache.shape[3]))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse
