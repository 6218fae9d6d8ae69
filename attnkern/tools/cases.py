"""The one vocabulary of attention problems: the test suite, `attnkern check-grads`, the self-check and
`attnkern bench` all describe their problems as a `Case` and draw inputs with `make_inputs`.

A `Case` names a problem (shapes, heads, causal alignment, mask kind and broadcast shape, memory
layout, rank, scale); `make_inputs` draws fresh random tensors for it, `run_reference` runs the naive
reference on copies. `random_case(seed)` draws a case from the whole vocabulary (the randomized oracle
tests run hundreds). A new feature is added here once, and every user of the module can express it.
Decode steps against a KV cache (attention_with_kvcache) have their own `DecodeCase`, with
`make_decode_inputs` and `run_decode_reference`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Case:
    name: str
    L: int
    S: int
    E: int = 64
    Ev: Optional[int] = None  # None: = E
    B: int = 1
    Hq: int = 2
    Hkv: Optional[int] = None  # None: = Hq; fewer -> GQA (enable_gqa=True)
    causal: str = "none"  # "none" | "top_left" | "bottom_right"
    window: Optional[Tuple[int, int]] = None  # attention(window=...): (left, right), -1 unbounded
    softcap: Optional[float] = None  # attention(softcap=...)
    alibi: str = "none"  # "none" | "h": ALiBi slopes (Hq,) | "bh": per batch element (*batch, Hq)
    # attention(dropout_p=...) with a fixed dropout_rng (alibi_and_dropout_kwargs), so that a kernel and
    # the reference drop the same probabilities (philox.py).
    dropout: float = 0.0
    # Mask kind: "none", "bool", "float" (constant), "float_grad" (requires grad: tests dMask), "keypad"
    # (a bool key-padding mask (B, 1, 1, S) keeping a random prefix of at least half the keys per batch
    # element, as padded batches have; mask_dims is ignored).
    mask: str = "none"
    # Which score dims the mask has at full size ("b", "h", "l", "s"); the rest are 1. "ls" = (L, S),
    # "bs" = (B, 1, 1, S) key padding, "hls" = (H, L, S), ...; leading size-1 dims are dropped, down
    # to `mask_rank` dims when that is set (None: all of them, as users write (L, S)).
    mask_dims: str = "ls"
    mask_rank: Optional[int] = None
    mask_fp32: bool = False  # a float mask in float32 whatever the inputs' dtype (torch allows it)
    # Rows (query indices) whose keys are all masked out by the mask: their output and grads are 0.
    masked_rows: Tuple[int, ...] = ()
    # Float masks: rows set to the dtype's most negative finite value (as transformers' padding masks
    # are), all of it (row `min_rows[0]`: a uniform softmax, not a masked row) or every other key.
    min_rows: Tuple[int, ...] = ()
    layout: str = "contiguous"  # "contiguous" | "blhe" (B, L, H, E) viewed as (B, H, L, E) |
    # "padded" (rows of a wider buffer) | "e_strided" (head dim not unit-stride) |
    # "l_strided" (every other row of a buffer twice as long)
    rank: int = 4  # 2: (L, E), no head dim (Hq = 1); 3: (H, L, E); 4: (B, H, L, E); 5: (B, B2, H, L, E)
    B2: int = 2  # the second batch dim of rank-5 inputs
    scale: Optional[float] = None  # None: 1/sqrt(E)
    kv_batch_broadcast: bool = False  # key/value have batch size 1 (broadcast over the query batch)
    kv_head_broadcast: bool = False  # key/value have 1 head without enable_gqa (broadcast)
    gpu_only: bool = False  # too large for the Triton interpreter

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    @property
    def hkv(self) -> int:
        return self.Hq if self.Hkv is None else self.Hkv

    @property
    def enable_gqa(self) -> bool:
        return self.hkv != self.Hq and not self.kv_head_broadcast

    @property
    def is_causal(self) -> bool:
        """torch SDPA's is_causal for this case (top-left); bottom-right has no SDPA spelling."""
        return self.causal == "top_left"

    def summary(self) -> str:
        """The sizes in one short line: 'B=2 H=4/2 L=48 S=80 E=40 causal mask=keypad'."""
        return (f"B={self.B} H={self.Hq}" + (f"/{self.hkv}" if self.hkv != self.Hq else "") + f" L={self.L}"
                + (f" S={self.S}" if self.S != self.L else "") + f" E={self.E}"
                + (f" Ev={self.ev}" if self.ev != self.E else "")
                + ("" if self.causal == "none" else " causal" if self.causal == "top_left" else " causal=bottom_right")
                + (f" window={self.window}" if self.window is not None else "")
                + (f" softcap={self.softcap:g}" if self.softcap else "")
                + (f" alibi={self.alibi}" if self.alibi != "none" else "")
                + (f" dropout={self.dropout:g}" if self.dropout else "")
                + (f" mask={self.mask}" if self.mask != "none" else ""))

    def __str__(self) -> str:
        return self.name


