"""Which backend calls use when they do not name one: `use_backend(...)`, else ATTNKERN_BACKEND, else auto;
and whether a backward must be deterministic."""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import backends

_local = threading.local()


def requested_backend() -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    name = os.environ.get("ATTNKERN_BACKEND", "auto").strip() or "auto"
    try:
        return backends.check_name(name)
    except ValueError as exc:
        raise ValueError(f"environment variable ATTNKERN_BACKEND: {exc}") from None


@contextlib.contextmanager
def use_backend(name: str):
    """Run the attention calls inside the block on backend `name` ("auto", "triton", "reference", ...).

    Thread-local and nestable. A call that passes `backend=` explicitly still gets what it asked for.
    """
    backends.check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def deterministic_backward(requested: bool) -> bool:
    """Whether a backward runs its bitwise-reproducible kernels: asked for by the call
    (`attention(..., deterministic=True)`) or by torch's global switch
    (`torch.use_deterministic_algorithms(True)`, warn_only included), read when the backward runs."""
    return bool(requested) or torch.are_deterministic_algorithms_enabled()
