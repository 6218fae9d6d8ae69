"""`attnkern bench --context-parallel P,...`: ring or Ulysses attention (attnkern.distributed) forward +
backward on P local gloo processes, for each P asked (default 1, 2, 4).

Each rank runs forward + backward on its own shard (L/P tokens) with the chosen attnkern backend (cpu by
default), one thread per process. Reported per P:
- time: the slowest rank's median step; speedup T(1) / T(P) and efficiency T(1) / (P * T(P)) (only when
  P = 1 is among those measured);
- exposed comm: the share of the step a rank spent blocked waiting for a transfer (distributed/comm.py:
  the communication that compute did not hide);
- sent: the bytes one rank sends per step (forward + backward), from the shapes (comm_bytes);
- peak extra memory: the growth of the process's peak resident set over one step, after a small warm-up
  step, next to the size of the rank's q/k/v shard: it follows the shard, O(L/P * E), never L^2.
On a machine with fewer cores than processes the ranks share cores: speedup is bounded by the core count,
and the efficiency says so.
"""
from __future__ import annotations

import json
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, TextIO

import torch

METHODS = ("ring", "ulysses")


@dataclass
class CPConfig:
    procs: List[int]
    method: str = "ring"
    layout: str = "zigzag"
    causal: bool = True
    backend: str = "cpu"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    length: int = 4096
    dim: int = 64
    dtype: str = "fp32"
    repeats: int = 3


def comm_bytes(cfg: CPConfig, P: int) -> float:
    """Bytes one rank sends in a forward + backward step (shard n = L/P tokens, b bytes per element).

    ring: P-1 hops of K and V forward, the same P-1 hops backward plus P hops of the dK/dV accumulators
    (float32; float64 for float64 inputs). Ulysses: all-to-alls keep 1/P of each tensor at home; forward
    q, k, v out and the float32 lse, backward their gradients (key/value heads replicated up to a multiple
    of P when P does not divide them). One rank sends nothing."""
    from .grid import DTYPES

    b = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    acc = 8 if b == 8 else 4
    n, B, E = cfg.length / P, cfg.batch, cfg.dim
    if P == 1:
        return 0.0
    if cfg.method == "ring":
        kv = 2 * B * cfg.kv_heads * n * E
        return (P - 1) * kv * b * 2 + P * kv * acc
    hkv = cfg.kv_heads if cfg.kv_heads % P == 0 else math.lcm(cfg.kv_heads, P)
    per_direction = (2 * cfg.heads + 2 * hkv) * B * n * E * b + cfg.heads * B * n * 4
    return 2 * per_direction * (P - 1) / P


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _step(fn, q, k, v, dout):
    fn(q, k, v).backward(dout)


def bench_rank(rank: int, world: int, cfg: CPConfig) -> Dict[str, float]:
    """One rank's measurements (runs in a spawned process, see run_local)."""
    from ...distributed import SequenceLayout, comm, ring_attention, ulysses_attention
    from .grid import DTYPES

    torch.set_num_threads(1)
    dtype = DTYPES[cfg.dtype]
    attn = ring_attention if cfg.method == "ring" else ulysses_attention

    def fn(q, k, v):
        return attn(q, k, v, causal=cfg.causal, layout=cfg.layout, backend=cfg.backend,
                    enable_gqa=cfg.heads != cfg.kv_heads)

    def local(length):
        # Random shards of the right lengths, made directly: a full-length tensor would raise the peak.
        n = SequenceLayout(length, world, cfg.layout).shard_length(rank)
        g = torch.Generator().manual_seed(rank)
        return [torch.randn(cfg.batch, h, n, cfg.dim, generator=g).to(dtype).requires_grad_(i < 3)
                for i, h in enumerate((cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads))]

    _step(fn, *local(64 * world))  # warm-up: lazy initialization is not the step's memory
    q, k, v, dout = local(cfg.length)
    shard_mb = sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20
    torch.distributed.barrier()
    before = _peak_rss_mb()
    _step(fn, q, k, v, dout)
    extra_mb = _peak_rss_mb() - before
    times, comms = [], []
    for _ in range(cfg.repeats):
        for t in (q, k, v):
            t.grad = None
        torch.distributed.barrier()
        comm.exposed_seconds = 0.0
        start = time.perf_counter()
        _step(fn, q, k, v, dout)
        times.append(time.perf_counter() - start)
        comms.append(comm.exposed_seconds)
    return {"time": statistics.median(times), "comm": statistics.median(comms), "extra_mb": extra_mb,
            "shard_mb": shard_mb}


def run_context_parallel(cfg: CPConfig, out: Optional[TextIO] = None, json_path: Optional[str] = None,
                         timeout: float = 590) -> List[Dict]:
    """Measure every P of cfg.procs, print a table, optionally write the rows as JSON; returns the rows."""
    import sys

    from ...distributed import run_local

    out = out or sys.stdout
    print(f"context parallel: {cfg.method}, {'causal' if cfg.causal else 'non-causal'}, {cfg.layout}, backend "
          f"{cfg.backend}: B={cfg.batch} Hq={cfg.heads} Hkv={cfg.kv_heads} L={cfg.length} E={cfg.dim} {cfg.dtype}, "
          f"forward+backward, one thread per process, median of {cfg.repeats}", file=out)
    print(f"{'P':>2} {'time s':>8} {'speedup':>8} {'efficiency':>10} {'exposed comm':>13} {'sent MiB/rank':>14} "
          f"{'peak extra MiB/rank':>20} {'q/k/v shard MiB':>16}", file=out, flush=True)
    rows: List[Dict] = []
    t1 = None
    for P in cfg.procs:
        ranks = run_local(bench_rank, P, cfg, timeout=timeout)
        slow = max(ranks, key=lambda r: r["time"])
        t1 = slow["time"] if P == 1 else t1
        speedup = t1 / slow["time"] if t1 else None
        row = dict(P=P, time=slow["time"], comm=slow["comm"], speedup=speedup,
                   efficiency=None if speedup is None else speedup / P, sent_mb=comm_bytes(cfg, P) / 2**20,
                   extra_mb=max(r["extra_mb"] for r in ranks), shard_mb=slow["shard_mb"])
        rows.append(row)
        ratio = (lambda x, f: "-" if x is None else format(x, f))  # noqa: E731
        print(f"{P:>2} {row['time']:>8.3f} {ratio(speedup, '.2f'):>8} {ratio(row['efficiency'], '.0%'):>10} "
              f"{row['comm'] / row['time']:>13.0%} {row['sent_mb']:>14.1f} {row['extra_mb']:>20.1f} "
              f"{row['shard_mb']:>16.1f}", file=out, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(config=asdict(cfg), rows=rows), f, indent=1)
        print(f"results: {json_path}", file=out)
    return rows
