"""Reusing the previous call's normalization and backend choice for a call shaped like it.

A call's canonical problem (problem.normalize) and its backend (backends.select) depend on its tensors
only through their metadata, so a call whose signature -- every tensor's type, shape, strides, dtype,
device and requires_grad, every other argument (with its type), the grad mode and the requested
backend -- equals the previous call's gets the previous problem with its own tensors put in, and the
previous choice. Only problems whose canonical tensors are the caller's own tensors are kept (4-D
inputs whose batch dims agree, a 4-D mask or none: the usual call), so that putting the new tensors in
is all there is to do. The checks and the normalization of the first call hold for every call with its
signature: none of them reads tensor data.

One entry per thread (a decode loop or a training step repeats one shape at a time), kept without its
tensors so that it holds no caller's memory. Not used under
torch.compile (the trace normalizes once anyway), for tensor subclasses, CausalBias masks, or calls with
tensors beyond q, k, v and attn_mask among the normalized arguments (alibi_slopes, dropout_rng).
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from . import backends
from .problem import AttentionProblem

_last = threading.local()


def _tensor_key(t) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def signature(entry: str, query, key, value, attn_mask, args: tuple, requested: str) -> Optional[tuple]:
    """The key of a call (compared by ==), or None when it is not one the fast path takes. `args`: the
    call's other arguments (bools, numbers, None, pairs of ints); each goes in with its type, since
    normalize accepts 1 and refuses True for some."""
    if torch.compiler.is_compiling():
        return None
    if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(value) is not torch.Tensor:
        return None
    if attn_mask is not None and type(attn_mask) is not torch.Tensor:
        return None
    if query.layout != torch.strided or key.layout != torch.strided or value.layout != torch.strided:
        return None
    if query.is_nested or key.is_nested or value.is_nested or attn_mask is not None and (
            attn_mask.is_nested or attn_mask.layout != torch.strided):
        return None  # no strides (nested, sparse): the full path says what it makes of them
    mask = None if attn_mask is None else _tensor_key(attn_mask)
    return (entry, _tensor_key(query), _tensor_key(key), _tensor_key(value), mask,
            tuple((type(a), a) for a in args), requested, torch.is_grad_enabled())


def lookup(sig: Optional[tuple], query, key, value, attn_mask) -> Optional[Tuple[AttentionProblem,
                                                                                  backends.Choice]]:
    """The previous call's (problem, choice) with this call's tensors, if its signature was `sig`."""
    if sig is None:
        return None
    last = getattr(_last, "entry", None)
    if last is None or last[0] != sig:
        return None
    problem, choice = last[1], last[2]
    # Availability is a property of the process, but tests (and users) may switch a backend off.
    if backends.get(choice.backend).availability(query.device) is not None:
        return None
    return _with_tensors(problem, query, key, value, attn_mask), choice


def _with_tensors(problem: AttentionProblem, q, k, v, mask) -> AttentionProblem:
    """A shallow copy of `problem` holding these tensors (copy.copy would cost a few microseconds more)."""
    fresh = object.__new__(AttentionProblem)
    fresh.__dict__.update(problem.__dict__)
    fresh.q, fresh.k, fresh.v, fresh.mask = q, k, v, mask
    return fresh


def remember(sig: Optional[tuple], query, key, value, attn_mask, problem: AttentionProblem,
             choice: backends.Choice) -> None:
    """Keep (problem, choice) for the next call with signature `sig`, if its canonical tensors are the
    caller's own (see the module docstring)."""
    if sig is None or problem.mods.alibi is not None or problem.mods.rng is not None:
        return  # tensors of their own, made canonical per call
    if problem.q is query and problem.k is key and problem.v is value and problem.mask is attn_mask:
        problem.output_shape()  # memoized in the problem, hence in every call that reuses it
        # Kept without its tensors: the entry must not hold the caller's memory alive between calls.
        _last.entry = (sig, _with_tensors(problem, None, None, None, None), choice)


def forget() -> None:
    """Drop this thread's entry (tests compare the fast path with the full one)."""
    _last.entry = None
