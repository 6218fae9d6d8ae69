"""Backend registry and selection.

`select(problem, requested)` returns a `Choice`: which backend runs the problem and why. An explicit
request is honoured or refused with the reason; "auto" takes the first fused backend that runs the
problem on its device, and otherwise falls back to the reference path with a warning (once per reason).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .cuda_emu import CudaEmuBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

_REGISTRY: Dict[str, Backend] = {}
# The order "auto" tries the fused backends in.
AUTO_ORDER: List[str] = []


def register(backend: Backend, auto_rank: Optional[int] = None) -> None:
    """Add a backend; `auto_rank` is its place in the order "auto" tries (None: never chosen by auto)."""
    _REGISTRY[backend.name] = backend
    if auto_rank is not None and backend.name not in AUTO_ORDER:
        AUTO_ORDER.insert(auto_rank, backend.name)


def names() -> List[str]:
    return ["auto", *_REGISTRY]


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {names()}, got {name!r}") from None


def check_name(name) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY):
        raise ValueError(f"backend must be one of {names()}, got {name!r}")
    return name


@dataclass
class Choice:
    backend: str  # the backend that runs the call
    reason: str  # why that one
    fallback: bool = False  # True when auto wanted a fused kernel and none could take the call
    rejected: Dict[str, str] = field(default_factory=dict)  # fused backends not taken, and why


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _why_not(backend: Backend, problem) -> Optional[str]:
    if getattr(problem, "is_varlen", False) and not backend.varlen:
        return f"packed variable-length batches (varlen) are not implemented in the {backend.name} kernels yet"
    return backend.availability(problem.device) or backend.unsupported_reason(problem)


def why_not(name: str, problem) -> Optional[str]:
    """None if backend `name` runs `problem` on its device, else the reason."""
    return _why_not(get(name), problem)


def select(problem, requested: str) -> Choice:
    if problem.is_empty:
        return Choice("reference", "empty problem (a zero-sized dim): the result is all zeros")
    if requested != "auto":
        backend = get(requested)
        why = _why_not(backend, problem)
        if why:
            raise BackendUnavailableError(f"backend={requested!r} cannot run this call: {why}")
        return Choice(requested, "requested explicitly")
    rejected = {}
    for name in AUTO_ORDER:
        why = _why_not(_REGISTRY[name], problem)
        if why is None:
            return Choice(name, f"auto: first fused backend that runs {problem.device.type} problems like "
                                "this one", rejected=rejected)
        rejected[name] = why
    reasons = "; ".join(f"{n}: {w}" for n, w in rejected.items()) or "no fused backend is registered"
    return Choice("reference", f"no fused kernel covers this call ({reasons}); the naive reference "
                               "path runs it with O(L*S) memory", fallback=True, rejected=rejected)


# auto: the C++ kernels for CPU tensors, Triton for CUDA tensors (and CPU under the interpreter). The
# CUDA C++ kernels are taken by name only until measured faster than Triton on a GPU.
register(CpuBackend(), auto_rank=0)
register(TritonBackend(), auto_rank=1)
register(CudaBackend())
# The CUDA kernels under the SIMT emulator, on CPU tensors: for testing them without a GPU, by name only.
register(CudaEmuBackend())
register(ReferenceBackend())
