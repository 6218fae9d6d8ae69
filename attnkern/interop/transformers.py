"""Hugging Face transformers integration: `attn_implementation="attnkern"`.

    import attnkern
    attnkern.register_transformers()            # or attnkern.interop.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnkern")
    model.set_attn_implementation("attnkern")   # on a model already built

`register()` adds an attention function to transformers' AttentionInterface and, under the same name,
a mask function to its AttentionMaskInterface: transformers' own SDPA mask function, except for the causal
and sliding-window causal masks, which the kernels' band computes (see below). The model then gets the
masks its "sdpa" implementation would get for everything else (a bool mask, or None when `is_causal` can
stand for it), and the attention function computes what the "sdpa" function computes:
- causal: `is_causal` when the caller passes it, else the module's `is_causal`, and only for more than one
  query and no explicit mask (the same decision as transformers' sdpa path);
- sliding windows (Mistral, Gemma 2/3, Qwen 2, gpt-oss, ...) and causal masks with padding or a cache:
  transformers' sliding mask lets query position p see key positions p - W + 1 .. p
  (`sliding_window_overlay`: kv > q - W, and causal); its causal mask, p's keys up to p. Where the mask is
  one of these two and nothing is overlaid (no packed documents, no custom and/or mask), the mask function
  builds no (B, 1, L, S) mask: it returns None where nothing is padded and the layer's own rule gives the
  band (a sliding layer's `sliding_window=W`, the argument transformers' flash-attention path reads, with at
  least W keys; a causal layer's `is_causal` with one query or L == S), else only the key padding as
  a (B, n) bool mask over the n keys the queries can reach (a static cache's slots past the last query are
  left out), as transformers' flash-attention mask function does. The attention function takes a 2-D mask
  as that: keys cut to n, the padding as a (B, 1, 1, n) broadcast mask, causal bottom-right with
  `window=(W - 1, 0)` on a sliding layer; the tiles outside the window are skipped. A compiled graph keeps
  the padding as a mask (its values are not read), and a static cache's offset is read only eagerly. A
  mask asked for with `allow_is_causal_skip=False` is built as sdpa's: a model adds to it (Falcon's ALiBi),
  or a compiled cache decodes (one query: a (B, 1, 1, S) mask);
- GQA: key/value heads are read in place (enable_gqa), never repeated;
- `scaling` and `dropout` as given; the output is (batch, length, heads, head_dim), weights None.
- attention sinks (`s_aux`, gpt-oss): passed to the kernels as `attention(sinks=...)`;
- logit soft-capping (`softcap`, Gemma 2): passed to the kernels as `attention(softcap=...)`, applied to the
  scaled scores before the mask, as transformers' eager attention does;
- packed batches (one row of several documents: position_ids restarting, or the cu_seq_lens_q/k kwargs of
  transformers' DataCollatorWithFlattening): causal per document on attnkern's varlen path, no dense
  block-diagonal mask (`_packed_sequences` says when).
- inside `attnkern.distributed.context_parallel(...)` (a sequence sharded over processes): every call goes
  to its ring (or Ulysses) attention and the mask function builds no mask (distributed/context.py).
Calls the fused kernels do not serve (a variant the backend does not take, float64 on a GPU, a device
without kernels, position bias, paged cache, ...) run transformers' own sdpa function instead; the reason
is logged once on the "attnkern" logger. Soft-capping and sinks in such a call raise NotImplementedError:
transformers' sdpa function cannot compute them (it raises for softcap; some versions drop both silently).

Models whose code dispatches through AttentionInterface take the name (nearly all in transformers 5; in 4.x,
those already ported to it: Llama-style decoders, GPT-2, ... but not BERT). For the others, load them with "sdpa"
and use `attnkern.replace_sdpa()`: their sdpa code calls torch.nn.functional.scaled_dot_product_attention.

transformers is imported by this module only; `import attnkern` never imports it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import masks
from ..band import make_band
from ..distributed import context as context_parallel
from . import dispatch
from ..sinks import check_sinks

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "attnkern's transformers integration needs transformers >= 4.54 "
        "(pip install 'attnkern[transformers]')"
    ) from exc

try:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
except ImportError:  # pragma: no cover - older transformers have no paged cache argument
    PagedAttentionCache = ()

try:  # what recognizes transformers' own sliding-window causal mask (transformers >= 5)
    from transformers.masking_utils import (
        and_masks, causal_mask_function, sliding_window_overlay)
    _AND_MASK_CODE = and_masks().__code__
    _SLIDING_OVERLAY_CODE = sliding_window_overlay(1).__code__
except (ImportError, RuntimeError, AttributeError):  # pragma: no cover - older transformers: masks as sdpa's
    _AND_MASK_CODE = None

NAME = "attnkern"


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def sliding_window_of(mask_function) -> Optional[int]:
    """W when `mask_function` is transformers' own `sliding_window_causal_mask_function(W)` (the
    intersection of `sliding_window_overlay(W)` and `causal_mask_function`, nothing else), else None.
    Recognized by the functions' code objects, so anything overlaid or renamed is simply not recognized."""
    if _AND_MASK_CODE is None or getattr(mask_function, "__code__", None) is not _AND_MASK_CODE:
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is causal_mask_function
            and getattr(parts[0], "__code__", None) is _SLIDING_OVERLAY_CODE):
        return None
    window = _closure(parts[0]).get("sliding_window")
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def _band_keys(q_length, kv_length, q_offset, kv_offset, mask_function, local_size) -> Optional[int]:
    """n when the mask transformers asks for is the kernels' band over the first n keys, apart from padding:
    `mask_function` is its plain causal mask or its sliding-window causal mask of the layers' `local_size` W
    (`window=(W - 1, 0)`), and the query positions end where the n-th key's does (bottom-right). The keys past
    n are a static cache's slots not written yet, which the causal rule hides. Else None."""
    if mask_function is not causal_mask_function and (local_size is None
                                                      or sliding_window_of(mask_function) != local_size):
        return None
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return None  # as transformers' sdpa masks: an exported graph would hard-code the decision
    if isinstance(q_offset, torch.Tensor):  # a static cache's offset: read it, except where that breaks a graph
        if torch.compiler.is_compiling() or q_offset.numel() != 1:
            return None
        q_offset = int(q_offset)
    if not all(isinstance(n, int) for n in (q_length, kv_length, q_offset, kv_offset)):
        return None
    n = q_offset + q_length - kv_offset
    return n if q_length <= n <= kv_length else None


