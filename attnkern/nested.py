"""`scaled_dot_product_attention` on torch's nested jagged tensors (torch.nested, layout=torch.jagged),
mapped onto the packed variable-length path (varlen.py) without padding.

Accepted as torch's own SDPA accepts them: query, key and value all nested jagged tensors (B, H, j, E)
(the usual (B, j, H, E) nested tensor transposed), ragged in the sequence dim, key/value with their own
lengths; no attn_mask and no is_causal (torch refuses both for nested inputs). The packed buffers behind
them are the varlen layout (total, H, E) as they stand, their offsets the cu_seqlens. The result is a
nested jagged tensor (B, H, j, Ev) with the query's offsets, as torch returns it.
"""
from __future__ import annotations

import torch


def is_jagged(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged


def _packed(name: str, t: torch.Tensor):
    """(values (total, H, E), int32 offsets (B + 1,), max length) of a (B, H, j, E) jagged tensor."""
    if not is_jagged(t):
        raise ValueError(f"{name}: with a nested query, key and value must be nested tensors with "
                         f"layout=torch.jagged too, got {'a strided nested tensor' if t.is_nested else 'a dense tensor'}")
    if t.dim() != 4 or t._ragged_idx != 2:
        raise ValueError(f"{name} must be a nested jagged tensor (B, H, j, E), ragged in dim 2 (a (B, j, H, E) "
                         f"nested tensor transposed), got {t.dim()} dims ragged in dim {t._ragged_idx}")
    if t.lengths() is not None:
        raise ValueError(f"{name}: nested tensors with holes (lengths beside offsets) are not supported; "
                         "pass a contiguous jagged tensor")
    packed = t.transpose(1, 2)
    offsets = packed.offsets()
    n = packed._maybe_max_seqlen
    if n is None:
        n = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return packed.values(), offsets.to(torch.int32), int(n)


def pack_nested(query, key, value, attn_mask, is_causal):
    """Check a nested call as torch's SDPA would and return the packed varlen arguments
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k); reads no tensor data beyond the
    offsets (and their maximum when the nested tensor does not cache it)."""
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported with nested (jagged) query/key/value, as in torch's SDPA")
    if is_causal:
        raise ValueError("is_causal=True is not supported with nested (jagged) query/key/value, as in torch's "
                         "SDPA; use attnkern.varlen_attention(..., causal=True) on the packed values")
    q, cu_q, max_q = _packed("query", query)
    k, cu_k, max_k = _packed("key", key)
    v, cu_v, _ = _packed("value", value)
    if k.shape[0] != v.shape[0] or (cu_k.shape != cu_v.shape or not torch.equal(cu_k, cu_v)):
        raise ValueError("key and value must have the same sequence lengths (offsets)")
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(f"query and key must have the same batch size, got {cu_q.shape[0] - 1} and "
                         f"{cu_k.shape[0] - 1}")
    return q, k, v, cu_q, cu_k, max_q, max_k


def nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=None):
    """scaled_dot_product_attention for nested jagged inputs (see the module docstring)."""
    from .api import varlen_attention

    q, k, v, cu_q, cu_k, max_q, max_k = pack_nested(query, key, value, attn_mask, is_causal)
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, enable_gqa=enable_gqa,
                           dropout_p=dropout_p, backend=backend)
    nested = torch.nested.nested_tensor_from_jagged(out, query.transpose(1, 2).offsets(), max_seqlen=max_q)
    return nested.transpose(1, 2)
