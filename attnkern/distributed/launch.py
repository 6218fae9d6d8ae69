"""Run a function on P local processes joined by a gloo process group (tests, examples, benchmarks).

Every collective has a timeout (init_process_group(timeout=...)) and the whole run has a deadline: a rank
that raises stops the run with its traceback, and a run that outlives the deadline is terminated, so a
failing rank never leaves the others hanging.
"""
from __future__ import annotations

import datetime
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, collective_timeout, fn, args, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    try:
        value = fn(rank, world_size, *args)
        results.put((rank, value))
    finally:
        dist.destroy_process_group()


def run_local(fn, world_size: int, *args, timeout: float = 120.0, collective_timeout: float = 60.0):
    """fn(rank, world_size, *args) on `world_size` spawned processes (fn must be importable, i.e. defined
    at module level). Returns the values the ranks returned, in rank order (they must pickle). Raises the
    first rank's exception, or TimeoutError after `timeout` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world_size, _free_port(), collective_timeout, fn, args, results),
                               nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run of {getattr(fn, '__name__', fn)} on {world_size} "
                                   f"processes did not finish within {timeout:.0f} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    values = dict(results.get() for _ in range(world_size))
    return [values[r] for r in range(world_size)]