def _batch_dims(case: Case):
    if case.rank <= 3:
        return ()
    if case.rank == 4:
        return (case.B,)
    return (case.B, case.B2)


def _head_dims(case: Case, heads: int):
    return () if case.rank == 2 else (heads,)


def _draws(gen, device, dtype, on_device: bool):
    """(randn, rand) drawing tensors of a shape: in float64 on the CPU (the same values on every device,
    then cast), or with `on_device` directly on the device in `dtype` (fast, for benchmark sizes)."""
    if on_device:
        return (lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype),
                lambda *shape: torch.rand(*shape, generator=gen, device=device))
    return (lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64),
            lambda *shape: torch.rand(*shape, generator=gen))


def _make(shape, dtype, device, layout, randn):
    """A random tensor of `shape` (..., H, N, D) stored in `layout`."""
    if layout == "blhe" and len(shape) >= 4:
        *lead, H, N, D = shape
        t = randn(*lead, N, H, D).to(device=device, dtype=dtype).transpose(-3, -2)
    elif layout == "padded":
        t = randn(*shape[:-1], shape[-1] + 8).to(device=device, dtype=dtype)[..., 3:3 + shape[-1]]
    elif layout == "e_strided":
        t = randn(*shape[:-2], shape[-1], shape[-2]).to(device=device, dtype=dtype).transpose(-1, -2)
    elif layout == "l_strided":
        t = randn(*shape[:-2], 2 * shape[-2], shape[-1]).to(device=device, dtype=dtype)[..., ::2, :]
    else:
        t = randn(*shape).to(device=device, dtype=dtype)
    return t


