"""The sweep: every (shape, provider, mode) cell of a BenchConfig, measured or marked.

A cell ends in one of four states: "ok" (measured), "unsupported" (the provider does not compute it,
with the provider's reason), "OOM" (it ran out of memory, or on a CPU would need more than the host has),
"error" (anything else went wrong; the message is kept). A marked cell never stops the sweep.

Modes: "fwd" is an inference forward (under torch.no_grad); "bwd" is the backward alone (the forward
runs untimed before each repeat); "fwd+bwd" is both. The backward is torch.autograd.grad of the output
with a random upstream gradient with respect to q, k and v (no accumulation into .grad).
"""
from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from ...backends import BackendUnavailableError
from ..cases import Case, make_inputs
from . import measure
from .grid import BenchConfig, Shape, variant_label
from .providers import Provider, Unsupported, by_name

OK, UNSUPPORTED, OOM, ERROR = "ok", "unsupported", "OOM", "error"
MODES_DOC = ("fwd: an inference forward (torch.no_grad); bwd: the backward alone, torch.autograd.grad of the "
             "output with a random upstream gradient w.r.t. q, k, v (the forward runs untimed before each run); "
             "fwd+bwd: both")

# Input sets rotate across repeats until together they exceed this many bytes (bigger than the GPU's L2
# cache, or a CPU's last-level cache), so no repeat finds its inputs cached by the one before.
ROTATION_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}
MAX_INPUT_SETS = 16


@dataclass
class InputSet:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor  # the upstream gradient of the output

    def __post_init__(self):
        # The forward alone gets inputs that do not require grad, as inference does (FlexAttention on a
        # CPU refuses inputs that require grad even under no_grad).
        self.frozen = (self.q.detach(), self.k.detach(), self.v.detach())


def input_set_count(shape: Shape, device: torch.device, requested: int = 0) -> int:
    if requested:
        return requested
    elt = torch.empty((), dtype=shape.torch_dtype).element_size()
    per_set = elt * shape.B * (shape.H * shape.Lq * (shape.E + shape.Ev) + shape.Hkv * shape.Lk * (shape.E + shape.Ev))
    target = ROTATION_BYTES.get(device.type, ROTATION_BYTES["cpu"])
    return int(min(MAX_INPUT_SETS, max(2, math.ceil(target / max(per_set, 1)))))


def make_input_sets(shape: Shape, device: torch.device, count: int, seed: int) -> List[InputSet]:
    """`count` independent input sets for `shape`, drawn on the device (attnkern/tools/cases.py's generator)."""
    case = Case("bench", L=shape.Lq, S=shape.Lk, E=shape.E, Ev=shape.Ev, B=shape.B, Hq=shape.H, Hkv=shape.Hkv)
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for i in range(count):
        q, k, v, _ = make_inputs(case, shape.torch_dtype, device, seed=seed + 1 + i, on_device=True)
        do = torch.randn(shape.B, shape.H, shape.Lq, shape.Ev, generator=gen, device=device, dtype=shape.torch_dtype)
        sets.append(InputSet(q, k, v, do))
    return sets


def mode_callables(fn: Callable, mode: str, sets: List[InputSet]):
    """(setup, run) for `measure`: setup(i) is untimed, run(state) is timed."""
    n = len(sets)

    def pick(i):
        return sets[i % n]

    def forward(s):
        with torch.no_grad():
            fn(*s.frozen)

    def backward(state):
        out, s = state
        torch.autograd.grad(out, (s.q, s.k, s.v), s.do)

    def forward_backward(s):
        backward((fn(s.q, s.k, s.v), s))

    if mode == "fwd":
        return pick, forward
    if mode == "fwd+bwd":
        return pick, forward_backward
    if mode == "bwd":
        return (lambda i: (fn(pick(i).q, pick(i).k, pick(i).v), pick(i))), backward
    raise ValueError(f"unknown mode {mode!r}")


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, (MemoryError, oom_type)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg)


def _torch_reasons(caught) -> str:
    """torch's explanations of why its SDPA kernels refused a call, from the warnings it issued."""
    reasons = []
    for w in caught:
        text = str(w.message).split("(Triggered internally")[0].strip()
        if text and not text.endswith("because:") and text not in reasons:
            reasons.append(text)
    return "; ".join(reasons)


def _first_line(text: str, limit: int = 300) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def classify(exc: BaseException, caught=()) -> tuple:
    """(status, reason) for an exception a provider raised."""
    if is_oom(exc):
        return OOM, _first_line(exc) or "out of memory"
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, (Unsupported, BackendUnavailableError, NotImplementedError)):
            return UNSUPPORTED, _first_line(e) or type(e).__name__
        msg = str(e)
        if isinstance(e, RuntimeError) and ("No available kernel" in msg or "No viable backend" in msg):
            return UNSUPPORTED, _torch_reasons(caught) or _first_line(msg)
    return ERROR, f"{type(exc).__name__}: {_first_line(exc)}"


def _host_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _score_memory_guard(provider: Provider, shape: Shape, mode: str, device: torch.device) -> Optional[str]:
    """On a CPU, refuse to run a provider that materializes the scores when the host cannot hold them:
    a CPU does not raise an out-of-memory error, the kernel's OOM killer ends the whole process."""
    if device.type != "cpu" or not provider.materializes_scores:
        return None
    copies = 3 if mode == "fwd" else 6  # scores, exp, probabilities (and their gradients)
    need = copies * 4 * shape.B * shape.H * shape.Lq * shape.Lk
    available = _host_available_bytes()
    if available is None or need < 0.8 * available:
        return None
    return (f"not run: the (B, H, Lq, Lk) scores need about {need / 2**30:.1f} GiB and the host has "
            f"{available / 2**30:.1f} GiB available")


