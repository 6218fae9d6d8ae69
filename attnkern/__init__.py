"""attnkern: fused, memory-efficient attention for PyTorch.

    attnkern.scaled_dot_product_attention(q, k, v, ...)   torch's SDPA, same signature and semantics
    attnkern.attention(q, k, v, causal=..., ...)          richer API: alignments, lse, backend choice
    attnkern.explain(q, k, v, ...)                        which path a call takes, and why
    attnkern.use_backend("triton")                        context manager (or ATTNKERN_BACKEND=...)
    attnkern.replace_sdpa()                               torch's F.scaled_dot_product_attention runs attnkern
    attnkern.register_transformers()                      attn_implementation="attnkern" in transformers
    attnkern.testing.check_gradients(fn, q, k, v, ...)   validate any SDPA-signature function's gradients

Command line: `attnkern bench`, `attnkern check-grads`, `attnkern selfcheck` (see attnkern/cli.py).
"""
from .api import AttnkernFallbackWarning, Explanation, attention, explain, scaled_dot_product_attention
from .backends import BackendUnavailableError
from .backends import names as backend_names
from .config import use_backend
from .patching import replace_sdpa, restore_sdpa
from .reference import reference_attention
from . import testing

__version__ = "0.1.0"


def register_transformers(name: str = "attnkern") -> str:
    """Register attnkern with transformers' attention registries (see attnkern.integrations.transformers);
    transformers is imported only here. Returns the name to pass as attn_implementation."""
    from .integrations.transformers import register

    return register(name)


__all__ = [
    "AttnkernFallbackWarning",
    "BackendUnavailableError",
    "Explanation",
    "attention",
    "backend_names",
    "explain",
    "reference_attention",
    "register_transformers",
    "replace_sdpa",
    "restore_sdpa",
    "scaled_dot_product_attention",
    "testing",
    "use_backend",
]