def mask_shape(case: Case):
    full = {"b": _batch_dims(case), "h": _head_dims(case, case.Hq), "l": (case.L,), "s": (case.S,)}
    shape = []
    for dim in "bhls":
        shape += list(full[dim]) if dim in case.mask_dims else [1] * len(full[dim])
    rank = 2 if "l" in case.mask_dims else 1  # a mask with an L dim keeps it, even when L = 1
    rank = max(rank, case.mask_rank or 0)
    while shape and shape[0] == 1 and len(shape) > rank:  # drop leading 1s, as users write (L, S)
        shape.pop(0)
    return tuple(shape)


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0, requires_grad: bool = True,
                on_device: bool = False):
    """Fresh random (q, k, v, attn_mask) for `case`, leaves requiring grad (the mask only if float_grad).
    Drawn in float64 on the CPU and cast (the same values on every device), or with `on_device` drawn on
    the device in `dtype` (for benchmark sizes)."""
    gen = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)
    randn, rand = _draws(gen, device, dtype, on_device)
    batch = _batch_dims(case)
    kv_batch = tuple(1 for _ in batch) if case.kv_batch_broadcast else batch
    q_heads = _head_dims(case, case.Hq)
    kv_heads = _head_dims(case, 1 if case.kv_head_broadcast else case.hkv)
    q = _make((*batch, *q_heads, case.L, case.E), dtype, device, case.layout, randn)
    k = _make((*kv_batch, *kv_heads, case.S, case.E), dtype, device, case.layout, randn)
    v = _make((*kv_batch, *kv_heads, case.S, case.ev), dtype, device, case.layout, randn)
    mask = None
    if case.mask == "keypad":
        shape = mask_shape(replace(case, mask_dims="bs"))
        rows = math.prod(shape[:-1])  # one length per batch element
        lo = max(1, case.S // 2)
        lengths = lo + (rand(rows) * (case.S + 1 - lo)).long().clamp_max(case.S - lo)
        mask = (torch.arange(case.S, device=lengths.device)[None, :] < lengths[:, None]).view(shape)
    elif case.mask == "bool":
        shape = mask_shape(case)
        mask = rand(*shape) > 0.25
        # keep every row attendable unless it is meant to be fully masked
        if mask.shape[-1]:
            mask[..., 0] = True
        for r in case.masked_rows:
            mask[..., r, :] = False
    elif case.mask != "none":
        shape = mask_shape(case)
        mask = randn(*shape)
        mask = mask.masked_fill(rand(*shape) < 0.1, float("-inf"))
        if mask.shape[-1]:
            mask[..., 0] = torch.where(torch.isinf(mask[..., 0]), 0.0, mask[..., 0])
        for r in case.masked_rows:
            mask[..., r, :] = float("-inf")
        mask = mask.to(torch.float32 if case.mask_fp32 else dtype)
        lowest = torch.finfo(mask.dtype).min
        for i, r in enumerate(case.min_rows):
            if i == 0:
                mask[..., r, :] = lowest
            else:
                mask[..., r, ::2] = lowest
    if mask is not None:
        mask = mask.to(device)
    leaves = [q, k, v] + ([mask] if case.mask == "float_grad" else [])
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return q, k, v, mask


def upstream_grads(out: torch.Tensor, lse: torch.Tensor, seed: int = 1):
    """Random dO and d(lse) (fully masked rows' lse is -inf; its gradient stays finite)."""
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.device, lse.dtype)
    return do, dlse


def alibi_slopes(case: Case, device="cpu") -> Optional[torch.Tensor]:
    """ALiBi's geometric slopes 2^(-8 (h + 1) / Hq) per query head, (Hq,), or for alibi="bh" scaled per
    batch element, (*batch, Hq); None without ALiBi."""
    if case.alibi == "none":
        return None
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / case.Hq) for h in range(case.Hq)])
    if case.alibi == "bh":
        batch = _batch_dims(case)
        steps = torch.arange(1, math.prod(batch) + 1, dtype=torch.float32).view(*batch, 1) if batch else 1.0
        slopes = slopes * (0.5 + 0.25 * steps)
    return slopes.to(device=device, dtype=torch.float32)


def dropout_rng(case: Case, device="cpu") -> Optional[torch.Tensor]:
    """A fixed (seed, offset) for a dropout case, derived from its name; None without dropout."""
    if not case.dropout:
        return None
    seed = sum(ord(c) * 131 ** i for i, c in enumerate(case.name)) % (1 << 62)
    return torch.tensor([seed, 7], dtype=torch.int64, device=device)


def as_kwargs(case: Case, device="cpu"):
    """The keyword arguments `attnkern.attention` and `reference_attention` take for `case`, tensors
    (ALiBi slopes, dropout rng) on `device` (the inputs')."""
    kw = dict(causal=case.causal if case.causal != "none" else False, window=case.window,
              enable_gqa=case.enable_gqa, scale=case.scale)
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.alibi != "none":
        kw["alibi_slopes"] = alibi_slopes(case, device)
    if case.dropout:
        kw.update(dropout_p=case.dropout, dropout_rng=dropout_rng(case, device))
    return kw


def grad_leaves(q, k, v, mask):
    """The tensors whose gradients a case checks: q, k, v and a float mask that requires grad."""
    return [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])


def detached(q, k, v, mask, dtype):
    """Fresh leaves in `dtype` (the mask keeps its own kind: bool stays bool)."""
    out = []
    for t in (q, k, v, mask):
        if t is None:
            out.append(None)
            continue
        d = t.detach().to(dtype if t.is_floating_point() else t.dtype)
        out.append(d.requires_grad_(t.requires_grad))
    return out


