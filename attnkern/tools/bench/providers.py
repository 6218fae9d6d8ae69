"""The attention implementations a sweep compares ("providers"), each behind one small interface:

    attnkern:<backend>   every backend in attnkern's registry (new backends appear without changes here)
    sdpa                 torch.nn.functional.scaled_dot_product_attention, torch's own kernel choice
    sdpa:<kernel>        the same, restricted to one kernel with torch.nn.attention.sdpa_kernel
                         (flash, efficient, cudnn, math; on a CPU "flash" is torch's CPU flash kernel)
    flex                 torch.nn.attention.flex_attention under torch.compile
    naive                attnkern.reference_attention in the input dtype: matmul, softmax, matmul

A shape's score mods (--softcap, --alibi, --dropout) reach every provider that can express them: attnkern
takes them as arguments; torch's SDPA gets ALiBi as a float mask and dropout as its dropout_p, and cannot
soft-cap; FlexAttention soft-caps and biases in a score_mod, and cannot drop out.

A provider either builds a callable `fn(q, k, v) -> out` for a shape or says why it cannot. Several
refusals only show when a kernel is asked (torch's SDPA raises "No available kernel" and explains in
warnings); the runner turns those into "unsupported" cells.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ... import backends, reference
from ...api import attention, explain
from ...score_mods import alibi_bias
from .grid import Shape


class Unsupported(Exception):
    """This provider does not compute this cell; the message says why."""


class Provider:
    name = "?"
    description = ""
    #: Materializes the (B, H, Lq, Lk) scores: the runner checks the host can hold them on a CPU.
    materializes_scores = False

    def availability(self, device: torch.device) -> Optional[str]:
        """None if the provider can run on this device at all, else why not."""
        return None

    def default_skip(self, device: torch.device) -> Optional[str]:
        """None if the provider belongs in the default set on this device, else why it is left out."""
        return None

    def check(self, shape: Shape, inputs) -> Optional[str]:
        """Why this provider cannot compute `shape`, when that is known without running it."""
        return None

    def context(self):
        """A context entered around every call (warm-up, timing, memory) of this provider."""
        return contextlib.nullcontext()

    def build(self, shape: Shape, device: torch.device) -> Callable:
        raise NotImplementedError


class AttnkernProvider(Provider):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"attnkern:{backend}"
        self.description = f"attnkern.attention(backend={backend!r})"
        self.materializes_scores = not backends.get(backend).fused

    def availability(self, device):
        return backends.get(self.backend).availability(device)

    def default_skip(self, device):
        if self.backend == "triton" and device.type == "cpu":
            return ("on a CPU the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1), "
                    "which checks correctness and says nothing about speed; name it in --providers to time it")
        if self.backend == "cuda-emu":
            return ("the CUDA kernels under the SIMT emulator (one CUDA thread per fiber, every access checked) "
                    "test correctness and say nothing about speed")
        return None

    def check(self, shape, inputs):
        q, k, v = inputs
        exp = explain(q, k, v, dropout_p=shape.dropout, is_causal=shape.causal, window=shape.window,
                      enable_gqa=shape.gqa, softcap=shape.softcap or None, alibi_slopes=shape.alibi_slopes(q.device),
                      backend=self.backend)
        return exp.reason if exp.backend == "none" else None

    def build(self, shape, device):
        backend, causal, gqa, window = self.backend, shape.causal, shape.gqa, shape.window
        mods = dict(softcap=shape.softcap or None, alibi_slopes=shape.alibi_slopes(device), dropout_p=shape.dropout)

        def fn(q, k, v):
            return attention(q, k, v, causal=causal, window=window, enable_gqa=gqa, return_lse=False,
                             backend=backend, **mods)

        return fn


# torch's SDPA kernels by short name; on a CPU only "flash" (the CPU flash kernel) and "math" exist.
SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
_CPU_SDPA_KERNELS = ("flash", "math")


def _sdpa_call(shape: Shape, device) -> Callable:
    """torch's SDPA for the shape; a windowed shape as the same pattern in a dense (Lq, Lk) bool mask,
    ALiBi as a dense (H, Lq, Lk) float mask (with the causal/window pattern as -inf), dropout as dropout_p."""
    if shape.softcap:
        raise Unsupported("torch's SDPA cannot soft-cap the scores (no score modification hook)")
    extra = {"enable_gqa": True} if shape.gqa else {}  # only passed when needed: older kernels lack GQA
    allowed = shape.allowed(device)
    causal = shape.causal and allowed is None
    mask = allowed
    if shape.alibi:
        mask = alibi_bias(shape.alibi_slopes(device), shape.Lq, shape.Lk, shape.torch_dtype).unsqueeze(0)
        if causal:
            allowed = torch.ones(shape.Lq, shape.Lk, dtype=torch.bool, device=device).tril()
            causal = False
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
    dropout_p = shape.dropout

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                              **extra)

    return fn


class SdpaProvider(Provider):
    def __init__(self, kernel: Optional[str] = None):
        self.kernel = kernel
        self.name = "sdpa" if kernel is None else f"sdpa:{kernel}"
        self.description = ("torch.nn.functional.scaled_dot_product_attention (torch's choice of kernel)"
                            if kernel is None else f"torch SDPA restricted to SDPBackend.{SDPA_KERNELS[kernel]}")
        self.materializes_scores = kernel == "math"

    def availability(self, device):
        if self.kernel is None:
            return None
        if device.type == "cpu" and self.kernel not in _CPU_SDPA_KERNELS:
            return f"torch has no CPU {self.kernel} kernel (CPU kernels: flash, math)"
        if device.type == "cuda" and self.kernel == "cudnn" and not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, SDPA_KERNELS[self.kernel]):
            return f"this torch has no SDPBackend.{SDPA_KERNELS[self.kernel]}"
        return None

    def context(self):
        if self.kernel is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[self.kernel])])

    def build(self, shape, device):
        return _sdpa_call(shape, device)


class FlexProvider(Provider):
    name = "flex"
    description = "torch.nn.attention.flex_attention compiled with torch.compile (dynamic=False)"

    def availability(self, device):
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as exc:
            return f"this torch has no FlexAttention ({exc})"
        if device.type not in ("cuda", "cpu"):
            return f"FlexAttention runs on CUDA and CPU, not {device.type}"
        return None

    def default_skip(self, device):
        if device.type == "cpu":
            return ("compiling FlexAttention for a CPU takes tens of seconds per shape and it has no CPU "
                    "backward; name it in --providers to include it")
        return None

    def check(self, shape, inputs):
        if shape.dropout:
            return "FlexAttention has no dropout"
        return None

    def build(self, shape, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # Each shape compiles afresh: without a reset, dynamo stops recompiling after its recompile
        # limit and silently runs FlexAttention eagerly (very slowly) for the rest of the sweep.
        torch._dynamo.reset()
        block_mask = None
        allowed = shape.allowed(device)
        if allowed is not None:
            def window_mask(b, h, q_idx, kv_idx):
                return allowed[q_idx, kv_idx]

            block_mask = create_block_mask(window_mask, None, None, shape.Lq, shape.Lk, device=device)
        elif shape.causal:
            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            block_mask = create_block_mask(causal_mask, None, None, shape.Lq, shape.Lk, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        extra = {"enable_gqa": True} if shape.gqa else {}
        if shape.softcap or shape.alibi:
            extra["score_mod"] = _flex_score_mod(shape, device)

        def fn(q, k, v):
            return compiled(q, k, v, block_mask=block_mask, **extra)

        return fn


def _flex_score_mod(shape: Shape, device):
    """Soft-capping and ALiBi as a FlexAttention score_mod, in score_mods.py's order."""
    cap, slopes, shift = shape.softcap, shape.alibi_slopes(device), shape.Lk - shape.Lq

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[h] * (q_idx + shift - kv_idx).abs()
        return score

    return score_mod


