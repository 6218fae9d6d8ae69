"""attnkern: fused, memory-efficient attention for PyTorch.

    attnkern.scaled_dot_product_attention(q, k, v, ...)   torch's SDPA, same signature and semantics
    attnkern.attention(q, k, v, causal=..., ...)          richer API: alignments, lse, backend choice
    attnkern.explain(q, k, v, ...)                        which path a call takes, and why
    attnkern.use_backend("triton")                        context manager (or ATTNKERN_BACKEND=...)
    attnkern.testing.check_gradients(fn, q, k, v, ...)   validate any SDPA-signature function's gradients

Command line: `attnkern bench`, `attnkern check-grads`, `attnkern selfcheck` (see attnkern/cli.py).
"""
from .api import AttnkernFallbackWarning, Explanation, attention, explain, scaled_dot_product_attention
from .backends import BackendUnavailableError
from .backends import names as backend_names
from .config import use_backend
from .reference import reference_attention
from . import testing

__version__ = "0.1.0"

__all__ = [
    "AttnkernFallbackWarning",
    "BackendUnavailableError",
    "Explanation",
    "attention",
    "backend_names",
    "explain",
    "reference_attention",
    "scaled_dot_product_attention",
    "testing",
    "use_backend",
]