def make_mask_function(sdpa_mask):
    """transformers' SDPA mask function `sdpa_mask`, except for the causal and sliding-window causal masks the
    kernels' band computes (`_band_keys`). For those it returns None where the attention function needs no
    mask at all (no padding, and the call's own rule gives the band: a sliding layer with at least W keys,
    or a causal layer whose single query or L == S makes top-left and bottom-right agree), else the key
    padding alone as a (batch, n) bool mask over the first n keys, as transformers' flash-attention mask
    function does: the attention function then slices the keys to n and passes the padding as a (B, 1, 1, n)
    broadcast mask beside the band. No (B, 1, L, S) mask is built for them. Every other mask is sdpa_mask's,
    and so is any mask asked for with allow_is_causal_skip=False."""

    def attnkern_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                      attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
        if context_parallel.active() is not None:  # a sharded sequence: the ring computes causality
            context_parallel.transformers_mask(attention_mask)
            return None
        window = None if mask_function is causal_mask_function else local_size
        # allow_is_causal_skip=False asks for the mask itself: a model that adds to it (Falcon's ALiBi, Doge's
        # dynamic mask), or a compiled cache's decoding step (one query: a (B, 1, 1, S) mask, O(S) anyway).
        n = (_band_keys(q_length, kv_length, q_offset, kv_offset, mask_function, window) if allow_is_causal_skip
             else None)
        if n is not None and attention_mask is not None and attention_mask.shape[-1] < n:
            n = None  # neither transformers' 2-D mask nor one of ours: transformers' rules
        if n is None:
            return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
        padding = attention_mask
        if padding is not None:
            # transformers' 2-D mask covers positions 0 .. at least the last query's; a shorter one is a mask
            # this function returned, fed back in (generate() with a static cache prepares the masks before
            # the model's own call): as transformers' flash-attention masks, it ends at the last query.
            end = kv_offset + n
            padding = padding[:, end - n:end] if padding.shape[-1] >= end else padding[:, -n:]
        # Reading the padding's values would break a compiled graph: then the padding goes as it is.
        unpadded = padding is None or (not torch.compiler.is_compiling() and bool(padding.all()))
        own_rule = kv_length >= window if window is not None else q_length in (1, kv_length)
        if unpadded and n == kv_length and own_rule:
            return None
        if padding is None:
            device = kwargs.get("device", "cpu")
            return torch.ones(batch_size, n, dtype=torch.bool, device=device)
        return padding

    return attnkern_mask


