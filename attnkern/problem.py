"""Argument checks and normalization: SDPA-style inputs -> one `AttentionProblem`.

Every backend sees the same canonical problem:
    q    (B, Hq,  L, E)      k (B, Hkv, S, E)      v (B, Hkv, S, Ev)
    mask None or (Bm, Hm, Lm, Sm), each dim 1 (broadcast) or full   (see masks.py)
with Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)) and any strides. The
leading batch dims of the user's tensors are flattened into B, views whenever the strides allow it.
The user-facing output shape is kept so the result can be viewed back.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from . import masks
from .band import Band, make_band, parse_window
from .score_mods import NONE, ScoreMods, check_alibi, check_softcap, make_mods
from .shapes import broadcast_shapes

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionProblem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    causal: int
    dropout_p: float = 0.0
    batch_shape: Tuple[int, ...] = ()
    # Whether the user passed a head dim (inputs of rank >= 3); 2-D inputs get a head dim of 1.
    has_head_dim: bool = True
    notes: list = field(default_factory=list)  # normalization steps that copied memory, for explain()
    window: Optional[Tuple[int, int]] = None  # (left, right), -1 unbounded (band.parse_window)
    # Which keys each row sees apart from the mask (band.py): by default causal and window together.
    band: Optional[Band] = None
    # Soft-capping, ALiBi and dropout (score_mods.py); dropout_p above is the same as mods.dropout_p.
    mods: ScoreMods = NONE

    def __post_init__(self):
        if self.band is None:
            self.band = make_band(self.causal, self.window)
    # The caller asked for a bitwise-reproducible backward (torch's global switch is read when the
    # backward runs: config.deterministic_backward).
    deterministic: bool = False

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def L(self) -> int:
        return self.q.shape[2]

    @property
    def S(self) -> int:
        return self.k.shape[2]

    @property
    def E(self) -> int:
        return self.q.shape[3]

    @property
    def Ev(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def mask_kind(self) -> int:
        return masks.mask_kind(self.mask)

    @property
    def mask_requires_grad(self) -> bool:
        return self.mask is not None and self.mask.requires_grad

    @property
    def needs_grad(self) -> bool:
        """Whether autograd will want a backward of this call (the forward then saves more for it)."""
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.q, self.k, self.v, self.mask))

    @property
    def is_empty(self) -> bool:
        return self.q.numel() == 0 or self.S == 0 or self.Ev == 0 or self.B == 0

    def output_shape(self) -> Tuple[int, ...]:
        # Kept once computed: the call fast path (fastpath.py) reuses a problem, memo included, for calls
        # with the same shapes.
        shape = self.__dict__.get("_output_shape")
        if shape is None:
            heads = (self.Hq,) if self.has_head_dim else ()
            shape = self.__dict__["_output_shape"] = (*self.batch_shape, *heads, self.L, self.Ev)
        return shape

    def lse_shape(self) -> Tuple[int, ...]:
        heads = (self.Hq,) if self.has_head_dim else ()
        return (*self.batch_shape, *heads, self.L)

    def summary(self) -> str:
        return (
            f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} L={self.L} S={self.S} E={self.E} Ev={self.Ev} "
            f"dtype={str(self.dtype).replace('torch.', '')} device={self.device.type} "
            f"causal={masks.CAUSAL_NAMES[self.causal]} mask={masks.describe_mask(self.mask)}"
            + (f" window={self.window} (band: {self.band.describe()})" if self.window is not None else "")
            + (f" dropout_p={self.dropout_p}" if self.dropout_p else "")
            + "".join(f" {part}" for part in self.mods.describe().split() if not part.startswith("dropout_p"))
        )


def to_float32(x: float) -> Optional[float]:
    """x rounded to float32 (round to nearest, as the kernels' cast does), or None where float32
    overflows. Pure Python: it also runs inside fake-tensor tracing."""
    try:
        y = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return None
    return y if math.isfinite(y) or not math.isfinite(x) else None


def kernel_scale(scale: float, dtype: torch.dtype) -> float:
    """The scale as the kernels use it: float64 problems keep the double; every other dtype computes its
    scores in float32, so the scale is rounded to float32 here (once, the same for every backend). A
    scale whose magnitude float32 cannot hold (beyond ~3.4e38) is refused rather than turned into an
    infinity (torch's math path would return NaN); a tiny one may round to 0, as in torch."""
    if dtype == torch.float64:
        return float(scale)
    rounded = to_float32(scale)
    if rounded is None:
        raise ValueError(
            f"scale={scale!r} is out of range for {str(dtype).replace('torch.', '')} inputs: their scores "
            f"are computed in float32, so |scale| must be at most {torch.finfo(torch.float32).max:.6g}"
        )
    return rounded


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(
            f"{name} must have at least 2 dims (..., length, head_dim); got shape {tuple(t.shape)}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64); got {t.dtype}"
        )


def _split(t: torch.Tensor):
    """(batch dims, heads, length, head_dim); a 2-D tensor has no head dim (heads=1)."""
    if t.dim() == 2:
        return (), 1, t.shape[0], t.shape[1]
    return tuple(t.shape[:-3]), t.shape[-3], t.shape[-2], t.shape[-1]


def _to_4d(t: torch.Tensor, batch_shape, B: int) -> torch.Tensor:
    """Broadcast the batch dims and flatten them into one; a view when the strides allow it, the tensor
    itself when it is already (B, H, L, E) (the common call, and what lets api.py reuse a problem)."""
    if t.dim() == 4 and len(batch_shape) == 1 and t.shape[0] == B:
        return t
    if t.dim() == 2:
        t = t.unsqueeze(0)
    lead = t.shape[:-3]
    t = t.reshape((1,) * (len(batch_shape) - len(lead)) + tuple(t.shape))
    return t.expand(*batch_shape, *t.shape[-3:]).reshape(B, *t.shape[-3:])


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, h, S, E) -> (B, heads, S, E), head j reading head j // (heads // h) (repeat_interleave)."""
    B, h, S, E = t.shape
    if h == heads:
        return t
    return t.unsqueeze(2).expand(B, h, heads // h, S, E).reshape(B, heads, S, E)


def normalize(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    causal: int = masks.CAUSAL_NONE,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    window=None,
    deterministic: bool = False,
    softcap=None,
    alibi_slopes=None,
    dropout_rng=None,
) -> AttentionProblem:
    """Check the arguments as torch's SDPA does (with clearer messages) and build the canonical problem.
    `softcap`, `alibi_slopes` and `dropout_rng` as `attnkern.attention` takes them (score_mods.py); a
    call with dropout_p > 0 and no dropout_rng draws one when it runs (api._run), not here."""
    window = parse_window(window)
    softcap = check_softcap(softcap)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must have the same dtype; got "
            f"query.dtype={query.dtype}, key.dtype={key.dtype}, value.dtype={value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "query, key and value must be on the same device; got "
            f"query.device={query.device}, key.device={key.device}, value.device={value.device}"
        )
    qb, Hq, L, E = _split(query)
    kb, Hk, S, Ek = _split(key)
    vb, Hv, Sv, Ev = _split(value)
    if Ek != E:
        raise ValueError(
            f"key's last dim (head dim) must equal query's: query.shape={tuple(query.shape)} has E={E}, "
            f"key.shape={tuple(key.shape)} has E={Ek}"
        )
    if Sv != S:
        raise ValueError(
            f"key and value must have the same length (dim -2): key.shape={tuple(key.shape)}, "
            f"value.shape={tuple(value.shape)}"
        )
    try:
        batch_shape = broadcast_shapes(qb, kb, vb)
    except RuntimeError:
        raise ValueError(
            "the batch dims (all but the last three) of query, key and value must broadcast: got "
            f"query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}"
        ) from None

    # Heads: equal, broadcast (a single kv head serves all query heads), or grouped (enable_gqa).
    if enable_gqa:
        # Zero query heads (an empty problem) take any kv head count, as in torch; zero kv heads
        # serve no query head.
        if any((Hq % h if h else Hq) for h in (Hk, Hv)):
            raise ValueError(
                f"with enable_gqa=True the number of query heads must be a multiple of the key and value "
                f"heads: query has {Hq} heads (dim -3), key {Hk}, value {Hv}"
            )
        H = Hq
    else:
        try:
            (H,) = broadcast_shapes((Hq,), (Hk,), (Hv,))
        except RuntimeError:
            raise ValueError(
                f"query, key and value head counts (dim -3) must match or be 1: query has {Hq}, key {Hk}, "
                f"value {Hv}; pass enable_gqa=True for grouped-query attention"
            ) from None

    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    scale = kernel_scale(scale, query.dtype)

    B = math.prod(batch_shape)
    notes = []
    q = _to_4d(query, batch_shape, B)
    k = _to_4d(key, batch_shape, B)
    v = _to_4d(value, batch_shape, B)
    if Hq != H:  # a single query head broadcast over several kv heads
        q = q.expand(B, H, L, E)
        notes.append("query's single head broadcast to the key/value heads")
    # The kernels read one kv head per query-head group; give k and v the same head count (both divide H,
    # so their lcm does too).
    Hkv = math.lcm(Hk, Hv)
    if Hk != Hkv or Hv != Hkv:
        notes.append(f"key heads {Hk} and value heads {Hv} repeated to {Hkv}")
    k = _repeat_heads(k, Hkv)
    v = _repeat_heads(v, Hkv)

    bias = attn_mask if masks.is_causal_bias(attn_mask) else None
    attn_mask, causal = masks.resolve_causal_bias(attn_mask, causal, L, S, query.device)
    if bias is not None:
        notes.append(f"attn_mask CausalBias {bias.variant.name}({bias.seq_len_q}, {bias.seq_len_kv}) read as "
                     + (f"causal={masks.CAUSAL_NAMES[causal]}" if attn_mask is None else "its bool mask"))
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.layout != torch.strided:  # sparse masks: the kernels read masks through strides
            raise TypeError(f"attn_mask must be a dense (strided) tensor, got layout {attn_mask.layout}; "
                            "pass attn_mask.to_dense()")
        masks.check_mask_dtype(attn_mask, query.dtype)
        if attn_mask.device != query.device:
            raise ValueError(
                f"attn_mask must be on the query's device {query.device}, got {attn_mask.device}"
            )
        mask = masks.canonical_mask(attn_mask, batch_shape, H, L, S)

    alibi = check_alibi(alibi_slopes, batch_shape, B, H, query.device)
    mods = make_mods(softcap, alibi, float(dropout_p), dropout_rng, query.device)
    return AttentionProblem(
        q=q, k=k, v=v, mask=mask, scale=float(scale), causal=causal, dropout_p=float(dropout_p),
        batch_shape=batch_shape, has_head_dim=query.dim() > 2 or key.dim() > 2 or value.dim() > 2,
        notes=notes, window=window, deterministic=deterministic, mods=mods,
    )
