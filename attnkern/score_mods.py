"""What changes the scores or probabilities beyond masks and the band: soft-capping, ALiBi, dropout.

In the order every backend applies them, to the scaled scores s = scale * q.k of query row i, key j:

    softcap  c > 0:        s <- c * tanh(s / c)                 (Gemma 2; gradient (1 - tanh^2))
    alibi    slopes:       s <- s - slope[b, h] * |i + S - L - j|   (FlashAttention's ALiBi, BLOOM/MPT)
    mask, band:            as without these (masks.py, band.py)
    softmax                (the lse and stats are those of these scores, before dropout)
    dropout  p > 0:        P <- P * kept / (1 - p), the mask regenerated from `rng` (philox.py)

`ScoreMods` carries them through the ops and backends, canonical: softcap a float (0 = none), alibi None
or float32 (Ba, Hq) contiguous with Ba 1 or B, dropout_p in [0, 1] with rng an int64 (2,) tensor when
dropout_p > 0. ALiBi slopes are constants (they get no gradient: a learned bias is an attn_mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

from .philox import check_rng, draw_rng


@dataclass(frozen=True)
class ScoreMods:
    softcap: float = 0.0
    alibi: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    rng: Optional[torch.Tensor] = None

    @property
    def any(self) -> bool:
        return self.softcap > 0.0 or self.alibi is not None or self.dropout_p > 0.0

    def names(self) -> Tuple[str, ...]:
        """The variants in use, by their `attention` argument names (for declines and explain)."""
        return tuple(n for n, on in (("softcap", self.softcap > 0.0), ("alibi_slopes", self.alibi is not None),
                                     ("dropout_p", self.dropout_p > 0.0)) if on)

    def describe(self) -> str:
        parts = []
        if self.softcap > 0.0:
            parts.append(f"softcap={self.softcap:g}")
        if self.alibi is not None:
            parts.append(f"alibi_slopes{tuple(self.alibi.shape)}")
        if self.dropout_p > 0.0:
            parts.append(f"dropout_p={self.dropout_p:g}")
        return " ".join(parts)

    def op_args(self):
        """(softcap, alibi, dropout_p, rng) as the custom ops take them."""
        return self.softcap, self.alibi, self.dropout_p, self.rng


NONE = ScoreMods()


def check_softcap(softcap) -> float:
    """None or 0 (none) or a positive finite float."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise ValueError(f"softcap must be None or a finite float >= 0 (0: no capping), got {softcap!r}")
    return float(softcap)


def check_alibi(slopes, batch_shape: Tuple[int, ...], B: int, Hq: int, device: torch.device,
                ) -> Optional[torch.Tensor]:
    """alibi_slopes (Hq,) or (*batch, Hq), float32, on the query's device -> canonical (1 or B, Hq)."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as FlashAttention takes them), got "
                        f"{str(slopes.dtype).replace('torch.', '')}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes must be on the query's device {device}, got {slopes.device}")
    if tuple(slopes.shape) == (Hq,):
        canon = slopes.reshape(1, Hq)
    elif tuple(slopes.shape) == (*batch_shape, Hq):
        canon = slopes.reshape(B, Hq)
    else:
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({Hq},) or (*batch, Hq) = "
                         f"{(*batch_shape, Hq)}, got {tuple(slopes.shape)}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes get no gradient (they are constants, as in FlashAttention): detach "
                         "them, or pass a learned bias as a float attn_mask")
    return canon.detach().contiguous()


def check_op_mods(softcap, alibi, dropout_p, rng, q: torch.Tensor) -> None:
    """The custom ops' own checks of the canonical ScoreMods fields (q is (B, Hq, L, E))."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise ValueError(f"attnkern op: softcap must be a finite float >= 0, got {softcap!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attnkern op: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if alibi is not None:
        if not isinstance(alibi, torch.Tensor) or alibi.dtype != torch.float32 or alibi.dim() != 2 \
                or alibi.shape[1] != q.shape[1] or alibi.shape[0] not in (1, q.shape[0]) \
                or not alibi.is_contiguous() or alibi.device != q.device:
            got = (f"{str(alibi.dtype).replace('torch.', '')} {tuple(alibi.shape)} on {alibi.device}"
                   if isinstance(alibi, torch.Tensor) else type(alibi).__name__)
            raise ValueError(f"attnkern op: alibi must be a contiguous float32 (1 or B, Hq) = (1 or "
                             f"{q.shape[0]}, {q.shape[1]}) tensor on {q.device}, got {got}")
    if dropout_p > 0.0:
        if rng is None:
            raise ValueError("attnkern op: dropout_p > 0 needs rng (int64 (2,): seed, offset)")
        check_rng(rng, q.device, "attnkern op: rng")


def make_mods(softcap, alibi, dropout_p: float, rng, device: torch.device) -> ScoreMods:
    """The canonical ScoreMods of a call. A dropout call without `rng` gets one drawn when it runs
    (`ready_to_run`), so that deciding where a call runs (explain, replace_sdpa's routing) leaves torch's
    generator alone."""
    rng = check_rng(rng, device) if dropout_p > 0.0 and rng is not None else None
    return ScoreMods(softcap=softcap, alibi=alibi, dropout_p=float(dropout_p), rng=rng)


def ready_to_run(mods: ScoreMods, device: torch.device) -> ScoreMods:
    """`mods` with a dropout rng: the caller's, or (seed, offset) drawn now from torch's generator for
    `device`, advancing it as torch's own random ops do."""
    if mods.dropout_p > 0.0 and mods.rng is None:
        return replace(mods, rng=draw_rng(device))
    return mods


# ----------------------------------------------------------------------------------------------------
# The naive forms (reference.py uses them; each kernel implements the same math).

def alibi_bias(slopes: torch.Tensor, L: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    """-slope * |i + S - L - j| for slopes (..., H) -> (..., H, L, S) in `dtype`."""
    i = torch.arange(L, device=slopes.device, dtype=torch.int64).view(L, 1)
    j = torch.arange(S, device=slopes.device, dtype=torch.int64).view(1, S)
    dist = (i + (S - L) - j).abs().to(dtype)
    return -slopes.to(dtype)[..., None, None] * dist


def cap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(s / softcap) if softcap > 0.0 else s
