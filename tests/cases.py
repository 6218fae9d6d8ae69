"""The one case generator every backend's tests draw from.

A `Case` names a problem (shapes, heads, causal alignment, mask kind and broadcast shape, memory
layout, rank, scale); `make_inputs` draws fresh random tensors for it. Adding a backend to the test
matrix gives it all of these cases at once. `CASES` are the hand-written ones; `random_case(seed)` draws
one from the same vocabulary (tests/test_random_oracle.py runs hundreds of them).
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
    # Mask kind: "none", "bool", "float" (constant), "float_grad" (requires grad: tests dMask).
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


def _make(shape, dtype, device, layout, gen):
    """A random tensor of `shape` (..., H, N, D) stored in `layout`."""
    if layout == "blhe" and len(shape) >= 4:
        *lead, H, N, D = shape
        base = torch.randn(*lead, N, H, D, generator=gen, dtype=torch.float64)
        t = base.to(device=device, dtype=dtype).transpose(-3, -2)
    elif layout == "padded":
        base = torch.randn(*shape[:-1], shape[-1] + 8, generator=gen, dtype=torch.float64)
        t = base.to(device=device, dtype=dtype)[..., 3:3 + shape[-1]]
    elif layout == "e_strided":
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64)
        t = base.to(device=device, dtype=dtype).transpose(-1, -2)
    elif layout == "l_strided":
        base = torch.randn(*shape[:-2], 2 * shape[-2], shape[-1], generator=gen, dtype=torch.float64)
        t = base.to(device=device, dtype=dtype)[..., ::2, :]
    else:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
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


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0, requires_grad: bool = True):
    """Fresh random (q, k, v, attn_mask) for `case`, leaves requiring grad (the mask only if float_grad)."""
    gen = torch.Generator().manual_seed(seed)
    batch = _batch_dims(case)
    kv_batch = tuple(1 for _ in batch) if case.kv_batch_broadcast else batch
    q_heads = _head_dims(case, case.Hq)
    kv_heads = _head_dims(case, 1 if case.kv_head_broadcast else case.hkv)
    q = _make((*batch, *q_heads, case.L, case.E), dtype, device, case.layout, gen)
    k = _make((*kv_batch, *kv_heads, case.S, case.E), dtype, device, case.layout, gen)
    v = _make((*kv_batch, *kv_heads, case.S, case.ev), dtype, device, case.layout, gen)
    mask = None
    if case.mask != "none":
        shape = mask_shape(case)
        if case.mask == "bool":
            mask = torch.rand(shape, generator=gen) > 0.25
            # keep every row attendable unless it is meant to be fully masked
            if mask.shape[-1]:
                mask[..., 0] = True
            for r in case.masked_rows:
                mask[..., r, :] = False
        else:
            mask = torch.randn(shape, generator=gen, dtype=torch.float64)
            mask = mask.masked_fill(torch.rand(shape, generator=gen) < 0.1, float("-inf"))
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


def as_kwargs(case: Case):
    """The keyword arguments `attnkern.attention` and `reference_attention` take for `case`."""
    return dict(causal=case.causal if case.causal != "none" else False, enable_gqa=case.enable_gqa,
                scale=case.scale)


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
    out, lse = reference_attention(q, k, v, mask, **as_kwargs(case))
    if dlse is None:
        out.backward(do.to(out.dtype))
    else:
        torch.autograd.backward([out, lse], [do.to(out.dtype), dlse.to(lse.dtype)])
    return out, lse, [t.grad for t in grad_leaves(q, k, v, mask)]


# ---------------------------------------------------------------------------------------------------
# The cases. Each line covers one concern; together they cover lengths 1, 17, 113, 203, 256, Lq ≠ Lk
# both ways, head dims 16..256 with Ev ≠ E, every mask kind and broadcast shape, fully masked rows,
# GQA 6:2 and 4:1, non-contiguous layouts, 3-D and 5-D inputs, and all causal alignments.
CASES = [
    Case("L1_S1", L=1, S=1, E=16),
    Case("L1_S17_causal", L=1, S=17, E=16, causal="top_left"),
    Case("L17_S1_br", L=17, S=1, E=16, causal="bottom_right"),
    Case("L17_e40_causal", L=17, S=17, E=40, causal="top_left"),
    Case("L113_S203_e64", L=113, S=203, E=64),
    Case("L203_S113_e80", L=203, S=113, E=80, B=2, Hq=1),
    Case("L256_e128_causal", L=256, S=256, E=128, Hq=1, causal="top_left"),
    Case("L113_S203_e32_causal_tl", L=113, S=203, E=32, causal="top_left"),
    Case("L203_S113_e32_causal_tl", L=203, S=113, E=32, causal="top_left"),
    Case("L17_S203_e256_br", L=17, S=203, E=256, Hq=1, causal="bottom_right"),
    Case("L203_S17_e16_br", L=203, S=17, E=16, causal="bottom_right"),  # first 186 rows see nothing
    Case("L113_S113_e64_br", L=113, S=113, E=64, causal="bottom_right"),
    Case("e40_ev80", L=113, S=17, E=40, Ev=80),
    Case("e96_ev16_causal", L=17, S=113, E=96, Ev=16, causal="bottom_right"),
    Case("gqa_6_2_e96", L=17, S=113, E=96, Hq=6, Hkv=2),
    Case("gqa_4_1_causal", L=113, S=113, E=64, Hq=4, Hkv=1, causal="top_left"),
    Case("gqa_4_2_mask_float_grad", L=17, S=113, E=32, Hq=4, Hkv=2, mask="float_grad", mask_dims="hls"),
    Case("mask_bool_ls", L=113, S=203, E=64, mask="bool", mask_dims="ls"),
    Case("mask_bool_keypad", L=17, S=113, E=64, B=2, mask="bool", mask_dims="bs"),
    Case("mask_bool_bhls_causal", L=113, S=113, E=16, B=2, mask="bool", mask_dims="bhls", causal="top_left"),
    Case("mask_bool_rows_masked", L=113, S=17, E=40, mask="bool", mask_dims="ls", masked_rows=(0, 5, 112)),
    Case("mask_float_hls", L=113, S=113, E=64, mask="float", mask_dims="hls"),
    Case("mask_float_rows_masked", L=17, S=113, E=64, mask="float", mask_dims="bhls", masked_rows=(3, 16)),
    Case("mask_grad_ls", L=113, S=203, E=32, B=2, mask="float_grad", mask_dims="ls"),
    Case("mask_grad_bhls_br", L=113, S=113, E=32, B=2, mask="float_grad", mask_dims="bhls",
         causal="bottom_right"),
    Case("mask_grad_keypad", L=113, S=17, E=16, B=2, mask="float_grad", mask_dims="bs"),
    Case("mask_grad_h1s", L=17, S=113, E=16, mask="float_grad", mask_dims="hs"),
    Case("mask_grad_row_bias", L=113, S=17, E=16, mask="float_grad", mask_dims="l"),
    Case("mask_grad_s_only", L=17, S=203, E=16, mask="float_grad", mask_dims="s", causal="top_left"),
    Case("mask_grad_rows_masked", L=17, S=17, E=16, mask="float_grad", mask_dims="hls", masked_rows=(4,)),
    Case("mask_float_lowest_rows", L=17, S=40, E=16, mask="float_grad", mask_dims="ls", min_rows=(2, 9)),
    Case("layout_blhe", L=113, S=113, E=64, B=2, Hq=3, layout="blhe"),
    Case("layout_padded_gqa", L=17, S=203, E=40, Hq=4, Hkv=2, layout="padded"),
    Case("layout_e_strided", L=113, S=17, E=32, layout="e_strided", causal="top_left"),
    Case("rank3", L=113, S=17, E=64, rank=3, Hq=2),
    Case("rank5_mask", L=17, S=113, E=32, rank=5, mask="float_grad", mask_dims="bls"),
    Case("kv_batch_broadcast", L=17, S=113, E=32, B=2, kv_batch_broadcast=True),
    Case("kv_head_broadcast", L=17, S=113, E=32, Hq=3, Hkv=1, kv_head_broadcast=True),
    # Sizes for a GPU: the interpreter would take minutes.
    Case("gpu_L1024_e64_causal", L=1024, S=1024, E=64, B=2, Hq=8, causal="top_left", gpu_only=True),
    Case("gpu_L2048_e128", L=2048, S=2048, E=128, B=1, Hq=4, gpu_only=True),
    Case("gpu_L1000_S3000_e128_gqa", L=1000, S=3000, E=128, Hq=8, Hkv=2, causal="bottom_right", gpu_only=True),
    Case("gpu_L4096_e64_mask_grad", L=1537, S=4096, E=64, B=2, Hq=2, mask="float_grad", mask_dims="hls",
         gpu_only=True),
    Case("gpu_L2049_e256_causal", L=2049, S=2049, E=256, Hq=2, causal="top_left", gpu_only=True),
    Case("gpu_L777_e80_keypad", L=777, S=777, E=80, B=4, Hq=4, mask="bool", mask_dims="bs", gpu_only=True),
]


def case_by_name(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def cases(device_type: str):
    return [c for c in CASES if device_type == "cuda" or not c.gpu_only]


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
    scale sometimes; B * Hq * L * S * (E + Ev + 64) at most `max_work`."""
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
                Hkv=Hkv if Hkv != Hq else None, causal=causal, mask=mask, mask_dims=mask_dims,
                mask_rank=mask_rank, mask_fp32=mask_fp32, masked_rows=masked_rows, min_rows=min_rows,
                layout=layout, rank=rank, kv_batch_broadcast=kv_batch_broadcast,
                kv_head_broadcast=kv_head_broadcast, scale=scale)
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
