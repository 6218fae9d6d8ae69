"""`replace_sdpa()`: make `torch.nn.functional.scaled_dot_product_attention` run attnkern.

The patch sets the attribute on the `torch.nn.functional` module. Everything that looks the name up there
at call time follows it: `F.scaled_dot_product_attention(...)` in model code, torch's own
`multi_head_attention_forward` (nn.MultiheadAttention, nn.Transformer*Layer: it reads the module global
at call time), transformers' "sdpa" attention. Code that bound the function to a name of its own before
the patch (`from torch.nn.functional import scaled_dot_product_attention` at import) keeps torch's.

Calls the fused kernels do not serve go to torch's original function (see dispatch.py). Patches nest: the
first one installs the wrapper, the last one to be undone puts torch's original back; the innermost
patch's `backend=` applies. The patch is process-wide (it is one module attribute), guarded by a lock.

Three torch features that a plain swap of the attribute would break or ignore are kept working:
- torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right) recognizes SDPA in its
  `__torch_function__` by `func is F.scaled_dot_product_attention`, which a call of torch's builtin no longer
  satisfies. The wrapper reads a CausalBias itself (top-left / bottom-right causal, masks.resolve_causal_bias),
  and while patched CausalBias's `__torch_function__` also takes torch's builtin for SDPA (a name bound
  before the patch, or the wrapper handing a call to torch), running CausalBias's own dispatch.
- TorchScript resolves the name to the wrapper, a Python function it cannot compile: the wrapper is
  registered as the TorchScript builtin `aten::scaled_dot_product_attention`, so scripted modules
  (nn.MultiheadAttention, nn.TransformerEncoder, ...) call torch's own SDPA, patched or not.
- torch.nn.attention.sdpa_kernel(...): calls inside it go to torch (dispatch.torch_kernel_restriction).
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends, masks
from . import dispatch

logger = logging.getLogger("attnkern")

_lock = threading.RLock()
# Installed patches, oldest first. A tuple, replaced whole under the lock, so the wrapper reads a
# consistent snapshot without taking the lock.
_active: tuple = ()
# What `torch.nn.functional.scaled_dot_product_attention` was before the first patch: torch's function,
# or whatever another library had put there.
_original = F.scaled_dot_product_attention
# The function another library installed over our wrapper, when restoring found it there and had to leave
# our wrapper inside its chain. Re-patching while it is still in place must not take it for the original
# (it calls our wrapper: a cycle); our wrapper inside it simply becomes active again.
_stranded_under = None


@functools.wraps(_original)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, **kwargs):
    patches = _active
    if not patches or kwargs:  # not patched (left inside someone else's chain), or arguments we do not know
        return _original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                         enable_gqa=enable_gqa, **kwargs)
    q, k, v, mask = dispatch.autocast_like_sdpa((query, key, value, attn_mask))
    route = dispatch.route_sdpa(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa,
                                backend=patches[-1].backend)
    if route.to_torch:
        dispatch.log_fallback_once(route, "replace_sdpa")
        # A CausalBias attn_mask goes as it is: while patched, CausalBias takes torch's builtin for SDPA
        # (_causal_bias_torch_function).
        return _original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return dispatch.run(route)


# Visible in repr(F.scaled_dot_product_attention) and tracebacks while patched.
scaled_dot_product_attention.__module__ = __name__
scaled_dot_product_attention.__qualname__ = "scaled_dot_product_attention[attnkern.replace_sdpa]"
scaled_dot_product_attention.__doc__ = (
    "attnkern's replacement for torch.nn.functional.scaled_dot_product_attention, installed by "
    "attnkern.replace_sdpa(): runs the call on attnkern's fused kernels where they serve it, else on torch's "
    "original function (its __wrapped__).\n\n" + (_original.__doc__ or "")
)
_wrapper = scaled_dot_product_attention

# torch's C function: the `func` a tensor subclass's __torch_function__ receives for any call of it.
_TORCH_SDPA_BUILTIN = torch._C._nn.scaled_dot_product_attention
# CausalBias's own __torch_function__ (a classmethod) while ours is installed over it, else None.
_causal_bias_own_torch_function = None


def _causal_bias_torch_function(cls, func, types, args=(), kwargs=None):
    """CausalBias.__torch_function__ while patched: torch's builtin SDPA counts as SDPA too (CausalBias's
    own test, `func is F.scaled_dot_product_attention`, names the wrapper now), and runs CausalBias's own
    dispatch, which calls F.scaled_dot_product_attention (the wrapper) with plain tensors."""
    if func is _TORCH_SDPA_BUILTIN:
        return cls._dispatch(*args, **(kwargs or {}))
    return _causal_bias_own_torch_function.__func__(cls, func, types, args, kwargs)


def _install_causal_bias_hook(install: bool) -> None:
    """Put `_causal_bias_torch_function` over CausalBias's own (install=True) or put its own back."""
    global _causal_bias_own_torch_function
    cls = masks.CausalBias
    if cls is None or not hasattr(cls, "_dispatch"):
        return  # no CausalBias in this torch, or one that dispatches differently: leave it alone
    if install and _causal_bias_own_torch_function is None:
        own = cls.__dict__.get("__torch_function__")
        if not isinstance(own, classmethod):
            return
        _causal_bias_own_torch_function = own
        cls.__torch_function__ = classmethod(_causal_bias_torch_function)
    elif not install and _causal_bias_own_torch_function is not None:
        cls.__torch_function__ = _causal_bias_own_torch_function
        _causal_bias_own_torch_function = None