class NaiveProvider(Provider):
    name = "naive"
    description = "attnkern.reference_attention in the input dtype (matmul, softmax, matmul; autograd backward)"
    materializes_scores = True

    def build(self, shape, device):
        causal, gqa, window = shape.causal, shape.gqa, shape.window
        mods = dict(softcap=shape.softcap or None, alibi_slopes=shape.alibi_slopes(device), dropout_p=shape.dropout)

        def fn(q, k, v):
            return reference.reference_attention(q, k, v, causal=causal, window=window, enable_gqa=gqa, **mods)[0]

        return fn


def all_providers() -> List[Provider]:
    """Every provider, in display order; attnkern's come from its backend registry."""
    out: List[Provider] = [AttnkernProvider(n) for n in backends.names() if n != "auto"]
    out.append(SdpaProvider())
    out += [SdpaProvider(k) for k in SDPA_KERNELS]
    out += [FlexProvider(), NaiveProvider()]
    return out


def by_name() -> Dict[str, Provider]:
    return {p.name: p for p in all_providers()}


def default_providers(device: torch.device) -> List[str]:
    return [p.name for p in all_providers() if p.availability(device) is None and p.default_skip(device) is None]


def left_out_by_default(device: torch.device) -> Dict[str, str]:
    """Providers not in the default set on this device, and why."""
    return {p.name: (p.availability(device) or p.default_skip(device)) for p in all_providers()
            if p.availability(device) is not None or p.default_skip(device) is not None}


def parse_providers(text: str) -> List[str]:
    """A comma-separated list of provider names; "all" means every provider."""
    known = by_name()
    names = []
    for t in str(text).split(","):
        t = t.strip()
        if t == "all":
            names += list(known)
        elif t == "default":
            names.append("default")
        elif t in known:
            names.append(t)
        else:
            raise ValueError(f"unknown provider {t!r}; known: {', '.join(known)}, all, default")
    return list(dict.fromkeys(names))


__all__ = ["Provider", "Unsupported", "all_providers", "by_name", "default_providers", "parse_providers",
           "left_out_by_default"]
