"""What a benchmark sweep measures: its configuration, the problem shapes it expands into, and the parsers
for the command-line values (lengths with a k suffix, dtype names, modes).

Defaults follow FlashAttention's benchmark grid on a GPU (B·L = 16k tokens, L = 512..16k, H·E = 2048 with E = 64 and 128,
causal and not, bf16 and fp16, fwd/bwd/fwd+bwd). On a CPU they shrink to a grid that runs in about a
minute on two idle cores: B·L = 4k tokens, L = 256..4096, E = 64 with one head, fp32, fwd and fwd+bwd.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch

from ..flops import MODES, attention_flops

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _split(text: str) -> List[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


def parse_length(text: str) -> int:
    """'512' -> 512, '2k' -> 2048, '1.5k' -> 1536. Must be a positive integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", str(text))
    if not m:
        raise ValueError(f"expected a length like 512 or 2k, got {text!r}")
    value = float(m.group(1)) * (1024 if m.group(2) else 1)
    if value != int(value) or value < 1:
        raise ValueError(f"a length must be a positive whole number, got {text!r}")
    return int(value)


def parse_lengths(text: str) -> List[int]:
    return [parse_length(t) for t in _split(text)]


def parse_positive_ints(text: str) -> List[int]:
    out = []
    for t in _split(text):
        if not re.fullmatch(r"\d+", t) or int(t) < 1:
            raise ValueError(f"expected positive whole numbers, got {t!r}")
        out.append(int(t))
    return out


def parse_dtypes(text: str) -> List[str]:
    out = []
    for t in _split(text):
        if t.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {t!r}; choose from fp16, bf16, fp32, fp64")
        out.append(DTYPE_NAMES[DTYPES[t.lower()]])
    return list(dict.fromkeys(out))


def parse_modes(text: str) -> List[str]:
    out = []
    for t in _split(text):
        if t not in MODES:
            raise ValueError(f"unknown mode {t!r}; choose from {', '.join(MODES)}")
        out.append(t)
    return list(dict.fromkeys(out))


def parse_causal(text: str) -> List[bool]:
    options = {"both": [False, True], "yes": [True], "true": [True], "causal": [True],
               "no": [False], "false": [False], "none": [False]}
    if str(text).lower() not in options:
        raise ValueError(f"expected both, yes or no, got {text!r}")
    return options[str(text).lower()]


def parse_window(text: str) -> Tuple[int, int]:
    """'LEFT,RIGHT' (FlashAttention's window_size, -1 unbounded), e.g. '255,0' or '128,128'."""
    from ...band import parse_window as check

    parts = str(text).split(",")
    try:
        pair = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected LEFT,RIGHT (ints >= -1), got {text!r}") from None
    return check(pair if len(pair) == 2 else tuple(parts))


def parse_softcaps(text: str) -> List[float]:
    """'30' or '0,30': soft-capping values, one grid variant each (0: none)."""
    out = []
    for t in _split(text):
        try:
            c = float(t)
        except ValueError:
            c = -1.0
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"expected finite soft-capping values >= 0 (0: none), got {t!r}")
        out.append(c)
    return list(dict.fromkeys(out))


def parse_dropouts(text: str) -> List[float]:
    """'0.1' or '0,0.1': dropout probabilities in [0, 1), one grid variant each (0: none)."""
    out = []
    for t in _split(text):
        try:
            p = float(t)
        except ValueError:
            p = -1.0
        if not 0.0 <= p < 1.0:
            raise ValueError(f"expected dropout probabilities in [0, 1) (0: none), got {t!r}")
        out.append(p)
    return list(dict.fromkeys(out))


def parse_alibi(text: str) -> List[bool]:
    """ALiBi in every cell (yes), in none (no) or both side by side."""
    options = {"both": [False, True], "yes": [True], "true": [True], "no": [False], "false": [False]}
    if str(text).lower() not in options:
        raise ValueError(f"expected both, yes or no, got {text!r}")
    return options[str(text).lower()]