def _release(device: torch.device) -> None:
    """Free what a finished shape or a failed call left: reference cycles (an exception's frames hold
    its tensors), then the CUDA caching allocator's unused blocks. gc.collect costs ~0.1 s with torch
    loaded, so this runs per shape and per failure, not per call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Sweep:
    """Runs a BenchConfig; `cells` holds one dict per (shape, provider, mode), in sweep order."""

    def __init__(self, config: BenchConfig, progress=None):
        self.config = config
        self.device = torch.device(config.device)
        self.progress = progress
        self.cells: List[Dict] = []

    def _cell(self, shape: Shape, provider: str, mode: str, status: str, reason: str = "", **fields) -> Dict:
        cell = {"provider": provider, **asdict(shape), "mode": mode, "status": status, "reason": reason,
                "flops": shape.flops(mode), "median_ms": None, "q25_ms": None, "q75_ms": None,
                "min_ms": None, "max_ms": None, "times_ms": [], "tflops": None, "peak_mem_bytes": None,
                "speedup_vs_baseline": None, "first_call_ms": None, "input_sets": None, "warnings": []}
        cell.update(fields)
        self.cells.append(cell)
        return cell

    def _measure_mode(self, provider: Provider, fn: Callable, shape: Shape, mode: str, sets) -> None:
        cfg = self.config
        guard = _score_memory_guard(provider, shape, mode, self.device)
        if guard:
            self._cell(shape, provider.name, mode, OOM, guard)
            return
        setup, run = mode_callables(fn, mode, sets)
        try:
            with provider.context(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                measure.synchronize(self.device)
                t0 = time.perf_counter()
                try:
                    run(setup(0))  # the first call: compiles/autotunes, and shows whether the cell runs
                    measure.synchronize(self.device)
                except Exception as exc:  # noqa: BLE001 - every failure becomes a marked cell
                    failure = classify(exc, caught)
                else:
                    failure = None
                if failure:
                    self._cell(shape, provider.name, mode, *failure)
                    _release(self.device)  # outside the except block, so the traceback is gone
                    return
                first_ms = (time.perf_counter() - t0) * 1e3
                notes = list(dict.fromkeys(_first_line(w.message, 200) for w in caught))[:3]
                for i in range(1, cfg.warmup):
                    run(setup(i))
                times = measure.time_runs(setup, run, cfg.repeats, max(cfg.warmup, 1), self.device)
                peak = measure.peak_extra_bytes(setup, run, self.device)
        except Exception as exc:  # noqa: BLE001
            status, reason = classify(exc)
            self._cell(shape, provider.name, mode, status, reason)
            _release(self.device)
            return
        stats = measure.summarize(times)
        tflops = shape.flops(mode) / (stats["median_ms"] * 1e-3) / 1e12 if stats["median_ms"] > 0 else None
        self._cell(shape, provider.name, mode, OK, "", times_ms=times, tflops=tflops, peak_mem_bytes=peak,
                   first_call_ms=first_ms, input_sets=len(sets), warnings=notes, **stats)

    def _run_provider(self, provider: Provider, shape: Shape, sets) -> None:
        cfg = self.config
        why = provider.availability(self.device)
        if why is None:
            try:
                why = provider.check(shape, (sets[0].q, sets[0].k, sets[0].v))
            except Exception as exc:  # noqa: BLE001
                why = _first_line(exc)
        if why:
            for mode in cfg.modes:
                self._cell(shape, provider.name, mode, UNSUPPORTED, why)
            return
        try:
            fn = provider.build(shape, self.device)
        except Exception as exc:  # noqa: BLE001
            status, reason = classify(exc)
            for mode in cfg.modes:
                self._cell(shape, provider.name, mode, status, reason)
            return
        for mode in cfg.modes:
            self._measure_mode(provider, fn, shape, mode, sets)

    def run(self) -> List[Dict]:
        cfg = self.config
        known = by_name()
        providers = [known[n] for n in cfg.providers]
        for shape in cfg.shapes():
            count = input_set_count(shape, self.device, cfg.input_sets)
            try:
                sets = make_input_sets(shape, self.device, count, cfg.seed)
            except Exception as exc:  # noqa: BLE001
                status, reason = classify(exc)
                for p in providers:
                    for mode in cfg.modes:
                        self._cell(shape, p.name, mode, status, f"allocating the inputs: {reason}")
                    self._advance(shape, p)
                continue
            for p in providers:
                self._run_provider(p, shape, sets)
                self._advance(shape, p)
            del sets
            _release(self.device)
        add_speedups(self.cells, cfg.baseline)
        return self.cells

    def _advance(self, shape: Shape, provider: Provider) -> None:
        if self.progress is not None:
            self.progress.advance(f"{shape.label()} {provider.name}")


def cell_key(cell: Dict, with_provider: bool = True) -> tuple:
    """What identifies a cell across runs: the shape, its score mods, the mode and (optionally) the provider."""
    key = tuple(cell[f] for f in ("dtype", "B", "H", "Hkv", "Lq", "Lk", "E", "Ev", "causal")) + (
        variant_label(cell), cell["mode"])
    return key + ((cell["provider"],) if with_provider else ())


def add_speedups(cells: List[Dict], baseline: str) -> None:
    """speedup_vs_baseline = baseline's median time / this cell's (above 1: faster than the baseline)."""
    base = {cell_key(c, False): c for c in cells if c["provider"] == baseline and c["status"] == OK}
    for c in cells:
        b = base.get(cell_key(c, False))
        if c["status"] == OK and b is not None and c["median_ms"]:
            c["speedup_vs_baseline"] = b["median_ms"] / c["median_ms"]
