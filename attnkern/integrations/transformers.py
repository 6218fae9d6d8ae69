"""Hugging Face transformers integration: `attn_implementation="attnkern"`.

    import attnkern
    attnkern.register_transformers()            # or attnkern.integrations.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnkern")
    model.set_attn_implementation("attnkern")   # on a model already built

`register()` adds an attention function to transformers' AttentionInterface and, under the same name,
transformers' own SDPA mask function to its AttentionMaskInterface: the model then builds exactly the
masks its "sdpa" implementation would get (a bool mask, or None when `is_causal` can stand for it), and
the attention function computes what the "sdpa" function computes:
- causal: `is_causal` when the caller passes it, else the module's `is_causal`, and only for more than one
  query and no explicit mask (the same decision as transformers' sdpa path);
- GQA: key/value heads are read in place (enable_gqa), never repeated;
- `scaling` and `dropout` as given; the output is (batch, length, heads, head_dim), weights None.
- attention sinks (`s_aux`, gpt-oss): passed to the kernels as `attention(sinks=...)`.
Calls the fused kernels do not serve (dropout > 0, float64, a device without kernels, position bias, paged
cache, ...) run transformers' own sdpa function instead; the reason is logged once on the "attnkern" logger.
Logit softcapping, which neither computes, raises NotImplementedError, and so do sinks in a call the
kernels cannot serve (some versions' sdpa function would drop both silently).

Models whose code dispatches through AttentionInterface take the name (nearly all in transformers 5; in 4.x,
those already ported to it: Llama-style decoders, GPT-2, ... but not BERT). For the others, load them with "sdpa"
and use `attnkern.replace_sdpa()`: their sdpa code calls torch.nn.functional.scaled_dot_product_attention.

transformers is imported by this module only; `import attnkern` never imports it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
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

NAME = "attnkern"


def _transformers_only(kwargs) -> Optional[str]:
    """Why transformers' sdpa function must run this call itself, or None. Raises for what neither
    attnkern nor SDPA computes (some transformers versions' sdpa ignores it silently)."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "attn_implementation='attnkern' does not support logit softcapping yet; use 'eager' or "
            "'flex_attention' for this model")
    if kwargs.get("position_bias") is not None:
        return "a position bias (transformers builds a float mask from it)"
    if isinstance(kwargs.get("cache"), PagedAttentionCache):
        return "a paged KV cache"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return None


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
    reason = _transformers_only(kwargs)
    route = dispatch.Route(None, reason)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if reason is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # As transformers' sdpa path: a single query (decoding) attends every cached key, and an explicit
        # mask already holds the causal pattern.
        causal = query.shape[2] > 1 and attention_mask is None and bool(causal)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-1] > key.shape[-2]:
            mask = mask[..., : key.shape[-2]]  # as transformers 4.x's sdpa path: some models build it longer
        q, k, v, mask = dispatch.autocast_like_sdpa((query, key, value, mask))
        route = dispatch.route_sdpa(q, k, v, mask, dropout, causal, scaling,
                                    enable_gqa=key.shape[1] != query.shape[1])
        if not route.to_torch:
            if sinks is not None:
                sinks = check_sinks(sinks.to(q.dtype if q.dtype == torch.float64 else torch.float32),
                                    route.problem.Hq, q.device)
            out = dispatch.run(route, sinks)
            return out.transpose(1, 2).contiguous(), None
    if sinks is not None:
        raise NotImplementedError(
            f"attn_implementation='attnkern' runs attention sinks (s_aux) on its kernels only, and they do not "
            f"serve this call ({route.reason}); use 'eager' for this model")
    dispatch.log_fallback_once(route, "transformers")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register(name: str = NAME) -> str:
    """Register attnkern under `name` in transformers' attention (and mask) registries; idempotent.
    Returns `name`, the value for `attn_implementation`."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash"):
        raise ValueError(f"name must be a new attention implementation name such as 'attnkern', got {name!r}")
    AttentionInterface.register(name, attention_forward)
    # Without a mask function of its own a custom name gets no mask at all (transformers skips it).
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name