# What register() puts in transformers' mask registry (older transformers: its sdpa mask function as is).
MASK_FUNCTION = (ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] if _AND_MASK_CODE is None
                 else make_mask_function(ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]))


def _layer_window(kwargs, attention_mask, key) -> Optional[int]:
    """The layer's sliding window W where its mask was left out for the band (see `make_mask_function`):
    `sliding_window=W` given by the layer, and either no mask and at least W keys, or the key padding alone
    (a 2-D mask); else None. (Below W keys without a mask, or with a paged cache whose kernels handle windows
    themselves, None means what it means to transformers' sdpa.)"""
    window = kwargs.get("sliding_window")
    if (isinstance(window, bool) or not isinstance(window, int) or window <= 0
            or isinstance(kwargs.get("cache"), PagedAttentionCache)):
        return None
    if attention_mask is None:
        return window if key.shape[-2] >= window else None
    return window if _is_key_padding(attention_mask) else None


def _is_key_padding(attention_mask) -> bool:
    """Whether `attention_mask` is the (batch, n) key padding `make_mask_function` gives for the band (as
    transformers' flash-attention masks: never a 4-D sdpa mask)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2


def _transformers_only(kwargs) -> Optional[str]:
    """Why transformers' sdpa function must run this call itself, or None."""
    if kwargs.get("position_bias") is not None:
        return "a position bias (transformers builds a float mask from it)"
    if isinstance(kwargs.get("cache"), PagedAttentionCache):
        return "a paged KV cache"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return None


def _packed_sequences(module, query, key, attention_mask, dropout, sinks, kwargs):
    """(cu_seqlens, max_len) when this call is a packed batch the varlen path serves, else None: one row
    (batch 1) holding several documents, marked either by the flash-attention kwargs cu_seq_lens_q/k (as
    transformers' DataCollatorWithFlattening passes them) or by position_ids restarting together with the
    block-diagonal causal mask transformers builds for them (which the varlen path replaces). Only causal self-attention
    without a cache, sliding window, sinks or dropout; position_ids are read from the device, so under
    torch.compile only the kwargs form is taken."""
    B, _, L, _ = query.shape
    if B != 1 or key.shape[2] != L or L < 2 or sinks is not None or dropout or not getattr(module, "is_causal", True) \
            or getattr(module, "sliding_window", None) is not None or not query.is_floating_point():
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor):
        if cu_q is not cu_k and (torch.compiler.is_compiling() or not torch.equal(cu_q, cu_k)):
            return None  # self-attention only: the same documents on both sides
        return cu_q.to(device=query.device, dtype=torch.int32), int(kwargs.get("max_length_q") or L)
    pos = kwargs.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape != (1, L) or torch.compiler.is_compiling():
        return None
    # Only where transformers itself found a packed batch: it then passes the block-diagonal causal mask of
    # the documents (its rule: a new document wherever the position does not advance by 1), which the
    # varlen path computes exactly; any other mask (padding, a cache's) stays on the dense path.
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
            and attention_mask.shape == (1, 1, L, L)):
        return None
    doc = torch.cat([pos.new_zeros(1), (pos[0, 1:] - pos[0, :-1] != 1).cumsum(0)])
    if doc[-1] == 0:
        return None
    block_causal = (doc[:, None] == doc[None, :]).tril()
    if not torch.equal(attention_mask[0, 0], block_causal.to(attention_mask.device)):
        return None
    bounds = torch.cat([doc.new_zeros(1), torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1, doc.new_full((1,), L)])
    return bounds.to(device=query.device, dtype=torch.int32), int((bounds[1:] - bounds[:-1]).max())


