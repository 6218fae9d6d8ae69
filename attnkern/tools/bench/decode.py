"""`attnkern bench --decode`: a decode step (few queries, long KV cache), attention_with_kvcache on a
contiguous and on a paged cache against torch's SDPA (and FlashAttention's flash_attn_with_kvcache where
it is importable), side by side.

Grid (issue 14): B = 1 on a CPU, 8 on a GPU (--batch), Hq = 32, Hkv = 8 (GQA 4:1), E = 128, Lq = 1,
caches of 4k..32k keys (--decode-caches), fp32 and bf16 on a CPU, bf16 on a GPU (--dtypes). torch's
SDPA gets its own preferred layout, contiguous (B, H, S, E), once with enable_gqa=True and once with K/V
repeated to Hq heads beforehand (the repeat not timed): either way it reads each kv head's keys once per
query head, where attnkern reads them once per kv head. Only the attention is timed (attnkern is given
the whole cache as already filled: no append). attnkern runs the backend "auto" picks for the call; a
call that would fall back to the naive reference path is not timed but marked with the reason
(explain_kvcache). On a GPU, CUDA events would time the kernels alone; the wall clock with a
synchronization after each call is used on every device, so host overhead counts as it does in a
decode loop.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, TextIO, Union

import torch

from .grid import DTYPES

DEFAULT_CACHES = [4096, 8192, 16384, 32768]
DEFAULT_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16]}
SHAPE = dict(B=1, Hq=32, Hkv=8, E=128, Lq=1)
GPU_BATCH = 8
PAGE_SIZE = 256
NAMES = ["attnkern", "attnkern paged", "sdpa gqa", "sdpa repeat-kv", "flash_attn kvcache"]


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(warmup, 1)):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _providers(S: int, dtype: torch.dtype, seed: int, device: torch.device,
               B: int) -> Dict[str, Union[Callable[[], object], str]]:
    """name -> the timed call, or the reason it is not run."""
    import attnkern

    Hq, Hkv, E, Lq = (SHAPE[n] for n in ("Hq", "Hkv", "E", "Lq"))
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Lq, Hq, E, generator=gen, device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, E, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv, E, generator=gen, device=device, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    # The same keys in a paged cache, pages in a shuffled order (the last page of each sequence part-filled).
    per_seq = -(-S // PAGE_SIZE)
    order = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(seed)).to(device)

    def paged(t):
        padded = t.new_zeros(B, per_seq * PAGE_SIZE, Hkv, E)
        padded[:, :S] = t
        pages = torch.empty_like(padded).view(B * per_seq, PAGE_SIZE, Hkv, E)
        pages[order] = padded.view(B * per_seq, PAGE_SIZE, Hkv, E)
        return pages

    kp, vp = paged(k), paged(v)
    table = order.to(torch.int32).reshape(B, per_seq)
    qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    kr, vr = kt.repeat_interleave(Hq // Hkv, dim=1), vt.repeat_interleave(Hq // Hkv, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns: Dict[str, Union[Callable[[], object], str]] = {
        "attnkern": lambda: attnkern.attention_with_kvcache(q, k, v, cache_seqlens=lens),
        "attnkern paged": lambda: attnkern.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table),
        "sdpa gqa": lambda: sdpa(qt, kt, vt, enable_gqa=True),
        "sdpa repeat-kv": lambda: sdpa(qt, kr, vr),
    }
    for name, cache, bt in (("attnkern", k, None), ("attnkern paged", kp, table)):
        e = attnkern.explain_kvcache(q, cache, cache, cache_seqlens=lens, block_table=bt)
        if e.fallback or e.backend == "none":
            fns[name] = f"no decode kernel runs it here ({e.reason})"
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as exc:
        fns["flash_attn kvcache"] = f"flash_attn is not importable ({exc})"
    else:
        fns["flash_attn kvcache"] = lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)
    return fns


def run_decode(caches: Optional[List[int]] = None, dtypes: Optional[List[torch.dtype]] = None, repeats: int = 10,
               warmup: int = 2, seed: int = 0, out: Optional[TextIO] = None, json_path: Optional[str] = None,
               device: Union[str, torch.device] = "cpu", batch: Optional[int] = None) -> List[Dict]:
    """Measure the grid, print a table (ms, median of `repeats`), optionally write the rows as JSON."""
    import sys

    from .environment import environment

    out = out or sys.stdout
    device = torch.device(device)
    B = batch or (GPU_BATCH if device.type == "cuda" else SHAPE["B"])
    caches = caches or DEFAULT_CACHES
    dtypes = dtypes or DEFAULT_DTYPES.get(device.type, DEFAULT_DTYPES["cpu"])
    dtypes = [DTYPES[d] if isinstance(d, str) else d for d in dtypes]  # the CLI passes names ("bf16")
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"decode on {device.type.upper()}, {where}: B={B} Hq={SHAPE['Hq']} Hkv={SHAPE['Hkv']} E={SHAPE['E']} "
          f"Lq={SHAPE['Lq']}; median of {repeats} runs, ms", file=out)
    print(f"{'cache':>6} {'dtype':>8} " + " ".join(f"{n:>18}" for n in NAMES) + f" {'speedup':>8}", file=out)
    rows, skipped = [], {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback is reported in the table, not warned
        for dtype in dtypes:
            for S in caches:
                fns = _providers(S, dtype, seed, device, B)
                ms = {n: _median_ms(f, repeats, warmup, device) for n, f in fns.items() if callable(f)}
                skipped.update({n: f for n, f in fns.items() if not callable(f)})
                del fns
                sdpa = [ms[n] for n in ("sdpa gqa", "sdpa repeat-kv") if n in ms]
                speedup = min(sdpa) / ms["attnkern"] if sdpa and "attnkern" in ms else None
                row = dict(cache=S, dtype=str(dtype).replace("torch.", ""), ms=ms, speedup_vs_best_sdpa=speedup)
                rows.append(row)
                cells = " ".join(f"{ms[n]:>18.3f}" if n in ms else f"{'-':>18}" for n in NAMES)
                print(f"{S:>6} {row['dtype']:>8} {cells} " + (f"{speedup:>7.2f}x" if speedup else f"{'-':>8}"),
                      file=out, flush=True)
    print("speedup: the faster of the two SDPA variants over attnkern (contiguous cache)", file=out)
    for name, why in skipped.items():
        print(f"  not run: {name}: {why}", file=out)
    if json_path:
        doc = dict(environment(device), shape=dict(SHAPE, B=B), threads=torch.get_num_threads(), repeats=repeats,
                   rows=rows, not_run=skipped)
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"results: {json_path}", file=out)
    return rows
