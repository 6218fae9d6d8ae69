"""Timing and peak-memory measurement of one benchmark cell.

A measurement is a pair of callables: `setup(i)` prepares repeat i untimed (picks input set i, and for
the backward alone runs the forward) and returns a state; `run(state)` is what is timed.

Timing: on a GPU, CUDA events around each `run` on the current stream (one synchronization at the end,
so the queue stays full as in training); on a CPU, `time.perf_counter` around each `run` (CPU kernels
are synchronous). Each repeat uses the next of several input sets, so a repeat cannot find its inputs
already in cache from the previous one.

Peak extra memory: the most memory held during one `run` beyond what was held when it started (the
inputs, and for the backward alone the saved forward). Outputs and gradients count.
- GPU: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated`
  before: exact for tensors from torch's caching allocator; memory a library allocates on its own
  (cuDNN/cuBLAS workspaces outside torch's allocator) is not seen.
- CPU (Linux): the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its
  resident set before, after returning freed heap pages to the system (malloc_trim) so that reused
  free memory does not hide new use. Page-granular and process-wide (other threads count); it sees
  every allocation, torch's or not. Elsewhere it is not measured (None).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from typing import Callable, List, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(setup: Callable[[int], object], run: Callable[[object], None], repeats: int, first: int,
              device: torch.device) -> List[float]:
    """Milliseconds of `repeats` runs, repeat r using setup(first + r)."""
    if device.type == "cuda":
        events = []
        for r in range(repeats):
            state = setup(first + r)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            del state
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for r in range(repeats):
        state = setup(first + r)
        t0 = time.perf_counter()
        run(state)
        times.append((time.perf_counter() - t0) * 1e3)
        del state
    return times


def summarize(times_ms: List[float]) -> dict:
    """Median and spread (quartiles, min, max) of a list of times."""
    ordered = sorted(times_ms)
    if len(ordered) >= 2:
        q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q25 = q75 = ordered[0]
    return {"median_ms": statistics.median(ordered), "q25_ms": q25, "q75_ms": q75,
            "min_ms": ordered[0], "max_ms": ordered[-1]}


# --------------------------------------------------------------------------------------------------
# Memory

_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)


def cpu_memory_method() -> Optional[str]:
    """None if the CPU peak-memory measurement works in this process, else why not."""
    try:
        _reset_peak_rss()
        _status_kib("VmHWM")
        _status_kib("VmRSS")
    except OSError as exc:
        return f"peak resident set size cannot be measured here ({exc})"
    return None


MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() "
            "before the call (torch's caching allocator only)",
    "cpu": "process peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call, after "
           "malloc_trim(0); page-granular and process-wide",
}


def peak_extra_bytes(setup: Callable[[int], object], run: Callable[[object], None],
                     device: torch.device) -> Optional[int]:
    """Peak memory one `run` holds beyond what was held before it (see the module docstring)."""
    state = setup(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run(state)
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu" or cpu_memory_method() is not None:
        return None
    _malloc_trim()
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    run(state)
    return max(0, _status_kib("VmHWM") - before) * 1024