def alibi_slopes(H: int, device) -> torch.Tensor:
    """The benchmark's ALiBi slopes, float32 (H,): the geometric sequence 2^(-8 (h + 1) / H) of BLOOM."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=device)


def variant_label(cell) -> str:
    """The score mods of a shape or a results cell ("" for none; cells of older runs have none)."""
    get = cell.get if isinstance(cell, dict) else lambda name, default: getattr(cell, name, default)
    parts = []
    if get("softcap", 0.0):
        parts.append(f"softcap={get('softcap', 0.0):g}")
    if get("alibi", False):
        parts.append("alibi")
    if get("dropout", 0.0):
        parts.append(f"dropout={get('dropout', 0.0):g}")
    return " ".join(parts)


def parse_kv_seqlen(text: str) -> str:
    """A fixed key length ('8k': every cell has Lk = 8192) or a multiple of Lq ('x2', 'x0.5')."""
    text = str(text).strip()
    if text.lower().startswith("x"):
        try:
            ratio = float(text[1:])
        except ValueError:
            ratio = -1.0
        if not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"expected a positive multiple of the query length like x2, got {text!r}")
        return f"x{ratio:g}"
    return str(parse_length(text))


@dataclass(frozen=True)
class Shape:
    """One problem: q (B, H, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev); `causal` is top-left
    (torch's is_causal), contiguous (B, H, L, E) tensors."""

    dtype: str
    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    E: int
    Ev: int
    causal: bool
    window: Optional[Tuple[int, int]] = None  # attention(window=...); with causal: a causal sliding window
    softcap: float = 0.0  # attention(softcap=...), 0: none
    alibi: bool = False  # attention(alibi_slopes=alibi_slopes(H))
    dropout: float = 0.0  # attention(dropout_p=...)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gqa(self) -> bool:
        return self.Hkv != self.H

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.H, self.Lq, self.Lk, self.E, self.Ev, self.causal, mode, self.window)

    def allowed(self, device) -> Optional[torch.Tensor]:
        """The (Lq, Lk) bool mask of a windowed shape (what providers without windows are given), or None."""
        if self.window is None:
            return None
        from ...band import make_band
        from ...masks import CAUSAL_NONE, CAUSAL_TOP_LEFT

        return make_band(CAUSAL_TOP_LEFT if self.causal else CAUSAL_NONE, self.window).allowed(
            self.Lq, self.Lk, device)

    @property
    def variant(self) -> str:
        return variant_label(self)

    def alibi_slopes(self, device) -> Optional[torch.Tensor]:
        return alibi_slopes(self.H, device) if self.alibi else None

    def label(self) -> str:
        kv = f" Lk={self.Lk}" if self.Lk != self.Lq else ""
        heads = f"H={self.H}" + (f"/{self.Hkv}" if self.gqa else "")
        ev = f" Ev={self.Ev}" if self.Ev != self.E else ""
        return (f"{self.dtype} B={self.B} {heads} L={self.Lq}{kv} E={self.E}{ev}"
                + (" causal" if self.causal else "") + (f" window={self.window}" if self.window else "")
                + (f" {self.variant}" if self.variant else ""))