def _register_torchscript_builtin() -> None:
    """Make TorchScript compile a reference to the wrapper as torch's `aten::scaled_dot_product_attention`
    (a Python function with routing it cannot script). Scripted code thus runs torch's SDPA."""
    builtins = getattr(torch.jit, "_builtins", None)
    if builtins is not None and hasattr(builtins, "_register_builtin"):
        builtins._register_builtin(_wrapper, "aten::scaled_dot_product_attention")


class SdpaPatch:
    """One `replace_sdpa()` call: in effect from creation until `restore()` (or the end of its `with`)."""

    def __init__(self, backend: Optional[str]):
        self.backend = backend

    @property
    def active(self) -> bool:
        return self in _active

    def restore(self) -> bool:
        """Undo this patch; torch's original comes back when no other patch is in effect.
        Returns False if it was already undone."""
        global _active, _stranded_under
        with _lock:
            if self not in _active:
                return False
            _active = tuple(p for p in _active if p is not self)
            if _active:
                logger.info("attnkern: replace_sdpa patch undone (%d still in effect)", len(_active))
                return True
            if F.scaled_dot_product_attention is _wrapper:
                F.scaled_dot_product_attention = _original
                _install_causal_bias_hook(False)
                logger.info("attnkern: torch.nn.functional.scaled_dot_product_attention restored to %r",
                            _original)
            else:
                _stranded_under = F.scaled_dot_product_attention
                # Someone patched over us; putting torch's back would drop their patch. Our wrapper, still
                # inside their chain, now hands every call straight to the original.
                logger.warning(
                    "attnkern: torch.nn.functional.scaled_dot_product_attention was replaced by %r after "
                    "attnkern's patch; leaving it in place (attnkern's wrapper inside it now passes calls "
                    "to torch's function)", F.scaled_dot_product_attention)
            return True

    def __enter__(self) -> "SdpaPatch":
        if not self.active:
            raise RuntimeError("this replace_sdpa() patch was already restored; call replace_sdpa() again")
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"<attnkern SdpaPatch backend={self.backend or 'default'} {state}>"


def replace_sdpa(backend: Optional[str] = None) -> SdpaPatch:
    """Route `torch.nn.functional.scaled_dot_product_attention` through attnkern.

    Use it as a context manager (`with attnkern.replace_sdpa(): ...`) or as a plain call undone by
    `attnkern.restore_sdpa()` (or the returned patch's `.restore()`). Calls the fused kernels cannot run on
    their device (CPU without the Triton interpreter, float64 or head dim > 256 on a GPU, dropout_p > 0 where
    the kernels do not fuse dropout, ...) and calls
    inside a `torch.nn.attention.sdpa_kernel(...)` block go to torch's original function; the reason is
    logged once on the "attnkern" logger (WARNING only when no fused kernel runs on the device, else INFO).
    CausalBias masks (torch.nn.attention.bias) run as causal alignments; TorchScript compiles the patched
    name as torch's builtin (scripted modules run torch's SDPA).

    backend: an attnkern backend name to use while patched ("triton", ...; "reference" runs the naive
        path on purpose); None follows `use_backend(...)`/ATTNKERN_BACKEND/auto at call time. A pinned
        backend that cannot run a call sends it to torch as well.
    """
    global _active, _original, _stranded_under
    if backend is not None:
        backends.check_name(backend)
    patch = SdpaPatch(backend)
    with _lock:
        if not _active:
            current = F.scaled_dot_product_attention
            if current is _stranded_under:
                logger.warning(
                    "attnkern: torch.nn.functional.scaled_dot_product_attention is still %r, installed over an "
                    "earlier attnkern patch; attnkern runs where it calls attnkern's wrapper", current)
            else:
                if current is not _wrapper:
                    _original = current
                    _wrapper.__wrapped__ = current
                F.scaled_dot_product_attention = _wrapper
                _stranded_under = None
            _install_causal_bias_hook(True)
            _register_torchscript_builtin()
        _active = _active + (patch,)
        depth = len(_active)
    logger.info("attnkern: torch.nn.functional.scaled_dot_product_attention now runs attnkern "
                "(backend=%s, patch depth %d)", backend or "default", depth)
    return patch


def restore_sdpa(all_patches: bool = False) -> bool:
    """Undo the most recent `replace_sdpa()` still in effect (all of them with all_patches=True), so that
    torch's original function is back once none is left. Returns False if there was nothing to undo."""
    undone = False
    while True:
        with _lock:
            latest = _active[-1] if _active else None
        if latest is None or not latest.restore():
            return undone
        undone = True
        if not all_patches:
            return True


def original_sdpa():
    """Torch's function that the patch wraps (the current one when no patch is in effect)."""
    with _lock:
        return _original if _active else F.scaled_dot_product_attention


def is_sdpa_replaced() -> bool:
    """Whether a replace_sdpa() patch is in effect."""
    return bool(_active)