def run_reference(q, k, v, mask, case, dtype, do, dlse):
    """The naive reference on copies of the inputs in `dtype` (float64: the oracle; the input dtype:
    ref_lp of the tolerance rule): (out, lse, gradients of `grad_leaves`) for upstream dO and d(lse)
    (dlse None: the output's gradient only)."""
    from attnkern.reference import reference_attention

    q, k, v, mask = detached(q, k, v, mask, dtype)
    out, lse = reference_attention(q, k, v, mask, **as_kwargs(case, q.device))
    if dlse is None:
        out.backward(do.to(out.dtype))
    else:
        torch.autograd.backward([out, lse], [do.to(out.dtype), dlse.to(lse.dtype)])
    return out, lse, [t.grad for t in grad_leaves(q, k, v, mask)]


# ---------------------------------------------------------------------------------------------------
# Random cases: the same vocabulary, drawn from a seed. Every draw is a function of the seed alone (and
# of `max_work`), so a failing case is reproduced from its seed.

# Lengths and head dims drawn from these lists part of the time: 1, the block-size edges and odd sizes
# that leave partial tiles.
_FAVOURITE_LENGTHS = (1, 2, 7, 17, 31, 63, 64, 65, 113, 127, 128, 129, 203, 255, 256, 257, 300)
_FAVOURITE_HEAD_DIMS = (1, 3, 8, 16, 17, 32, 40, 64, 80, 96, 100, 128, 160, 255, 256)
# What a case may cost: B * Hq * L * S * (E + Ev + 64), the forward's multiply-adds plus the reference's
# elementwise work on the (L, S) scores, about.
RANDOM_MAX_WORK = 3_000_000


def _draw(rng: random.Random, favourites, hi: int) -> int:
    return rng.choice(favourites) if rng.random() < 0.4 else rng.randint(1, hi)