def _packed_attention(query, key, value, scaling, packed):
    """Causal attention per document of a packed (1, H, T, E) batch on attnkern's varlen path ->
    (1, T, Hq, Ev), or None where no fused kernel serves it (the dense path then runs the call)."""
    from ..api import explain_varlen, varlen_attention

    cu, max_len = packed
    q, k, v = (t[0].transpose(0, 1) for t in dispatch.autocast_like_sdpa((query, key, value, None))[:3])
    kw = dict(causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    how = explain_varlen(q, k, v, cu, cu, max_len, max_len, **kw)
    if how.fallback or how.backend == "none":
        return None
    return varlen_attention(q, k, v, cu, cu, max_len, max_len, **kw).unsqueeze(0)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers' attention-function contract: query (B, Hq, L, E), key/value (B, Hkv, S, E) ->
    (output (B, L, Hq, Ev), None)."""
    if context_parallel.active() is not None:  # inside attnkern.distributed.context_parallel
        return context_parallel.transformers_attention(module, query, key, value, attention_mask, dropout, scaling,
                                                       is_causal, kwargs)
    reason = _transformers_only(kwargs)
    route = dispatch.Route(None, reason)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    softcap = kwargs.get("softcap")
    sliding = _layer_window(kwargs, attention_mask, key)
    # A packed row of documents (no softcap or sliding window there: those take the dense path).
    packed = (_packed_sequences(module, query, key, attention_mask, dropout, sinks, kwargs)
              if reason is None and softcap is None and sliding is None else None)
    out = _packed_attention(query, key, value, scaling, packed) if packed is not None else None
    if out is not None:
        return out, None
    if _is_key_padding(attention_mask):
        # The causal or sliding mask left out for the band, with the key padding over the first n keys (the
        # keys past n: a static cache's empty slots, which the causal rule hides).
        n = attention_mask.shape[-1]
        key, value = key[:, :, :n], value[:, :, :n]
    if reason is None:
        mask = attention_mask
        if sliding is not None or _is_key_padding(mask):  # the causal (sliding) mask left out for the band
            causal, window = masks.CAUSAL_BOTTOM_RIGHT, (sliding - 1, 0) if sliding is not None else None
            if mask is not None:
                mask = mask[:, None, None, :]  # (B, 1, 1, n): broadcast over heads and queries
        else:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            # As transformers' sdpa path: a single query (decoding) attends every cached key, and an explicit
            # mask already holds the causal pattern.
            causal = masks.parse_causal(query.shape[2] > 1 and attention_mask is None and bool(causal))
            window = None
        if mask is not None and mask.dim() == 4 and mask.shape[-1] > key.shape[-2]:
            mask = mask[..., : key.shape[-2]]  # as transformers 4.x's sdpa path: some models build it longer
        q, k, v, mask = dispatch.autocast_like_sdpa((query, key, value, mask))
        route = dispatch.route_sdpa(q, k, v, mask, dropout, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
                                    causal=causal, window=window, softcap=softcap)
        if not route.to_torch:
            if sinks is not None:
                sinks = check_sinks(sinks.to(q.dtype if q.dtype == torch.float64 else torch.float32),
                                    route.problem.Hq, q.device)
            out = dispatch.run(route, sinks)
            return out.transpose(1, 2).contiguous(), None
    kernels_only = [what for what, given in (("attention sinks (s_aux)", sinks is not None),
                                             ("logit soft-capping (softcap)", softcap is not None)) if given]
    if kernels_only:
        raise NotImplementedError(
            f"attn_implementation='attnkern' runs {' and '.join(kernels_only)} on its kernels only, and they do "
            f"not serve this call ({route.reason}); use 'eager' for this model")
    dispatch.log_fallback_once(route, "transformers")
    if sliding is not None or _is_key_padding(attention_mask):
        # transformers' sdpa needs the causal or sliding mask that was left out: build it here
        band = make_band(masks.CAUSAL_BOTTOM_RIGHT, (sliding - 1, 0) if sliding is not None else None)
        dense = band.allowed(query.shape[2], key.shape[2], query.device)[None, None]
        attention_mask = dense if attention_mask is None else dense & attention_mask[:, None, None, :]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register(name: str = NAME) -> str:
    """Register attnkern under `name` in transformers' attention (and mask) registries; idempotent.
    Returns `name`, the value for `attn_implementation`."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash"):
        raise ValueError(f"name must be a new attention implementation name such as 'attnkern', got {name!r}")
    AttentionInterface.register(name, attention_forward)
    # Without a mask function of its own a custom name gets no mask at all (transformers skips it).
    AttentionMaskInterface.register(name, MASK_FUNCTION)
    return name
