"""`context_parallel(...)`: a model's SDPA calls run over a sequence-sharded batch.

Inside the block `torch.nn.functional.scaled_dot_product_attention` is replaced by a function that runs
ring (or Ulysses) attention across the group, so a model that calls SDPA with `is_causal` (or no mask)
computes attention over the full sequence while each rank holds only its shard of the tokens. Everything
else in a transformer (embeddings, MLPs, norms) is per token and runs on the shard as it is; position
embeddings must use the shard's global positions (`SequenceLayout.positions` or shard_sequence of
torch.arange), and a loss must be summed over the ranks (see examples/train_context_parallel.py).

The patch lies over whatever the attribute held before (torch's function or attnkern.replace_sdpa's
wrapper) and puts it back on exit; enter it inside any replace_sdpa() block, not around one. Calls with
an attn_mask, dropout_p > 0 or non-4-D tensors raise ValueError: on a sharded sequence they have no
meaning this function could give them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch.nn.functional as F

from .ring import ring_attention
from .sharding import check_layout
from .ulysses import ulysses_attention

_lock = threading.Lock()
METHODS = ("ring", "ulysses")


def _make_sdpa(group, layout, method, backend, window, key_padding_mask):
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if attn_mask is not None:
            raise ValueError("attnkern.distributed.context_parallel: SDPA was called with an attn_mask; on a "
                             "sequence-sharded batch only is_causal (and the context's window and key_padding_mask) "
                             "are supported")
        if dropout_p:
            raise ValueError(f"attnkern.distributed.context_parallel: dropout_p={dropout_p} is not supported "
                             "(call the model in eval mode or with attention dropout 0)")
        if query.dim() != 4:
            raise ValueError(f"attnkern.distributed.context_parallel: query must be (batch, heads, local "
                             f"sequence, head dim), got shape {tuple(query.shape)}")
        if method == "ring":
            return ring_attention(query, key, value, group=group, causal=bool(is_causal), window=window,
                                  key_padding_mask=key_padding_mask, scale=scale, enable_gqa=enable_gqa,
                                  layout=layout, backend=backend)
        return ulysses_attention(query, key, value, group=group, causal=bool(is_causal),
                                 key_padding_mask=key_padding_mask, scale=scale,
                                 enable_gqa=enable_gqa, layout=layout, backend=backend)

    scaled_dot_product_attention.__qualname__ = f"scaled_dot_product_attention[attnkern.context_parallel:{method}]"
    return scaled_dot_product_attention


@contextlib.contextmanager
def context_parallel(group=None, *, layout: str = "zigzag", method: str = "ring", backend: Optional[str] = None,
                     window=None, key_padding_mask=None):
    """Within the block, F.scaled_dot_product_attention runs `method` ("ring" or "ulysses") attention over
    the sequence sharded across `group` in `layout` (shard inputs with shard_sequence). backend: the
    attnkern backend of the per-rank attention (None: use_backend/ATTNKERN_BACKEND/auto). window: a
    sliding window for every call (ring only). key_padding_mask: this rank's bool (B, L_r) shard of the
    keys to attend, for every call (a padded batch). Process-wide, like replace_sdpa."""
    check_layout(layout)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if window is not None and method != "ring":
        raise ValueError("window is supported by method='ring' only")
    with _lock:
        previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _make_sdpa(group, layout, method, backend, window, key_padding_mask)
    try:
        yield
    finally:
        with _lock:
            F.scaled_dot_product_attention = previous
