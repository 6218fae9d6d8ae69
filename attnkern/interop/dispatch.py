"""Routing of torch-SDPA calls that arrive from other people's code (replace_sdpa, the transformers
integration): attnkern's fused kernels where they serve the call, torch's own SDPA everywhere else.

The rule: a call runs on attnkern only where `auto` (or the pinned backend) picks a kernel that computes
what torch's SDPA computes. Everything else -- a device without kernels, what the chosen backend
declines (on a GPU, say, float64 or head dims over 256; the C++ CPU kernels take both; dropout where its
kernels do not fuse it), arguments attnkern refuses, an explicit mask together with `is_causal` (torch's
backends disagree on it) -- goes to torch, never to attnkern's slow reference path unless that path was
asked for by name. The reason is logged once. Dropout that a backend fuses runs there, with attnkern's
own random mask (philox.py, drawn from torch's generator): the same distribution as torch's dropout,
not the same draws.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import api, backends, config, masks, nested
from ..problem import AttentionProblem, normalize

logger = logging.getLogger("attnkern")


@dataclass
class Route:
    """Where one SDPA call goes: `backend` names the attnkern backend that runs it, or is None for torch."""

    backend: Optional[str]
    reason: str
    problem: Optional[AttentionProblem] = None
    # How a fallback is logged (once): INFO for routine reasons (dropout, arguments attnkern does not take,
    # sdpa_kernel, ...), WARNING where a fused kernel was expected but cannot run on the device.
    log_level: int = logging.INFO
    # Set for calls that do not run through api._run (nested jagged tensors: the varlen path).
    runner: Optional[Callable[[], torch.Tensor]] = None

    @property
    def to_torch(self) -> bool:
        return self.backend is None


def _plain_tensor(t) -> bool:
    # Nested tensors and tensor subclasses (DTensor, ...) have their own SDPA overrides in torch.
    return isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_nested


def autocast_like_sdpa(tensors):
    """Under autocast, torch's SDPA gets its floating inputs (float64 excepted) cast to the autocast dtype.
    attnkern's custom ops are in no autocast list, so do that cast here before routing. A CausalBias mask
    (a description, not data) is left as it is."""
    if not isinstance(tensors[0], torch.Tensor):
        return tensors
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        and not masks.is_causal_bias(t) else t
        for t in tensors
    )


# torch.nn.attention.sdpa_kernel(...) works by switching torch's per-kernel "enabled" flags (and, with
# set_priority=True, the kernel priority order). Which flags exist differs between torch versions (fa3,
# overrideable, ...) and some are off by default, so the state at import is the baseline: any difference
# from it is a restriction the user asked for.
_SDP_FLAG_GETTERS = {
    name[len("_get_"):-len("_sdp_enabled")]: getattr(torch._C, name)
    for name in sorted(dir(torch._C)) if name.startswith("_get_") and name.endswith("_sdp_enabled")
}
_SDP_PRIORITY_GETTER = getattr(torch._C, "_get_sdp_priority_order", None)


def _sdp_kernel_state():
    flags = tuple((name, bool(get())) for name, get in _SDP_FLAG_GETTERS.items())
    priority = tuple(_SDP_PRIORITY_GETTER()) if _SDP_PRIORITY_GETTER is not None else ()
    return flags, priority


_SDP_DEFAULT_STATE = _sdp_kernel_state()
_assume_constant_result = getattr(torch.compiler, "assume_constant_result", lambda fn: fn)


# Under torch.compile the flags are read once, while tracing (dynamo cannot call the getters; it runs
# sdpa_kernel blocks inside compiled code at trace time, so what it reads there is what the block set).
@_assume_constant_result
def torch_kernel_restriction() -> Optional[str]:
    """What `torch.nn.attention.sdpa_kernel` (or torch.backends.cuda.enable_*_sdp) changed about torch's SDPA
    kernel choice since attnkern was imported, in words; None when nothing did."""
    flags, priority = _sdp_kernel_state()
    if (flags, priority) == _SDP_DEFAULT_STATE:
        return None
    enabled = [name for name, on in flags if on]
    what = f"torch.nn.attention.sdpa_kernel restricts torch's SDPA to [{', '.join(enabled) or 'no kernel'}]"
    if priority != _SDP_DEFAULT_STATE[1]:
        what += f" in priority order {list(priority)}"
    return what


def route_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    backend: Optional[str] = None, *, causal: Optional[int] = None, window=None, softcap=None, alibi_slopes=None,
) -> Route:
    """Decide where a call with torch SDPA's arguments runs. `backend` pins an attnkern backend
    (None: `use_backend(...)`/ATTNKERN_BACKEND/auto). Never raises for arguments torch might accept; a
    CausalBias attn_mask together with is_causal=True raises torch's ValueError.
    `causal` (a masks.CAUSAL_* code, overriding is_causal), `window`, `softcap` and `alibi_slopes` are
    `attention`'s, for callers that know more than SDPA's arguments say (the transformers integration);
    with `causal` given, a mask and the causal band apply together, as in `attention`.

    Inside an explicit `torch.nn.attention.sdpa_kernel(...)` the call goes to torch, which honours it."""
    if causal is not None:
        is_causal = causal != masks.CAUSAL_NONE
    causal_bias = masks.is_causal_bias(attn_mask)
    if causal_bias and is_causal:
        raise ValueError(masks.CAUSAL_BIAS_WITH_IS_CAUSAL)
    restriction = torch_kernel_restriction()
    if restriction is not None:
        return Route(None, restriction)
    if all(nested.is_jagged(t) for t in (query, key, value)):
        return _route_nested(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    if not all(_plain_tensor(t) for t in (query, key, value)) or (
            attn_mask is not None and not causal_bias and not _plain_tensor(attn_mask)):
        return Route(None, "strided nested tensors, mixed nested/dense inputs and tensor subclasses are left "
                           "to torch")
    if attn_mask is not None and is_causal and causal is None:  # (`causal` given: attention()'s meaning, both)
        return Route(None, "attn_mask together with is_causal: torch's backends differ on it (some raise)")
    requested = config.requested_backend() if backend is None else backends.check_name(backend)
    # Where no candidate runs on the device at all (a CPU without the interpreter), say so before paying
    # for normalization: that is every call there.
    candidates = backends.AUTO_ORDER if requested == "auto" else [requested]
    unavailable = {name: backends.get(name).availability(query.device) for name in candidates}
    if all(unavailable.values()):
        why = "; ".join(f"{name}: {w}" for name, w in unavailable.items()) or "no fused backend is registered"
        return Route(None, f"no fused kernel runs on this device ({why})", log_level=logging.WARNING)
    try:
        problem = normalize(
            query, key, value, attn_mask, dropout_p,
            causal if causal is not None else masks.CAUSAL_TOP_LEFT if is_causal else masks.CAUSAL_NONE,
            scale, enable_gqa, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        )
    except (TypeError, ValueError) as exc:
        # torch either accepts what attnkern refuses, or raises its own error: let it decide.
        return Route(None, f"attnkern does not take these arguments ({exc})")
    if problem.is_empty:
        return Route(None, "empty problem (a zero-sized dim)", problem)
    if requested == "auto":
        choice = backends.select(problem, "auto")
        if choice.fallback or not backends.get(choice.backend).fused:
            why = "; ".join(f"{name}: {w}" for name, w in choice.rejected.items()) or choice.reason
            return Route(None, f"no fused kernel covers this call ({why})", problem)
        return Route(choice.backend, choice.reason, problem)
    chosen = backends.get(requested)
    why = chosen.availability(problem.device) or chosen.unsupported_reason(problem)
    if why:
        return Route(None, f"the pinned backend {requested!r} cannot run this call: {why}", problem)
    return Route(requested, "requested explicitly", problem)


def _route_nested(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> Route:
    """Nested jagged query/key/value (torch.nested, layout=torch.jagged) run on the packed varlen path
    where a fused backend takes the packed batch; torch decides everything else (it refuses attn_mask and
    is_causal with nested inputs)."""
    from ..varlen import normalize_varlen

    try:
        packed = nested.pack_nested(query, key, value, attn_mask, is_causal)
        problem = normalize_varlen(*packed, scale=scale, enable_gqa=enable_gqa, dropout_p=dropout_p)
    except (TypeError, ValueError) as exc:
        return Route(None, f"attnkern does not take these nested arguments ({exc})")
    if problem.is_empty:
        return Route(None, "empty problem (a zero-sized dim)")
    requested = config.requested_backend() if backend is None else backends.check_name(backend)
    try:
        choice = backends.select(problem, requested)
    except backends.BackendUnavailableError as exc:
        return Route(None, f"the pinned backend cannot run this packed batch: {exc}")
    if choice.fallback or not backends.get(choice.backend).fused:
        why = "; ".join(f"{name}: {w}" for name, w in choice.rejected.items()) or choice.reason
        return Route(None, f"no fused kernel covers this nested (packed) batch ({why})")
    return Route(choice.backend, f"nested jagged tensors on the varlen path: {choice.reason}", runner=lambda: (
        nested.nested_sdpa(query, key, value, None, dropout_p, False, scale, enable_gqa, backend=choice.backend)))


def run(route: Route, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run a call that `route_sdpa` sent to attnkern; returns the output in the query's shape.
    `sinks`: per-query-head sink logits (attention(sinks=...)), e.g. gpt-oss's through transformers."""
    if route.runner is not None:
        assert sinks is None, "sinks do not reach nested calls"
        return route.runner()
    assert route.backend is not None and route.problem is not None, "run() takes a route to attnkern"
    return api._run(route.problem, route.backend, sinks)[0]


_logged = set()


def log_fallback_once(route: Route, where: str) -> None:
    """Log, once per (where, reason), that torch's SDPA runs a call instead of attnkern, at the route's
    level: WARNING only where a fused kernel cannot run on the device, INFO for the routine reasons."""
    if torch.compiler.is_compiling():
        return
    key = (where, route.reason)
    if key in _logged:
        return
    _logged.add(key)
    summary = f" [{route.problem.summary()}]" if route.problem is not None else ""
    logger.log(route.log_level, "attnkern %s: torch's SDPA runs this call: %s%s", where, route.reason, summary)