def random_case(seed: int, max_work: int = RANDOM_MAX_WORK) -> Case:
    """A random valid case: rank 2..5, batch and head counts (GQA, MQA, kv-head and kv-batch broadcast),
    L and S in 1..300, E and Ev in 1..256, every causal alignment, every mask kind with a random
    broadcast shape (rank dropped or not), fully masked and finfo.min rows, every layout, a random
    scale sometimes, soft-capping, ALiBi and dropout sometimes; B * Hq * L * S * (E + Ev + 64) at most
    `max_work`."""
    rng = random.Random(seed)
    L, S = _draw(rng, _FAVOURITE_LENGTHS, 300), _draw(rng, _FAVOURITE_LENGTHS, 300)
    E = _draw(rng, _FAVOURITE_HEAD_DIMS, 256)
    Ev = E if rng.random() < 0.6 else _draw(rng, _FAVOURITE_HEAD_DIMS, 256)
    # Shrink the largest size until one (batch, head) slice fits the budget.
    while L * S * (E + Ev + 64) > max_work:
        sizes = {"L": L, "S": S, "E": E, "Ev": Ev}
        name = max(sizes, key=lambda n: sizes[n] * (2 if n in "LS" else 1))
        new = rng.randint(1, max(1, sizes[name] // 2))
        L, S, E, Ev = (new if n == name else sizes[n] for n in ("L", "S", "E", "Ev"))
    slices = max(1, max_work // (L * S * (E + Ev + 64)))  # how many (batch, head) slices fit

    rank = rng.choice((2, 3, 4, 4, 4, 5))
    Hq = Hkv = 1
    kv_head_broadcast = False
    if rank > 2:
        Hq = rng.randint(1, min(8, slices))
        divisors = [d for d in range(1, Hq + 1) if Hq % d == 0]
        heads = rng.choice(("same", "same", "gqa", "broadcast"))
        if heads == "gqa" and Hq > 1:  # enable_gqa; Hkv = 1 is MQA
            Hkv = rng.choice(divisors[:-1])
        elif heads == "broadcast" and Hq > 1:  # one kv head, without enable_gqa
            Hkv, kv_head_broadcast = 1, True
        else:
            Hkv = Hq
    B, B2 = 1, 2
    if rank >= 4:
        room = max(1, slices // Hq)
        B = rng.randint(1, min(3, room))
        B2 = rng.randint(1, min(3, max(1, room // B))) if rank == 5 else 2
    kv_batch_broadcast = rank >= 4 and rng.random() < 0.15

    causal = rng.choice(("none", "none", "top_left", "bottom_right"))
    window = None
    if rng.random() < 0.2:  # a sliding window: each side unbounded, 0, or up to the longer length
        side = lambda: rng.choice((-1, 0, rng.randint(0, max(L, S))))  # noqa: E731
        window = (side(), side())
    # Score modifications (score_mods.py), each now and then, from a stream of their own (the other
    # draws, and with them every earlier case of a seed, stay as they were).
    mod_rng = random.Random(seed * 7919 + 13)
    softcap = mod_rng.choice((mod_rng.uniform(0.5, 4.0), mod_rng.uniform(4.0, 50.0))) \
        if mod_rng.random() < 0.15 else None
    alibi = mod_rng.choice(("h", "bh")) if mod_rng.random() < 0.15 else "none"
    dropout = mod_rng.choice((0.1, 0.3, 0.5, mod_rng.uniform(0.0, 0.9))) if mod_rng.random() < 0.12 else 0.0
    mask = rng.choice(("none", "none", "bool", "float", "float_grad", "float_grad"))
    mask_dims, mask_rank, mask_fp32 = "ls", None, False
    masked_rows, min_rows = (), ()
    if mask != "none":
        # Each score dim full or 1; often 1 for S, so that mask gradients are sums over keys (per-query
        # biases), where half-precision rounding shows most.
        mask_dims = "".join(d for d, p in zip("bhls", (0.5, 0.5, 0.6, 0.6)) if rng.random() < p)
        full_rank = len(mask_shape(Case("", L, S, E, rank=rank, B=B, B2=B2, Hq=Hq, mask_dims="bhls")))
        if rng.random() < 0.4:  # keep some of the leading size-1 dims
            mask_rank = rng.randint(1, full_rank)
        mask_fp32 = mask != "bool" and rng.random() < 0.3
        if "l" in mask_dims and rng.random() < 0.35:
            rows = {rng.randrange(L) for _ in range(rng.randint(1, 3))}
            if rng.random() < 0.3:
                rows |= {0, L - 1}
            masked_rows = tuple(sorted(rows))
        if mask != "bool" and "l" in mask_dims and rng.random() < 0.25:
            free = [r for r in range(L) if r not in masked_rows]
            if free:
                min_rows = tuple(rng.sample(free, min(len(free), rng.randint(1, 2))))
            if mask_fp32:  # float32's lowest is -inf in a half-precision reference: no bound left to test
                min_rows = ()
    layout = rng.choice(("contiguous", "contiguous", "blhe", "padded", "e_strided", "l_strided"))
    if layout == "blhe" and rank < 4:
        layout = "contiguous"
    scale = None
    if rng.random() < 0.25:
        scale = rng.choice((rng.uniform(0.01, 1.0), rng.uniform(1.0, 4.0), -rng.uniform(0.05, 1.0), 0.0))

    case = Case(f"random_{seed}", L=L, S=S, E=E, Ev=Ev if Ev != E else None, B=B, B2=B2, Hq=Hq,
                Hkv=Hkv if Hkv != Hq else None, causal=causal, window=window, mask=mask, mask_dims=mask_dims,
                mask_rank=mask_rank, mask_fp32=mask_fp32, masked_rows=masked_rows, min_rows=min_rows,
                layout=layout, rank=rank, kv_batch_broadcast=kv_batch_broadcast,
                kv_head_broadcast=kv_head_broadcast, scale=scale, softcap=softcap, alibi=alibi, dropout=dropout)
    return case


def random_empty_case(seed: int, max_work: int = RANDOM_MAX_WORK) -> Case:
    """`random_case(seed)` with one size zero (batch, heads, L, S or Ev): empty results, as torch gives."""
    case = random_case(seed, max_work)
    rng = random.Random(seed + 1)
    dims = ["L", "S", "Ev"] + (["Hq"] if case.rank > 2 else []) + (["B"] if case.rank >= 4 else [])
    dim = rng.choice(dims)
    zero = {dim: 0}
    if dim == "L":
        zero.update(masked_rows=(), min_rows=())
    if dim == "Hq" and case.kv_head_broadcast is False and not case.enable_gqa:
        zero.update(Hkv=None)  # key and value lose their heads too
    return replace(case, name=f"random_empty_{seed}", **zero)


def describe(case: Case) -> str:
    """The case's fields that differ from the defaults, as a constructor call one can paste."""
    default = Case(case.name, L=case.L, S=case.S)
    fields = [f"{f}={getattr(case, f)!r}" for f in case.__dataclass_fields__
              if f == "name" or f in ("L", "S") or getattr(case, f) != getattr(default, f)]
    return "Case(" + ", ".join(fields) + ")"


# ---------------------------------------------------------------------------------------------------
# Decode cases: one step of `attention_with_kvcache` (kvcache.py), a few queries against a KV cache
# that holds a different number of keys per batch element, contiguous or paged.

@dataclass(frozen=True)
class DecodeCase:
    name: str
    Lq: int
    cache: Tuple[int, ...]  # cache_seqlens per batch element before the call (B = len(cache))
    Lnew: int = 0  # keys/values appended in place before attending (k_new, v_new); 0: none
    Hq: int = 8
    Hkv: int = 1  # GQA Hq:Hkv
    E: int = 64
    Ev: Optional[int] = None  # None: = E
    page_size: Optional[int] = None  # None: contiguous cache (B, S_max, Hkv, E); else paged
    causal: bool = False  # bottom-right on each batch element's own length
    window: Optional[Tuple[int, int]] = None
    softcap: Optional[float] = None
    alibi: bool = False  # ALiBi slopes per query head
    gpu_only: bool = False

    @property
    def B(self) -> int:
        return len(self.cache)

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    def summary(self) -> str:
        return (f"B={self.B} H={self.Hq}/{self.Hkv} Lq={self.Lq} cache={list(self.cache)}+{self.Lnew} E={self.E}"
                + (f" Ev={self.ev}" if self.ev != self.E else "")
                + (f" paged({self.page_size})" if self.page_size else " contiguous")
                + (" causal" if self.causal else "") + (f" window={self.window}" if self.window else "")
                + (f" softcap={self.softcap:g}" if self.softcap else "") + (" alibi" if self.alibi else ""))

    def __str__(self) -> str:
        return self.name


def decode_kwargs(case: DecodeCase, device="cpu"):
    """The keyword arguments of attention_with_kvcache (besides the tensors) for `case`."""
    kw = dict(causal=case.causal, window=case.window)
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.alibi:
        kw["alibi_slopes"] = torch.tensor([2.0 ** (-8.0 * (h + 1) / case.Hq) for h in range(case.Hq)],
                                          dtype=torch.float32, device=device)
    return kw


def make_decode_inputs(case: DecodeCase, dtype: torch.dtype, device, seed: int = 0):
    """Fresh random inputs of a decode step, as a dict: q, k_cache, v_cache, k_new, v_new (None without
    Lnew), cache_seqlens, block_table (None for a contiguous cache) -- the arguments of
    attention_with_kvcache -- and `keys`/`values`, each batch element's keys after the append as a plain
    contiguous (B, S_max, Hkv, E) tensor (the reference's view, independent of any paging), with
    `k_after`/`v_after`, the caches as the in-place append must leave them.

    Every cache slot that holds no key (past a batch element's length, pages no one uses) is NaN, and the
    block table's unused entries name pages that do not exist, so a kernel that reads what it must not
    fails. Pages are handed out in a random order."""
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, E, Ev = case.B, case.Hkv, case.E, case.ev
    before = torch.tensor(case.cache, dtype=torch.int64)
    after = before + case.Lnew
    cap = int(after.max()) + 5 if B else 5
    if case.page_size:
        cap = -(-cap // case.page_size) * case.page_size
    q = torch.randn(B, case.Lq, case.Hq, E, generator=gen, dtype=torch.float64)
    k_new = torch.randn(B, case.Lnew, Hkv, E, generator=gen, dtype=torch.float64)
    v_new = torch.randn(B, case.Lnew, Hkv, Ev, generator=gen, dtype=torch.float64)
    # The logical caches, (B, cap, Hkv, E): keys below each length, NaN above.
    j = torch.arange(cap)
    keys = torch.randn(B, cap, Hkv, E, generator=gen, dtype=torch.float64)
    values = torch.randn(B, cap, Hkv, Ev, generator=gen, dtype=torch.float64)
    keys[j[None, :] >= before[:, None]] = float("nan")
    values[j[None, :] >= before[:, None]] = float("nan")
    keys_after, values_after = keys.clone(), values.clone()
    for b in range(B):
        keys_after[b, int(before[b]): int(after[b])] = k_new[b]
        values_after[b, int(before[b]): int(after[b])] = v_new[b]

    def cast(t):
        return t.to(device=device, dtype=dtype)

    table = None
    if case.page_size is None:
        k_cache, v_cache, k_after, v_after = keys, values, keys_after, values_after
    else:
        ps = case.page_size
        max_pages = cap // ps
        used = [(int(n) + ps - 1) // ps for n in after]
        P = sum(used) + 3  # a few pages no one uses
        perm = torch.randperm(P, generator=gen)
        table = torch.full((B, max_pages), P + 7, dtype=torch.int32)
        k_cache = torch.full((P, ps, Hkv, E), float("nan"), dtype=torch.float64)
        v_cache = torch.full((P, ps, Hkv, Ev), float("nan"), dtype=torch.float64)
        k_after, v_after = k_cache.clone(), v_cache.clone()
        at = 0
        for b in range(B):
            pages = perm[at: at + used[b]]
            at += used[b]
            table[b, : used[b]] = pages.to(torch.int32)
            span = slice(0, used[b] * ps)
            k_cache[pages] = keys[b, span].reshape(-1, ps, Hkv, E)
            v_cache[pages] = values[b, span].reshape(-1, ps, Hkv, Ev)
            k_after[pages] = keys_after[b, span].reshape(-1, ps, Hkv, E)
            v_after[pages] = values_after[b, span].reshape(-1, ps, Hkv, Ev)
        table = table.to(device)
    return dict(q=cast(q), k_cache=cast(k_cache), v_cache=cast(v_cache),
                k_new=cast(k_new) if case.Lnew else None, v_new=cast(v_new) if case.Lnew else None,
                cache_seqlens=before.to(device=device, dtype=torch.int32), block_table=table,
                keys=cast(keys_after), values=cast(values_after), k_after=cast(k_after), v_after=cast(v_after))


def run_decode_reference(inputs, case: DecodeCase, dtype: torch.dtype):
    """The naive decode math (kvcache_reference) in `dtype` on each batch element's keys after the append,
    read from the plain logical caches of make_decode_inputs (no paging, no append): (out, lse)."""
    from attnkern.band import make_band
    from attnkern.kvcache import kvcache_reference
    from attnkern.masks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
    from attnkern.problem import kernel_scale

    q = inputs["q"].to(dtype)
    kw = decode_kwargs(case, q.device)
    slopes = kw.get("alibi_slopes")
    lens = inputs["cache_seqlens"].to(torch.int64) + case.Lnew
    return kvcache_reference(
        q, inputs["keys"].to(dtype), inputs["values"].to(dtype), lens, None,
        band=make_band(CAUSAL_BOTTOM_RIGHT if case.causal else CAUSAL_NONE, case.window),
        scale=kernel_scale(case.E ** -0.5 if case.E else 1.0, inputs["q"].dtype), softcap=case.softcap or 0.0,
        alibi=None if slopes is None else slopes.reshape(1, -1))
