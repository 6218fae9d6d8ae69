"""Loading the C++ extension (attnkern._C) that registers the attnkern_ext ops.

Optional: when it is missing or fails to load, attnkern still imports, and the backends that need it
say why they are unavailable. Whether the CUDA kernels were compiled into it is a separate question
(a CPU-only torch builds the extension without them).
"""
from __future__ import annotations

import importlib

import torch


def _load() -> str:
    """'' if the ops are registered, else why not."""
    try:
        importlib.import_module("attnkern._C")
    except ImportError as exc:
        return (f"the C++ extension attnkern._C is not built ({exc}); reinstall with "
                "`pip install --no-build-isolation -e .`")
    if not hasattr(torch.ops, "attnkern_ext") or not hasattr(torch.ops.attnkern_ext, "forward"):
        return "the C++ extension loaded but registered no attnkern_ext ops"
    return ""


# Loaded once, at import: a missing extension is a property of the install, not of a call.
EXTENSION_ERROR = _load() or None


def has_kernels_for(dispatch_key: str) -> bool:
    """Whether the extension registered attnkern_ext kernels for a dispatch key ("CPU", "CUDA")."""
    if EXTENSION_ERROR:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("attnkern_ext::forward", dispatch_key))
