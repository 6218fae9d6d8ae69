"""Context-parallel attention on P local gloo processes: time, scaling efficiency, exposed communication
and peak extra memory per rank, for P = 1, 2, 4.

    python bench/context_parallel.py                          # ring, causal, zigzag; B=1 H=8 L=4096 E=64 fp32
    python bench/context_parallel.py --method ulysses --procs 1 2 4 --length 8192

Each rank runs forward + backward on its own shard (L/P tokens) with attnkern's cpu backend, one thread
per process. time: the slowest rank's median step. efficiency: T(1) / (P * T(P)). exposed comm: the share
of the step a ring rank spends blocked waiting for a transfer (what compute did not hide; Ulysses: the
time in its all-to-alls, measured the same way around them). peak extra memory: the growth of the
process's peak resident set during one step, after a small warm-up step, next to the size of the
rank's q/k/v shard. On a machine with fewer cores than processes the ranks share cores: speedup is bounded
by the core count, and the efficiency says so.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.distributed as dist


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _step(fn, q, k, v, dout):
    out = fn(q, k, v)
    out.backward(dout)


def bench_rank(rank, world, args):
    import attnkern.distributed.ring as ring_module
    import attnkern.distributed.ulysses as ulysses_module
    from attnkern.distributed import SequenceLayout, ring_attention, ulysses_attention

    torch.set_num_threads(1)
    comm = {"s": 0.0}
    if args.method == "ulysses":  # time its all-to-alls (blocking calls) the way the ring times its waits
        inner = ulysses_module._all_to_all

        def timed(*a):
            start = time.perf_counter()
            try:
                return inner(*a)
            finally:
                comm["s"] += time.perf_counter() - start

        ulysses_module._all_to_all = timed
    attn = ring_attention if args.method == "ring" else ulysses_attention

    def fn(q, k, v):
        return attn(q, k, v, causal=args.causal, layout=args.layout, backend=args.backend)

    def local(length):
        # Random shards of the right lengths, made directly: a full-length tensor would raise the peak.
        n = SequenceLayout(length, world, args.layout).shard_length(rank)
        g = torch.Generator().manual_seed(rank)
        return [torch.randn(args.batch, args.heads, n, args.dim, generator=g).requires_grad_(i < 3)
                for i in range(4)]

    _step(fn, *local(64 * world))  # warm-up: lazy initialization is not the step's memory
    q, k, v, dout = local(args.length)
    shard_mb = sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20
    dist.barrier()
    before = _peak_rss_mb()
    _step(fn, q, k, v, dout)
    extra_mb = _peak_rss_mb() - before
    times, comms = [], []
    for _ in range(args.reps):
        for t in (q, k, v):
            t.grad = None
        dist.barrier()
        ring_module.exposed_comm_seconds, comm["s"] = 0.0, 0.0
        start = time.perf_counter()
        _step(fn, q, k, v, dout)
        times.append(time.perf_counter() - start)
        comms.append(ring_module.exposed_comm_seconds + comm["s"])
    return {"time": statistics.median(times), "comm": statistics.median(comms), "extra_mb": extra_mb,
            "shard_mb": shard_mb}


def main(argv=None):
    from attnkern.distributed import run_local

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--method", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{args.method}, {'causal' if args.causal else 'non-causal'}, {args.layout}, backend {args.backend}: "
          f"B={args.batch} H={args.heads} L={args.length} E={args.dim} float32, forward+backward")
    print(f"{'P':>2} {'time s':>8} {'speedup':>8} {'efficiency':>10} {'exposed comm':>13} "
          f"{'peak extra MiB/rank':>20} {'q/k/v shard MiB':>16}")
    rows, t1 = [], None
    for P in args.procs:
        ranks = run_local(bench_rank, P, args, timeout=590)
        slow = max(ranks, key=lambda r: r["time"])
        t1 = slow["time"] if P == 1 else t1
        speedup = t1 / slow["time"] if t1 else float("nan")
        rows.append(dict(slow, P=P, speedup=speedup, extra_mb=max(r["extra_mb"] for r in ranks)))
        print(f"{P:>2} {slow['time']:>8.3f} {speedup:>8.2f} {speedup / P:>10.0%} "
              f"{slow['comm'] / slow['time']:>13.0%} {rows[-1]['extra_mb']:>20.1f} {slow['shard_mb']:>16.1f}")
    return rows


if __name__ == "__main__":
    main()
