"""`context_parallel(...)`: a model's SDPA calls run over a sequence-sharded batch.

Inside the block `torch.nn.functional.scaled_dot_product_attention` is replaced by a function that runs
ring (or Ulysses) attention across the group, so a model that calls SDPA with `is_causal` (or no mask)
computes attention over the full sequence while each rank holds only its shard of the tokens. Everything
else in a transformer (embeddings, MLPs, norms) is per token and runs on the shard as it is; position
embeddings must use the shard's global positions (`SequenceLayout.positions` or shard_sequence of
torch.arange), and a loss must be summed over the ranks (see examples/train_context_parallel.py).

Hugging Face transformers models loaded with attn_implementation="attnkern" (attnkern.register_transformers)
are covered too: inside the block attnkern's attention function sends their calls to the same ring (or
Ulysses) function, and attnkern's mask function builds no mask, since a mask transformers would build
from a shard's positions means nothing on the sharded sequence (zigzag positions would even read as
packed documents). Causality comes from the layers' is_causal (top-left over the full sequence), padding
only from context_parallel(key_padding_mask=...); a padding attention_mask given to the model, a packed
batch, soft-capping or sinks raise ValueError.

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
# The SDPA replacement of the innermost active context_parallel block (read by transformers_attention).
_active = None


def active():
    """The active block's SDPA replacement, or None outside context_parallel."""
    return _active


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
    global _active
    with _lock:
        previous, previous_active = F.scaled_dot_product_attention, _active
        _active = _make_sdpa(group, layout, method, backend, window, key_padding_mask)
        _active.method = method
        F.scaled_dot_product_attention = _active
    try:
        yield
    finally:
        with _lock:
            F.scaled_dot_product_attention, _active = previous, previous_active


def transformers_mask(attention_mask) -> None:
    """attnkern's transformers mask function inside a context_parallel block: no mask at all (see the
    module's docstring); a padding mask with a padded position raises."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attnkern.distributed.context_parallel: the model was given a padding attention_mask; on "
                         "a sharded sequence pass this rank's shard of it as context_parallel(key_padding_mask=...) "
                         "and call the model without attention_mask")


def transformers_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """transformers' attention-function contract for a call inside a context_parallel block: query
    (B, Hq, L_r, E), key/value (B, Hkv, L_r, E), this rank's shard -> (output (B, L_r, Hq, Ev), None)."""
    sdpa = _active
    unsupported = [name for name in ("s_aux", "sinks", "softcap", "cu_seq_lens_q") if kwargs.get(name) is not None]
    if attention_mask is not None or unsupported:
        what = "an attention mask (packed documents or padding)" if attention_mask is not None else \
            ", ".join(unsupported)
        raise ValueError(f"attnkern.distributed.context_parallel: a transformers attention call with {what} is not "
                         "supported on a sharded sequence (causal, the context's window and key_padding_mask are)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("attnkern.distributed.context_parallel: a layer with sliding_window: pass "
                         "context_parallel(window=(W - 1, 0), method='ring') for the model instead")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = sdpa(query, key, value, dropout_p=dropout, is_causal=causal, scale=scaling,
               enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None
