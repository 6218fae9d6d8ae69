"""The visibility rule: which keys each query row may see, apart from the user's mask.

Every backend reads one description, a band: query row i sees key j iff

    i + offset - left <= j <= i + offset + right

where a bound of -1 is absent (unbounded on that side) and the offset aligns the band: 0 top-left
(torch's `is_causal`, `tril(diagonal=0)`), S - L bottom-right (FlashAttention's: the last query row sees
the last key). Causal is right = 0; a sliding window `window=(left, right)` is FlashAttention's
`window_size`, bottom-right aligned unless `causal="top_left"` says otherwise; with neither every key
is visible.

The custom ops carry a band as three ints `[bottom_right, left, right]` (`Band.as_op`), not the offset:
S - L is derived from the tensors' shapes where the kernels run, so a traced graph holds no
shape-dependent constant. Each language has one helper for the key range of a block of query rows and
the query range of a block of keys (here, csrc/params.h, triton/common.py, csrc/cuda/mask.h).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import masks


@dataclass(frozen=True)
class Band:
    bottom_right: bool = True  # the alignment: offset S - L (True) or 0 (top-left)
    left: int = -1  # keys before the diagonal a row sees (-1: all of them)
    right: int = -1  # keys after the diagonal a row sees (-1: all of them; 0: causal)

    @property
    def is_full(self) -> bool:
        """No bound at all: every key visible (the alignment does not matter)."""
        return self.left < 0 and self.right < 0

    @property
    def is_causal(self) -> bool:
        """Exactly causal (right = 0, no left bound)."""
        return self.left < 0 and self.right == 0

    def offset(self, L: int, S: int) -> int:
        return S - L if self.bottom_right else 0

    def as_op(self):
        """The custom ops' form: [bottom_right, left, right]."""
        return [int(self.bottom_right), int(self.left), int(self.right)]

    @staticmethod
    def from_op(band: Sequence[int]) -> "Band":
        return Band(bool(band[0]), int(band[1]), int(band[2]))

    def key_range(self, r0: int, r1: int, L: int, S: int) -> Tuple[int, int]:
        """[begin, end): the keys some row of rows [r0, r1) sees (empty rows: begin >= end)."""
        off = self.offset(L, S)
        begin = 0 if self.left < 0 else max(0, r0 + off - self.left)
        end = S if self.right < 0 else min(S, r1 - 1 + off + self.right + 1)
        return begin, end

    def query_range(self, c0: int, c1: int, L: int, S: int) -> Tuple[int, int]:
        """[begin, end): the query rows that see some key of keys [c0, c1)."""
        off = self.offset(L, S)
        begin = 0 if self.right < 0 else max(0, c0 - off - self.right)
        end = L if self.left < 0 else min(L, c1 - 1 - off + self.left + 1)
        return begin, end

    def allowed(self, L: int, S: int, device=None) -> Optional[torch.Tensor]:
        """The (L, S) bool matrix of visible pairs, or None when every pair is visible."""
        if self.is_full:
            return None
        rows = torch.arange(L, device=device).unsqueeze(-1) + self.offset(L, S)
        cols = torch.arange(S, device=device)
        ok = torch.ones(L, S, dtype=torch.bool, device=device)
        if self.right >= 0:
            ok &= cols <= rows + self.right
        if self.left >= 0:
            ok &= cols >= rows - self.left
        return ok

    def describe(self) -> str:
        if self.is_full:
            return "none"
        align = "bottom_right" if self.bottom_right else "top_left"
        if self.is_causal:
            return f"causal {align}"
        side = lambda n: "inf" if n < 0 else str(n)  # noqa: E731
        return f"window ({side(self.left)}, {side(self.right)}) {align}"


FULL = Band()


def parse_window(window) -> Optional[Tuple[int, int]]:
    """`window=`: None or a pair (left, right) of ints >= -1, -1 meaning unbounded on that side
    (FlashAttention's window_size: query i sees keys i + S - L - left .. i + S - L + right)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= -1 (-1: unbounded), got {window!r}")
    left, right = window
    for name, n in (("left", left), ("right", right)):
        if isinstance(n, bool) or not isinstance(n, int) or n < -1:
            raise ValueError(f"window[{0 if name == 'left' else 1}] ({name}) must be an int >= -1 "
                             f"(-1: unbounded), got {n!r}")
    return int(left), int(right)


def make_band(causal: int, window: Optional[Tuple[int, int]]) -> Band:
    """The band of `causal` (a masks.CAUSAL_* code) and `window` (parse_window's pair or None).

    causal alone: right = 0, aligned as it says. window alone: FlashAttention's window_size, bottom-right.
    Both: the window's left bound with right = 0 (a causal sliding window), aligned as causal says."""
    bottom_right = causal != masks.CAUSAL_TOP_LEFT
    left, right = window if window is not None else (-1, -1)
    if causal != masks.CAUSAL_NONE:
        right = 0
    return Band(bottom_right, left, right)
