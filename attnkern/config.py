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
    value = os.environ.get("ATTNKERN_BACKEND", "auto")
    name = _checked_env.get(value)  # every call reads the variable; a value is checked once
    if name is not None:
        return name
    try:
        name = backends.check_name(value.strip() or "auto")
    except ValueError as exc:
        raise ValueError(f"environment variable ATTNKERN_BACKEND: {exc}") from None
    _checked_env[value] = name
    return name


_checked_env: dict = {}  # ATTNKERN_BACKEND values seen -> their checked backend names


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


#: ATTNKERN_SINGLE_PASS=1 opts the Triton backward into its single-pass kernel (dQ by float32 atomics)
#: where the call allows a non-deterministic backward. Off by default: its compile report (attnkern
#: compile-report) still shows register spills and synchronous tile loads on every GPU target, so the
#: two-pass kernels stay the default until a GPU measurement says the single pass is faster.
SINGLE_PASS_ENV = "ATTNKERN_SINGLE_PASS"


def single_pass_backward() -> bool:
    """Whether the Triton backward may take its single-pass kernel (read when the backward runs)."""
    return os.environ.get(SINGLE_PASS_ENV, "0") == "1"
