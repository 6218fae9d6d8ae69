"""`attnkern bench --varlen`: packed variable-length batches, attnkern.varlen_attention (nothing padded)
against the same batch padded to its longest sequence through torch's SDPA, side by side in one run, with
the sweep's outputs (table, JSON, plot, markdown summary).

Grid: one batch per --seqlens value M, the mixed lengths of issue 14's CPU target (64..4k, mean ~1k)
scaled so that the longest is M (none below 16); or --varlen-lengths, one batch given explicitly
('64,128,4k' or 'LO..HIxN': N lengths drawn in LO..HI, seeded). H query heads (--heads; default 4 on a
CPU, 16 on a GPU), Hkv = H / --gqa, head dim: the first of --head-dims (default 64 CPU, 128 GPU),
--dtypes, --causal (default yes), --modes, --repeats/--warmup/--input-sets as in the sweep.

Providers: "attnkern varlen" (the backend auto picks for varlen_attention, or the one of
--varlen-backend; a backend that declines packed batches marks its cells with the reason, and so does
a call auto would only run on the naive reference path);
"sdpa padded" (torch's SDPA on (B, H, M, E) with its default kernel choice: causal top-left, as padding
at the end changes no real row, or without causal a bool key-padding mask; the baseline); on a GPU
also "sdpa:flash padded" (the same through SDPA's flash kernel, causal only: it takes no mask). The
packing and padding are not timed.

Cells are the sweep's: Lq = Lk = M (the longest length), B = the number of sequences, `lengths` the
batch. FLOPs count the real tokens' work (FlashAttention's convention summed over the sequences), the
same for every provider, so TFLOP/s compare useful work and the padded batch's wasted work shows as a
lower rate.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
import warnings
from typing import Dict, List, Optional

import torch

from ..flops import attention_flops
from . import measure
from .grid import DTYPE_NAMES, DTYPES
from .runner import OK, UNSUPPORTED, InputSet, add_speedups, classify, mode_callables

# Issue 14's CPU target batch: 64..4k, mean 1048.
TARGET_LENGTHS = [64, 128, 256, 512, 768, 1024, 1536, 4096]
PROVIDERS = ("attnkern varlen", "sdpa padded", "sdpa:flash padded")
BASELINE = "sdpa padded"


def scaled_lengths(longest: int) -> List[int]:
    """TARGET_LENGTHS scaled so the longest is `longest` (each at least 16, at most `longest`)."""
    top = TARGET_LENGTHS[-1]
    return [min(longest, max(16, round(n * longest / top))) for n in TARGET_LENGTHS]


def parse_batch_lengths(text: str) -> List[int]:
    """'64,128,4k' or 'LO..HIxN' (N lengths drawn uniformly in LO..HI, seed 0)."""
    from .grid import parse_length, parse_lengths

    text = str(text).strip()
    if ".." in text:
        try:
            span, n = text.split("x")
            lo, hi = (parse_length(x) for x in span.split(".."))
            count = int(n)
        except ValueError:
            raise ValueError(f"expected LO..HIxN (e.g. 64..4kx16), got {text!r}") from None
        if not 1 <= lo <= hi or count < 1:
            raise ValueError(f"expected 1 <= LO <= HI and N >= 1, got {text!r}")
        return torch.randint(lo, hi + 1, (count,), generator=torch.Generator().manual_seed(0)).tolist()
    return parse_lengths(text)


def _pad(t: torch.Tensor, cu: List[int], longest: int) -> torch.Tensor:
    """Packed (T, H, D) -> padded (B, H, longest, D), zeros after each sequence."""
    B = len(cu) - 1
    out = t.new_zeros(B, t.shape[1], longest, t.shape[2])
    for b in range(B):
        out[b, :, : cu[b + 1] - cu[b]] = t[cu[b]: cu[b + 1]].transpose(0, 1)
    return out


def _input_sets(lengths, H, Hkv, E, dtype, device, count, seed, padded: bool) -> List[InputSet]:
    cu = [0, *itertools.accumulate(lengths)]
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        q, do = (torch.randn(cu[-1], H, E, generator=gen, device=device, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(cu[-1], Hkv, E, generator=gen, device=device, dtype=dtype) for _ in range(2))
        if padded:
            q, k, v, do = (_pad(t, cu, max(lengths)) for t in (q, k, v, do))
        sets.append(InputSet(*(t.requires_grad_(i < 3) for i, t in enumerate((q, k, v, do)))))
    return sets


def _provider_fn(name: str, lengths, causal: bool, heads, dtype: torch.dtype, backend: str, device: torch.device):
    """(fn(q, k, v) -> out, context manager, reason it cannot run or None); heads = (H, Hkv, E)."""
    import attnkern
    import torch.nn.functional as F

    B, longest = len(lengths), max(lengths)
    gqa = heads[0] != heads[1]
    if name == "attnkern varlen":
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

        def fn(q, k, v):
            return attnkern.varlen_attention(q, k, v, cu, cu, longest, longest, causal=causal, enable_gqa=gqa,
                                             backend=backend)

        # What auto would only run on the naive reference path (O(L^2) memory per sequence) is not timed.
        H, Hkv, E = heads
        T = sum(lengths)
        q, kv = (torch.empty(T, h, E, device=device, dtype=dtype) for h in (H, Hkv))
        e = attnkern.explain_varlen(q, kv, kv, cu, cu, longest, longest, causal=causal, enable_gqa=gqa,
                                    backend=backend)
        why = f"no varlen kernel runs it here ({e.reason})" if e.fallback else None
        return fn, contextlib.nullcontext, why
    mask = None if causal else (torch.arange(longest, device=device) < torch.tensor(lengths, device=device)[:, None]
                                ).view(B, 1, 1, longest)

    def padded(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    if name == "sdpa padded":
        return padded, contextlib.nullcontext, None
    if device.type != "cuda":
        return padded, contextlib.nullcontext, "SDPA's flash kernel runs on CUDA devices only"
    if not causal:
        return padded, contextlib.nullcontext, "SDPA's flash kernel takes no key-padding mask (non-causal padded batch)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return padded, (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), None


def _measure(fn, context, mode, sets, repeats, warmup, device) -> Dict:
    setup, run = mode_callables(fn, mode, sets)
    with context(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t0 = time.perf_counter()
            run(setup(0))
            measure.synchronize(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            for i in range(1, warmup):
                run(setup(i))
            times = measure.time_runs(setup, run, repeats, max(warmup, 1), device)
            peak = measure.peak_extra_bytes(setup, run, device)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a marked cell
            status, reason = classify(exc, caught)
            return dict(status=status, reason=reason)
    return dict(status=OK, reason="", times_ms=times, peak_mem_bytes=peak, first_call_ms=first_ms,
                **measure.summarize(times))


def run_varlen(device: torch.device, batches: List[List[int]], dtypes: List[str], heads: int, gqa: int, E: int,
               causal: List[bool], modes: List[str], repeats: int, warmup: int, input_sets: int, seed: int,
               backend: str = "auto", progress=None) -> List[Dict]:
    """Measure every (batch, dtype, causal, provider, mode) cell; returns the cells with speedups."""
    providers = [p for p in PROVIDERS if device.type == "cuda" or p != "sdpa:flash padded"]
    Hkv = heads // gqa
    cells = []
    for lengths, dtype, is_causal in itertools.product(batches, dtypes, causal):
        shape = dict(dtype=DTYPE_NAMES[DTYPES[dtype]], B=len(lengths), H=heads, Hkv=Hkv, Lq=max(lengths),
                     Lk=max(lengths), E=E, Ev=E, causal=is_causal, window=None, softcap=0.0, alibi=False,
                     dropout=0.0, lengths=list(lengths), tokens=sum(lengths))
        for name in providers:
            fn, context, why = _provider_fn(name, lengths, is_causal, (heads, Hkv, E), DTYPES[dtype], backend, device)
            sets = [] if why else _input_sets(lengths, heads, Hkv, E, DTYPES[dtype], device, input_sets, seed,
                                              padded=name != "attnkern varlen")
            for mode in modes:
                flops = sum(attention_flops(1, heads, n, n, E, E, is_causal, mode) for n in lengths)
                cell = {"provider": name, **shape, "mode": mode, "flops": flops, "median_ms": None, "q25_ms": None,
                        "q75_ms": None, "min_ms": None, "max_ms": None, "times_ms": [], "tflops": None,
                        "peak_mem_bytes": None, "speedup_vs_baseline": None, "first_call_ms": None,
                        "input_sets": len(sets), "warnings": []}
                cell.update(dict(status=UNSUPPORTED, reason=why) if why else
                            _measure(fn, context, mode, sets, repeats, warmup, device))
                if cell["status"] == OK and cell["median_ms"] > 0:
                    cell["tflops"] = flops / (cell["median_ms"] * 1e-3) / 1e12
                cells.append(cell)
            del sets
            if progress is not None:
                progress.advance(f"{name} {shape['dtype']} L<={shape['Lq']}")
    add_speedups(cells, BASELINE)
    return cells


def notes(device: torch.device, backend: str) -> Dict:
    return {
        "varlen": " ".join(__doc__.split("\n\n")[2].split()),
        "flops": " ".join(__doc__.split("\n\n")[3].split()),
        "timing": ("CUDA events around each call" if device.type == "cuda"
                   else f"time.perf_counter around each call, {torch.get_num_threads()} threads")
                  + "; median and quartiles of the timed runs; input sets rotate across runs",
        "attnkern_backend": backend,
        "x_axis": "longest sequence of the batch (Lq)",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def batches_of(seqlens: Optional[List[int]], lengths: Optional[List[int]], device: torch.device) -> List[List[int]]:
    if lengths:
        return [lengths]
    return [scaled_lengths(m) for m in (seqlens or ([1024, 4096] if device.type == "cpu" else [4096, 16384]))]
