"""`attnkern bench --overhead`: host time per call of a tiny problem, attnkern's entry points against
torch's SDPA, with and without autograd.

On a problem this small (default B=1, H=8, L=1, S=256, E=64: one decode step's attention) the time of a
call is mostly the Python and dispatch work around the kernel. Each provider is timed over a batch of
`calls` calls; the providers take turns batch by batch (A, B, C, A, B, C, ... with the starting one
rotating), `rounds` times, so that a machine shared with other work slows them alike. Reported: the
median microseconds per call over the rounds, its quartiles and minimum, and "x torch", the median over
the rounds of the ratio to torch's batch of the same round (paired, so drift in the machine's load
cancels).

Providers:
    attnkern.sdpa       attnkern.scaled_dot_product_attention(q, k, v)
    attnkern.attention  attnkern.attention(q, k, v, return_lse=False)
    torch.sdpa          torch.nn.functional.scaled_dot_product_attention(q, k, v)
    kernel              the backend attnkern chooses, called directly (backends/<name>.forward): the time
                        no wrapper can remove, for reading the others against
    attnkern.kvcache    attnkern.attention_with_kvcache on the same problem as a decode step sees it: q
                        (B, L, H, E), a full cache (B, S, H, E) of the same keys and values, no append
                        (no_grad only: decoding is forward-only)
Modes: "no_grad" (inference: inputs without requires_grad, under torch.no_grad) and "grad" (inputs that
require grad, autograd on: the forward that records the graph; no backward runs).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, TextIO

import torch
import torch.nn.functional as F

from .grid import DTYPES

SCHEMA = "attnkern-bench-overhead/1"
PROVIDERS = ("attnkern.sdpa", "attnkern.attention", "torch.sdpa", "kernel", "attnkern.kvcache")
BASELINE = "torch.sdpa"
MODES = ("no_grad", "grad")


@dataclass
class OverheadConfig:
    device: str = "cpu"
    B: int = 1
    H: int = 8
    L: int = 1
    S: int = 256
    E: int = 64
    dtype: str = "fp32"
    calls: int = 200  # calls per timed batch
    rounds: int = 15  # batches per provider, interleaved
    warmup: int = 50  # untimed calls per provider first
    seed: int = 0


def parse_shape(text: str) -> Dict[str, int]:
    """'B,H,L,S,E' -> their values (positive ints)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected five positive whole numbers B,H,L,S,E, got {text!r}")
    return dict(zip("BHLSE", (int(p) for p in parts)))


def _inputs(cfg: OverheadConfig, requires_grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]  # grid.py's names: fp16, bf16, fp32, fp64

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=cfg.device)
        return t.requires_grad_(requires_grad)

    return rand(cfg.B, cfg.H, cfg.L, cfg.E), rand(cfg.B, cfg.H, cfg.S, cfg.E), rand(cfg.B, cfg.H, cfg.S, cfg.E)


def _callables(q, k, v) -> Dict[str, Callable[[], object]]:
    import attnkern
    from attnkern import backends
    from attnkern.api import _requested
    from attnkern.problem import normalize

    problem = normalize(q, k, v)
    backend = backends.get(backends.select(problem, _requested(None)).backend)
    scale, band, mods = problem.scale, problem.band, problem.mods
    residual = problem.needs_grad
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # the kernel alone records no graph
    fns = {
        "attnkern.sdpa": lambda: attnkern.scaled_dot_product_attention(q, k, v),
        "attnkern.attention": lambda: attnkern.attention(q, k, v, return_lse=False),
        "torch.sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "kernel": lambda: backend.forward(qd, kd, vd, None, scale, band, mods, residual),
    }
    if not residual:  # decoding: no autograd
        q_step = qd.transpose(1, 2)  # (B, L, H, E), a view, as a model's projection gives it
        k_cache, v_cache = kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous()
        lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        fns["attnkern.kvcache"] = lambda: attnkern.attention_with_kvcache(q_step, k_cache, v_cache,
                                                                           cache_seqlens=lengths)
    return fns, backend.name


def _time_batch(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Microseconds per call of `calls` calls (with one device synchronization at the end)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def measure_mode(cfg: OverheadConfig, mode: str) -> List[Dict]:
    """One result per provider for `mode`, measured interleaved (see the module docstring)."""
    device = torch.device(cfg.device)
    grad = mode == "grad"
    q, k, v = _inputs(cfg, grad)
    with torch.set_grad_enabled(grad):
        fns, backend = _callables(q, k, v)
        names = list(fns)
        for name in names:
            for _ in range(cfg.warmup):
                fns[name]()
        times: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(cfg.rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                times[name].append(_time_batch(fns[name], cfg.calls, device))
    results = []
    for name in names:
        ts = times[name]
        q25, _, q75 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else (ts[0],) * 3
        ratios = [t / b for t, b in zip(ts, times[BASELINE])]
        results.append({
            "provider": name, "mode": mode, "median_us": statistics.median(ts), "q25_us": q25, "q75_us": q75,
            "min_us": min(ts), "times_us": ts, "vs_torch": statistics.median(ratios),
            "backend": backend if name != BASELINE else None,
        })
    return results


def run_overhead(cfg: OverheadConfig) -> List[Dict]:
    return [r for mode in MODES for r in measure_mode(cfg, mode)]


def document(env: Dict, cfg: OverheadConfig, results: List[Dict]) -> Dict:
    return {"schema": SCHEMA, **env, "config": asdict(cfg), "baseline": BASELINE,
            "notes": {"method": " ".join(__doc__.split("\n\n")[1].split()),
                      "threads": torch.get_num_threads()},
            "results": results}


def print_table(cfg: OverheadConfig, results: List[Dict], out: TextIO) -> None:
    print(f"\n== call overhead: B={cfg.B} H={cfg.H} L={cfg.L} S={cfg.S} E={cfg.E} {cfg.dtype} on {cfg.device}; "
          f"{cfg.rounds} interleaved rounds of {cfg.calls} calls ==", file=out)
    print(f"{'mode':<8} {'provider':<19} {'median us':>10} {'IQR us':>8} {'min us':>8} {'x torch':>8}", file=out)
    for r in results:
        label = r["provider"] + (f" ({r['backend']})" if r["provider"] == "kernel" else "")
        print(f"{r['mode']:<8} {label:<19} {r['median_us']:>10.1f} {r['q75_us'] - r['q25_us']:>8.1f} "
              f"{r['min_us']:>8.1f} {r['vs_torch']:>7.2f}x", file=out)
