"""Waiting on in-flight transfers, with the time spent blocked counted.

Ring and Ulysses attention start their transfers asynchronously (batch_isend_irecv, all_to_all_single
with async_op=True) and wait for them here. A wait is bounded by the process group's timeout
(init_process_group(timeout=...), which run_local sets): a peer that never joins makes the waiting rank
raise instead of hanging. `exposed_seconds` is the time this process spent blocked, that is the
communication that compute did not hide; the benchmark (attnkern bench --context-parallel) reads and
resets it.
"""
from __future__ import annotations

import time

exposed_seconds = 0.0


def wait(works) -> None:
    """Wait for every work in `works` (torch.distributed Work objects)."""
    global exposed_seconds
    start = time.perf_counter()
    for w in works:
        w.wait()
    exposed_seconds += time.perf_counter() - start