@dataclass
class BenchConfig:
    device: str
    seqlens: List[int]
    head_dims: List[int]
    dtypes: List[str]
    modes: List[str]
    causal: List[bool]
    providers: List[str]
    tokens: Optional[int] = None  # B = tokens // L (at least 1) ...
    batch: Optional[int] = None  # ... or a fixed batch
    heads: Optional[int] = None  # None: model_dim // E
    model_dim: int = 2048
    gqa: int = 1  # query heads per key/value head
    v_head_dim: Optional[int] = None  # None: = E
    kv_seqlen: Optional[str] = None  # None: = Lq; "N" fixed; "xR" R·Lq
    window: Optional[Tuple[int, int]] = None  # a sliding window for every cell (attention's window=)
    # Score mods, each a grid axis (cells side by side with and without): attention's softcap= (0: none),
    # ALiBi slopes (alibi_slopes) or not, dropout_p.
    softcap: List[float] = field(default_factory=lambda: [0.0])
    alibi: List[bool] = field(default_factory=lambda: [False])
    dropout: List[float] = field(default_factory=lambda: [0.0])
    repeats: int = 30
    warmup: int = 5
    input_sets: int = 0  # 0: enough to exceed the caches (see runner.py)
    seed: int = 0
    threads: Optional[int] = None  # CPU: torch.set_num_threads before the sweep (None: torch's default)
    baseline: str = "sdpa"
    notes: List[str] = field(default_factory=list)

    def heads_for(self, E: int) -> int:
        return self.heads if self.heads is not None else max(1, self.model_dim // E)

    def batch_for(self, L: int) -> int:
        if self.batch is not None:
            return self.batch
        return max(1, self.tokens // L)

    def kv_len_for(self, Lq: int) -> int:
        if self.kv_seqlen is None:
            return Lq
        if self.kv_seqlen.startswith("x"):
            return max(1, round(Lq * float(self.kv_seqlen[1:])))
        return int(self.kv_seqlen)

    def validate(self) -> List[Tuple[str, str]]:
        """(flag, message) for every inconsistency between options; empty when the config is usable."""
        problems = []
        for E in self.head_dims:
            H = self.heads_for(E)
            if H % self.gqa:
                problems.append(("--gqa", f"a GQA ratio of {self.gqa} needs the query heads to be a multiple "
                                          f"of it, but E={E} gives H={H} heads (set --heads)"))
        if self.batch is not None and self.tokens is not None:
            problems.append(("--batch", "give --batch or --tokens, not both"))
        if self.batch is None and self.tokens is None:
            problems.append(("--tokens", "one of --batch or --tokens is needed"))
        for flag, value in (("--repeats", self.repeats),):
            if value < 1:
                problems.append((flag, f"must be at least 1, got {value}"))
        if self.warmup < 0:
            problems.append(("--warmup", f"must be >= 0, got {self.warmup}"))
        if self.threads is not None and self.threads < 1:
            problems.append(("--threads", f"must be at least 1, got {self.threads}"))
        if self.input_sets < 0:
            problems.append(("--input-sets", f"must be >= 0 (0 = automatic), got {self.input_sets}"))
        return problems

    def shapes(self) -> List[Shape]:
        """Every problem of the grid, ordered as the plot's panels: dtype, head dim, causal, length, and
        for each length its score-mod variants side by side."""
        out = []
        for dtype in self.dtypes:
            for E in self.head_dims:
                H = self.heads_for(E)
                for causal in self.causal:
                    for L in self.seqlens:
                        for softcap in self.softcap:
                            for alibi in self.alibi:
                                for dropout in self.dropout:
                                    out.append(Shape(dtype, self.batch_for(L), H, H // self.gqa, L,
                                                     self.kv_len_for(L), E, self.v_head_dim or E, causal,
                                                     self.window, softcap, alibi, dropout))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["causal"] = ["causal" if c else "non-causal" for c in self.causal]
        return d


def default_config(device: torch.device) -> BenchConfig:
    if device.type == "cuda":
        return BenchConfig(
            device=str(device), seqlens=[512, 1024, 2048, 4096, 8192, 16384], head_dims=[64, 128],
            dtypes=["bf16", "fp16"], modes=list(MODES), causal=[False, True], providers=[],
            tokens=16384, model_dim=2048, repeats=30, warmup=5,
        )
    # A CPU is ~1000x slower, and the naive providers take most of the time: one head, the forward and
    # forward+backward (the backward alone with --modes), 3 timed runs per cell.
    return BenchConfig(
        device=str(device), seqlens=[256, 512, 1024, 2048, 4096], head_dims=[64], dtypes=["fp32"],
        modes=["fwd", "fwd+bwd"], causal=[False, True], providers=[], tokens=4096, model_dim=64,
        repeats=3, warmup=1,
    )
