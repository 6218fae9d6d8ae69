"""Masks: `attn_mask`, `is_causal` and the causal alignment, reduced to one description.

A user mask may have any shape that broadcasts to the scores `(*batch, Hq, L, S)`. Kernels read it
through a canonical 4-D view `(Bm, Hm, Lm, Sm)` in which every dimension is either 1 (broadcast, read
with stride 0) or full size. Nothing is expanded in memory, except the rare leading batch dims that
cannot be merged into one strided dim; those are copied at the mask's own (unexpanded) size.

The canonical view is also the mask-gradient shape: a kernel sums the score gradient over exactly the
dims that are 1, so autograd's own expand/reshape backward finishes the reduction to the user's shape.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .shapes import broadcast_shapes

try:  # torch.nn.attention.bias (torch >= 2.2): a causal mask passed as an attn_mask object
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - older torch
    CausalBias = CausalVariant = None

# Causal alignments. Query row i may attend key j iff j <= i + offset, where the offset is 0 for
# top-left (torch's `is_causal`, `tril(diagonal=0)`) and S - L for bottom-right (FlashAttention's).
CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1
CAUSAL_BOTTOM_RIGHT = 2

CAUSAL_NAMES = {CAUSAL_NONE: "none", CAUSAL_TOP_LEFT: "top_left", CAUSAL_BOTTOM_RIGHT: "bottom_right"}

# What a kernel does with the mask tile.
MASK_NONE = 0
MASK_BOOL = 1  # True = attend; False -> score -inf
MASK_FLOAT = 2  # added to the scaled scores


def parse_causal(causal) -> int:
    """`attention(causal=...)`: False/None, True (= "top_left", SDPA's is_causal), "top_left",
    "bottom_right", or one of the CAUSAL_* codes (True and False coincide with codes 1 and 0)."""
    if causal is None:
        return CAUSAL_NONE
    if isinstance(causal, int) and causal in CAUSAL_NAMES:
        return int(causal)
    if isinstance(causal, str):
        key = causal.lower().replace("-", "_")
        for code, name in CAUSAL_NAMES.items():
            if key == name and code != CAUSAL_NONE:
                return code
    raise ValueError(
        f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}"
    )


def causal_offset(causal: int, L: int, S: int) -> int:
    """The diagonal offset: row i sees keys j <= i + offset."""
    return S - L if causal == CAUSAL_BOTTOM_RIGHT else 0


CAUSAL_BIAS_WITH_IS_CAUSAL = (
    "CausalBias should not be used with causal=True: attn_mask=causal_upper_left(...)/causal_lower_right(...) "
    "already is the causal mask (torch raises the same ValueError)"
)


def is_causal_bias(mask) -> bool:
    """Whether `mask` is a torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right)."""
    return CausalBias is not None and isinstance(mask, CausalBias)


def resolve_causal_bias(mask, causal: int, L: int, S: int, device: torch.device):
    """Read a CausalBias attn_mask as torch's own CausalBias dispatch does -> (mask, causal code).

    An upper-left bias, and any bias whose two lengths are equal, is `is_causal` (top-left: torch ignores
    its lengths then); a lower-right bias is the bottom-right alignment. A lower-right bias whose lengths
    are not the inputs' (L, S) is materialized as torch's CPU path does (its bool (Lq, Lk) tril mask),
    which then broadcasts to the scores or raises. Anything else passes through unchanged.
    """
    if not is_causal_bias(mask):
        return mask, causal
    if causal != CAUSAL_NONE:
        raise ValueError(CAUSAL_BIAS_WITH_IS_CAUSAL)
    Lb, Sb = mask.seq_len_q, mask.seq_len_kv
    if mask.variant == CausalVariant.UPPER_LEFT or Lb == Sb:
        return None, CAUSAL_TOP_LEFT
    if mask.variant != CausalVariant.LOWER_RIGHT:
        raise ValueError(f"CausalBias.variant must be a CausalVariant type, but found: {mask.variant}")
    if (Lb, Sb) == (L, S):
        return None, CAUSAL_BOTTOM_RIGHT
    return torch.ones(Lb, Sb, dtype=torch.bool, device=device).tril(Sb - Lb), CAUSAL_NONE


def mask_kind(mask: Optional[torch.Tensor]) -> int:
    if mask is None:
        return MASK_NONE
    return MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT


def check_mask_dtype(mask: torch.Tensor, query_dtype: torch.dtype) -> None:
    """torch's rule: a mask is bool, float32, or the query's dtype."""
    if mask.dtype == torch.bool or mask.dtype == torch.float32 or mask.dtype == query_dtype:
        return
    raise TypeError(
        f"attn_mask must be a bool tensor (True = attend) or a float tensor of dtype float32 or the "
        f"query's dtype {query_dtype} (added to the scores); got attn_mask.dtype={mask.dtype}"
    )


def canonical_mask(
    mask: torch.Tensor, batch_shape: Sequence[int], H: int, L: int, S: int
) -> torch.Tensor:
    """Return a `(Bm, Hm, Lm, Sm)` view of `mask` (each dim 1 or full) for scores `(*batch, H, L, S)`.

    Raises ValueError when the mask does not broadcast to the scores' shape.
    """
    full = (*batch_shape, H, L, S)
    try:
        ok = mask.dim() <= len(full) and broadcast_shapes(mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention scores' shape "
            f"{full} = (*batch, heads, query length L, key length S)"
        )
    if mask.dim() == 4 and len(batch_shape) == 1:  # already (Bm, Hm, Lm, Sm), each dim 1 or full
        return mask
    m = mask.reshape((1,) * (len(full) - mask.dim()) + tuple(mask.shape))
    lead_sizes = m.shape[: len(batch_shape)]
    B = math.prod(batch_shape)
    if all(s == 1 for s in lead_sizes):
        m = m.reshape(1, *m.shape[len(batch_shape):])
    else:
        # Broadcast only the batch dims, then merge them: reshape gives a view when the strides allow
        # it, else a copy of just the mask's own trailing extent per batch element.
        tail = m.shape[len(batch_shape):]
        m = m.expand(*batch_shape, *tail).reshape(B, *tail)
    return m


def describe_mask(mask: Optional[torch.Tensor]) -> str:
    if mask is None:
        return "none"
    kind = "bool" if mask.dtype == torch.bool else f"float ({mask.dtype})"
    dims = "x".join(str(d) for d in mask.shape)
    return f"{kind} (Bm, Hm, Lm, Sm) = {dims}"
