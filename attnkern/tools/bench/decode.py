"""`attnkern bench --decode`: a decode step (few queries, long KV cache) on the CPU, attnkern's split-KV
kernel (attention_with_kvcache, contiguous and paged caches) against torch's CPU SDPA, side by side.

Grid (issue 14): B = 1, Hq = 32, Hkv = 8 (GQA 4:1), E = 128, Lq = 1, caches of 4k..32k keys, fp32 and
bf16. torch's SDPA gets its own preferred layout, contiguous (B, H, S, E), once with enable_gqa=True and
once with K/V repeated to Hq heads beforehand (the repeat not timed): either way it reads each kv
head's keys once per query head, where attnkern reads them once per kv head. Only the attention is
timed (attnkern is given the whole cache as already filled: no append).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, List, Optional, TextIO

import torch

from .grid import DTYPES

DEFAULT_CACHES = [4096, 8192, 16384, 32768]
DEFAULT_DTYPES = [torch.float32, torch.bfloat16]
SHAPE = dict(B=1, Hq=32, Hkv=8, E=128, Lq=1)
PAGE_SIZE = 256


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(max(warmup, 1)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _providers(S: int, dtype: torch.dtype, seed: int) -> Dict[str, Callable[[], object]]:
    import attnkern

    B, Hq, Hkv, E, Lq = (SHAPE[n] for n in ("B", "Hq", "Hkv", "E", "Lq"))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, E, generator=gen).to(dtype)
    k = torch.randn(B, S, Hkv, E, generator=gen).to(dtype)
    v = torch.randn(B, S, Hkv, E, generator=gen).to(dtype)
    lens = torch.full((B,), S, dtype=torch.int32)
    # The same keys in a paged cache, pages in a shuffled order.
    n_pages = B * S // PAGE_SIZE
    order = torch.randperm(n_pages, generator=gen)
    kp = torch.empty(n_pages, PAGE_SIZE, Hkv, E, dtype=dtype)
    vp = torch.empty_like(kp)
    kp[order] = k.reshape(n_pages, PAGE_SIZE, Hkv, E)
    vp[order] = v.reshape(n_pages, PAGE_SIZE, Hkv, E)
    table = order.to(torch.int32).reshape(B, -1)
    qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    kr, vr = kt.repeat_interleave(Hq // Hkv, dim=1), vt.repeat_interleave(Hq // Hkv, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "attnkern": lambda: attnkern.attention_with_kvcache(q, k, v, cache_seqlens=lens, backend="cpu"),
        "attnkern paged": lambda: attnkern.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table,
                                                                  backend="cpu"),
        "sdpa gqa": lambda: sdpa(qt, kt, vt, enable_gqa=True),
        "sdpa repeat-kv": lambda: sdpa(qt, kr, vr),
    }


def run_decode(caches: Optional[List[int]] = None, dtypes: Optional[List[torch.dtype]] = None, repeats: int = 10,
               warmup: int = 2, seed: int = 0, out: Optional[TextIO] = None, json_path: Optional[str] = None) -> List[Dict]:
    """Measure the grid, print a table (ms, median of `repeats`), optionally write the rows as JSON."""
    import sys

    out = out or sys.stdout
    caches, dtypes = caches or DEFAULT_CACHES, dtypes or DEFAULT_DTYPES
    dtypes = [DTYPES[d] if isinstance(d, str) else d for d in dtypes]  # the CLI passes names ("bf16")
    print(f"decode on CPU, {torch.get_num_threads()} threads: B={SHAPE['B']} Hq={SHAPE['Hq']} Hkv={SHAPE['Hkv']} "
          f"E={SHAPE['E']} Lq={SHAPE['Lq']}; median of {repeats} runs, ms", file=out)
    names = ["attnkern", "attnkern paged", "sdpa gqa", "sdpa repeat-kv"]
    print(f"{'cache':>6} {'dtype':>8} " + " ".join(f"{n:>15}" for n in names) + f" {'speedup':>8}", file=out)
    rows = []
    with torch.inference_mode():
        for dtype in dtypes:
            for S in caches:
                fns = _providers(S, dtype, seed)
                ms = {n: _median_ms(fns[n], repeats, warmup) for n in names}
                del fns
                best_torch = min(ms["sdpa gqa"], ms["sdpa repeat-kv"])
                speedup = best_torch / ms["attnkern"]
                row = dict(cache=S, dtype=str(dtype).replace("torch.", ""), ms=ms, speedup_vs_best_sdpa=speedup)
                rows.append(row)
                print(f"{S:>6} {row['dtype']:>8} " + " ".join(f"{ms[n]:>15.3f}" for n in names) + f" {speedup:>7.2f}x",
                      file=out, flush=True)
    print("speedup: the faster of the two SDPA variants over attnkern (contiguous cache)", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(shape=SHAPE, threads=torch.get_num_threads(), repeats=repeats, rows=rows), f, indent=1)
        print(f"results: {json_path}", file=out)
    return rows
