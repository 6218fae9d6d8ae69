"""attnkern: fused, memory-efficient attention for PyTorch.

    attnkern.scaled_dot_product_attention(q, k, v, ...)   torch's SDPA, same signature and semantics
    attnkern.attention(q, k, v, causal=..., ...)          richer API: alignments, lse, backend choice
    attnkern.attention_with_kvcache(q, k_cache, v_cache, ...)   decoding against a (paged) KV cache, forward only
    attnkern.explain(q, k, v, ...)                        which path a call takes, and why (explain_varlen,
                                                          explain_kvcache: the same for those entry points)
    attnkern.varlen_attention(q, k, v, cu_q, cu_k, ...)   packed variable-length batches (FlashAttention's varlen)
    attnkern.use_backend("triton")                        context manager (or ATTNKERN_BACKEND=...)
    attnkern.replace_sdpa()                               torch's F.scaled_dot_product_attention runs attnkern
    attnkern.register_transformers()                      attn_implementation="attnkern" in transformers
    attnkern.testing.check_gradients(fn, q, k, v, ...)   validate any SDPA-signature function's gradients

Command line: `attnkern bench`, `attnkern check-grads`, `attnkern selfcheck` (see attnkern/tools/cli.py).
"""
from .api import (AttnkernFallbackWarning, Explanation, attention, explain, explain_kvcache, explain_varlen,
                  scaled_dot_product_attention, varlen_attention)
from .backends import BackendUnavailableError
from .backends import names as backend_names
from .config import use_backend
from .kvcache import attention_with_kvcache
from .interop.patching import replace_sdpa, restore_sdpa
from .reference import reference_attention, reference_varlen_attention
from . import testing

__version__ = "0.1.0"


def register_transformers(name: str = "attnkern") -> str:
    """Register attnkern with transformers' attention registries (see attnkern.interop.transformers);
    transformers is imported only here. Returns the name to pass as attn_implementation."""
    from .interop.transformers import register

    return register(name)


__all__ = [
    "AttnkernFallbackWarning",
    "BackendUnavailableError",
    "Explanation",
    "attention",
    "attention_with_kvcache",
    "backend_names",
    "explain",
    "explain_kvcache",
    "explain_varlen",
    "reference_attention",
    "reference_varlen_attention",
    "register_transformers",
    "replace_sdpa",
    "restore_sdpa",
    "scaled_dot_product_attention",
    "testing",
    "use_backend",
    "varlen_attention",
]
